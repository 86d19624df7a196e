"""Export fidelity checks shared by the targets: logits of the exported model vs the torch model.

Printed in optimum-cli's style, one ✓/✗ line per check; any ✗ fails the export.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LONG_CODE_PROMPT = 'import csv\nimport statistics\nfrom collections import defaultdict\n\n\ndef load(path):\n    """Read sensor readings from a CSV file."""\n    readings = defaultdict(list)\n    with open(path, newline="") as fh:\n        for row in csv.DictReader(fh):\n            try:\n                readings[row["sensor"]].append(float(row["value"]))\n            except (KeyError, ValueError):\n                continue\n    return readings\n\n\ndef summarise(readings):\n    out = []\n    for sensor, values in sorted(readings.items()):\n        if len(values) < 2:\n            continue\n        out.append((sensor, statistics.mean(values), statistics.stdev(values)))\n    return out\n'
VALIDATION_PROMPTS = (
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\nimport sys\n\nclass Config:\n    def __init__(self, path):\n",
    "The quick brown fox jumps over the lazy dog. Once upon a time,",
    LONG_CODE_PROMPT,
)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Max abs diff, top-1 agreement and mean KL(reference ‖ candidate) over positions [T, vocab]."""
    ref_lp, cand_lp = log_softmax(reference), log_softmax(candidate)
    kl = (np.exp(ref_lp) * (ref_lp - cand_lp)).sum(-1)
    return {
        "max_abs_diff": float(np.abs(reference.astype(np.float64) - candidate).max()),
        "top1_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).mean()),
        "mean_kl": float(kl.mean()),
        "positions": int(reference.shape[0]),
    }


def decided_agreement(reference: np.ndarray, candidate: np.ndarray, margin: float) -> dict:
    """Top-1 agreement over the positions where the reference's top-1 log-prob leads its runner-up by ≥ margin.

    Two runs of one int8 model that differ only in float rounding order (another kernel, another thread count)
    flip near-ties; a lowering that computes something else flips decided positions too.
    """
    top2 = np.sort(log_softmax(reference), axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) >= margin
    agree = reference.argmax(-1) == candidate.argmax(-1)
    return {
        "margin": margin,
        "positions": int(decided.sum()),
        "top1_agreement": float(agree[decided].mean()) if decided.any() else 0.0,
    }


@dataclass
class ValidationReport:
    """Named checks with pass/fail and the numbers behind them."""

    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    def add(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append((name, bool(ok), detail))

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def lines(self) -> list[str]:
        return [f"\t-[{'✓' if ok else '✗'}] {name}{': ' + detail if detail else ''}" for name, ok, detail in self.checks]

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in self.checks],
            "metrics": self.metrics,
        }

    def add_fp32_match(self, metrics: dict, refs: np.ndarray, atol: float, rtol: float) -> None:
        """fp32 export: max abs logit difference within atol + rtol·max|reference|."""
        bound = atol + rtol * float(np.abs(refs).max())
        self.add("logits vs torch (fp32)", metrics["max_abs_diff"] <= bound,
                 f"max abs diff {metrics['max_abs_diff']:.2e} (limit {bound:.2e})")

    def add_kv_cache_check(self, runtime, prompt_ids: list[int], steps: int, exact: bool, min_agreement: float) -> None:
        """Greedy decode with the KV cache vs full passes without it (`runtime`: `.generate` and `.logits`).

        exact (fp32): the cached tokens equal `steps` greedy tokens recomputed from scratch. With int8
        activations quantized per call, a one-token step and a full pass round differently and flip near-ties,
        and one flip changes every later token; so the cached tokens are scored against one full pass over the
        same sequence (teacher forcing). A broken cache (stale keys, wrong positions) disagrees on most tokens.
        """
        cached = runtime.generate(prompt_ids, steps).token_ids
        if exact:
            recompute = greedy_by_recompute(runtime.logits, prompt_ids, steps)
            self.add("KV-cache decode = full recompute", cached == recompute, f"{steps} greedy tokens")
            return
        full = runtime.logits(list(prompt_ids) + cached[:-1])[len(prompt_ids) - 1 :].argmax(-1)
        agree = float(np.mean(full == np.asarray(cached)))
        self.metrics["kv_cache_agreement"] = agree
        self.add("KV-cache decode vs full recompute (quantized)", agree >= min_agreement,
                 f"{agree:.3f} of {steps} tokens (min {min_agreement})")

    def add_int8_floors(self, metrics: dict, min_agreement: float, max_kl: float, label: str = "int8") -> None:
        """Quantized export vs the fp32 model: top-1 agreement and mean KL floors (the same for every target)."""
        self.add(f"top-1 agreement vs torch fp32 ({label})", metrics["top1_agreement"] >= min_agreement,
                 f"{metrics['top1_agreement']:.4f} over {metrics['positions']} positions (min {min_agreement})")
        self.add(f"mean KL vs torch fp32 ({label})", metrics["mean_kl"] <= max_kl,
                 f"{metrics['mean_kl']:.2e} (max {max_kl})")


def greedy_by_recompute(logits_of, prompt_ids: list[int], steps: int) -> list[int]:
    """`steps` greedy tokens, each from a full forward pass over the whole sequence (no KV cache)."""
    seq, out = list(prompt_ids), []
    for _ in range(steps):
        token = int(logits_of(seq)[-1].argmax())
        out.append(token)
        seq.append(token)
    return out
