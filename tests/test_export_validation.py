"""The export checks shared by the ONNX and ExecuTorch targets (exporters/validation.py), on fake runtimes."""

from types import SimpleNamespace

import numpy as np

from basel_edge.exporters.validation import ValidationReport, decided_agreement

VOCAB = 50


def next_token(seq: list[int]) -> int:
    """A deterministic 'model' whose greedy next token depends on the whole sequence."""
    return (sum((i + 1) * t for i, t in enumerate(seq)) * 7 + 3) % VOCAB


class FakeRuntime:
    """`.logits(ids)` runs the full sequence; `.generate` decodes with a cache that can be made to go wrong."""

    def __init__(self, flip_steps: tuple[int, ...] = (), stale_cache: bool = False) -> None:
        self.flip_steps, self.stale_cache = flip_steps, stale_cache

    def logits(self, ids: list[int]) -> np.ndarray:
        out = np.zeros((len(ids), VOCAB), dtype=np.float32)
        for pos in range(len(ids)):
            out[pos, next_token(list(ids[: pos + 1]))] = 5.0
        return out

    def generate(self, prompt_ids: list[int], steps: int) -> SimpleNamespace:
        seq, out = list(prompt_ids), []
        for step in range(steps):
            context = seq[-1:] if self.stale_cache and step > 0 else seq
            token = next_token(context)
            if step in self.flip_steps:  # a near-tie the one-token step resolves the other way
                token = (token + 1) % VOCAB
            out.append(token)
            seq.append(token)
        return SimpleNamespace(token_ids=out)


PROMPT = [5, 9, 2, 11]


def check(runtime, exact: bool) -> ValidationReport:
    report = ValidationReport()
    report.add_kv_cache_check(runtime, PROMPT, 8, exact, 0.75)
    return report


def test_kv_cache_check_passes_a_correct_cache_both_ways():
    assert check(FakeRuntime(), exact=True).ok
    report = check(FakeRuntime(), exact=False)
    assert report.ok and report.metrics["kv_cache_agreement"] == 1.0


def test_int8_kv_cache_check_tolerates_one_near_tie_flip_that_exact_recompute_does_not():
    flipped = FakeRuntime(flip_steps=(6,))
    assert not check(flipped, exact=True).ok
    report = check(flipped, exact=False)
    assert report.ok and report.metrics["kv_cache_agreement"] == 7 / 8


def test_int8_kv_cache_check_fails_a_broken_cache():
    report = check(FakeRuntime(stale_cache=True), exact=False)
    assert not report.ok
    assert report.metrics["kv_cache_agreement"] < 0.75
    assert "✗" in report.lines()[0]


def test_decided_agreement_ignores_near_ties_and_counts_decided_flips():
    reference = np.array([[2.0, 1.98, 0.0], [3.0, 0.0, 0.0], [0.0, 4.0, 1.0], [1.0, 1.1, 0.0]])
    near_ties_flipped = np.array([[1.98, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 4.0, 1.0], [1.1, 1.0, 0.0]])
    decided_flipped = np.array([[2.0, 1.98, 0.0], [0.0, 3.0, 0.0], [0.0, 4.0, 1.0], [1.0, 1.1, 0.0]])
    assert decided_agreement(reference, near_ties_flipped, 0.5) == {"margin": 0.5, "positions": 2, "top1_agreement": 1.0}
    assert decided_agreement(reference, decided_flipped, 0.5)["top1_agreement"] == 0.5
    assert decided_agreement(reference, near_ties_flipped, 0.0)["top1_agreement"] == 0.5
