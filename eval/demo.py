"""`basel-edge demo`: the whole pipeline on the embedded SmolLM2-135M, offline.

compress for python-code at keep 0.5 with the method measured best at an equal training budget (SVD-LLM with
its default loss-aware ranks, then part-2 fine-tuning of both factors: eval/results/compress-ablation.md and
compress.md, where no Basel/BSI setting beat it) → export to
every available target with int8 weights → validate everything against the dense model on cpu and mobile (and
cuda when there is a GPU) → print where the report is. `--method basel|bsi` runs the trained methods instead
(their part 2 inside the same step budget). `--quick` uses small budgets for a first look.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from basel_edge.errors import UserError

# Training runs on one thread: on a shared 2-core machine two threads made a step many times slower
# (basel_cli.py); the SVDs and the validation use --threads.
TRAIN_THREADS = 1
# rows of 256 tokens, as the trained methods and eval/bench_compress.py use: ~3 s per step on one core
TRAIN_SEQ_LEN = 256
DEMO_MARKER = ".basel-edge-demo"  # in a folder the demo made, so that a rerun may replace its outputs there


@dataclass
class DemoConfig:
    """Budgets of the demo; `quick` trades accuracy of the numbers for a run of a few minutes."""

    out: Path
    quick: bool = False
    keep: float = 0.5
    threads: int = 2
    method: str | None = None
    overwrite: bool = False  # run in a non-empty folder the demo did not make (its outputs replace same-named ones)

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise UserError(f"--keep must be in (0, 1], got {self.keep}")
        if self.threads <= 0:
            raise UserError(f"--threads must be positive, got {self.threads}")
        if self.method is not None:
            from basel_edge.compress import get_method

            get_method(self.method)  # an unknown name is refused here, before the model is materialised

    def chosen_method(self) -> str:
        return self.method or "svd-llm"

    @property
    def train_steps(self) -> int:
        """Training steps of the compression phase (fine-tuning, or Basel part 1 + part 2); none in --quick."""
        return 0 if self.quick else 120

    def compress_args(self) -> list[str]:
        method = self.chosen_method()
        args = ["--method", method, "--keep", str(self.keep)]
        if method in ("basel", "bsi"):
            # the best Basel setting measured at keep 0.4 (eval/results/compress.md): no new bases, lr 1e-2,
            # half the steps in part 1 and half in part 2; training on one thread (see TRAIN_THREADS)
            args += ["--r-add", "0", "--lr", "1e-2", "--threads", str(TRAIN_THREADS)]
            if self.quick:
                return args + ["--steps", "40"]
            half = self.train_steps // 2
            return args + ["--steps", str(half), "--finetune-steps", str(half),
                           "--train-tokens", str(self.train_steps * 2 * 256)]
        return args + ["--threads", str(self.threads), "--calib-tokens", "2048" if self.quick else "16384"]

    def finetune_args(self) -> list[str]:
        """`basel-edge finetune` options after an SVD-family compression (empty: no fine-tuning)."""
        if self.chosen_method() in ("basel", "bsi") or not self.train_steps:
            return []
        return ["--task", "python-code", "--steps", str(self.train_steps), "--seq-len", str(TRAIN_SEQ_LEN),
                "--threads", str(TRAIN_THREADS)]

    def validate_args(self) -> list[str]:
        if self.quick:
            return ["--eval-tokens", "1024", "--new-tokens", "16", "--reps", "1"]
        return ["--eval-tokens", "8192", "--new-tokens", "32", "--reps", "3"]


def _phase(index: int, total: int, text: str) -> float:
    print(f"\n== basel-edge demo [{index}/{total}] {text}", flush=True)
    return time.perf_counter()


def claim_output(out: Path, overwrite: bool) -> None:
    """Make `out` the demo's folder, or refuse in one line before any work: a folder the demo made (it holds
    DEMO_MARKER, or the report of a demo from before the marker) is reused, and the phases then replace their own outputs in it; anything else must be new or
    empty unless --overwrite (the demo never deletes what it did not write in this run or an earlier one)."""
    from basel_edge.atomic import check_output_dir, check_writable_parent

    if (out / DEMO_MARKER).is_file() or (out / "report" / "report.json").is_file():  # the latter: an older demo's
        check_writable_parent(out)
    else:
        check_output_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("made by `basel-edge demo`; a later demo run replaces its outputs here\n")


def run_demo(cfg: DemoConfig) -> Path:
    """Run every phase; returns the report folder."""
    from basel_edge import exporters
    from basel_edge.cli import main
    from basel_edge.models import DEFAULT_MODEL, resolve_model

    start = time.perf_counter()
    out = cfg.out
    claim_output(out, cfg.overwrite)
    t = _phase(1, 4, "materialise the embedded SmolLM2-135M-Instruct")
    dense = resolve_model(DEFAULT_MODEL).path
    print(f"dense model: {dense} ({time.perf_counter() - t:.0f} s)")

    fact = out / f"smollm2-135m-{cfg.chosen_method()}{'-ft' if cfg.finetune_args() else ''}-{cfg.keep}"
    t = _phase(2, 4, f"compress for python-code with {cfg.chosen_method()} at keep {cfg.keep}"
                     + (f", then fine-tune {cfg.train_steps} steps" if cfg.finetune_args() else ""))
    compressed = fact.with_name(fact.name + ".untuned") if cfg.finetune_args() else fact
    code = main(["compress", "--model", DEFAULT_MODEL, "--task", "python-code", *cfg.compress_args(), "-o", str(compressed), "--overwrite"])
    if code == 0 and cfg.finetune_args():
        code = main(["finetune", str(compressed), *cfg.finetune_args(), "-o", str(fact), "--overwrite"])
        shutil.rmtree(compressed, ignore_errors=True)
    if code != 0:
        raise UserError("compression failed; see the message above")
    print(f"compressed in {time.perf_counter() - t:.0f} s")

    t = _phase(3, 4, "export to every available target with int8 weights")
    artifacts = [str(fact)]
    for target in exporters.targets().values():
        if cfg.quick and target.slow:
            print(f"skip {target.name} in --quick: {target.slow}")
            continue
        dest = out / target.output_name(fact.name)
        code = main(["export", "--target", target.name, str(fact), "-o", str(dest), "--weights", target.int8_weights,
                     "--overwrite"])
        if code == 0:
            artifacts.append(f"{dest}@{fact}")
        else:
            print(f"export to {target.name} failed (exit {code}); it is left out of the report")
    print(f"exported in {time.perf_counter() - t:.0f} s")

    t = _phase(4, 4, "validate against the dense model")
    backends = ["cpu", "mobile"] + (["cuda"] if torch.cuda.is_available() else [])
    report = out / "report"
    main(["validate", "--baseline", str(dense), *artifacts, "--backends", ",".join(backends),
          "--threads", str(cfg.threads), *cfg.validate_args(), "-o", str(report)])
    if not torch.cuda.is_available():
        print("cuda backend: skipped (no CUDA GPU on this machine)")
    print(f"\nbasel-edge demo finished in {(time.perf_counter() - start) / 60:.1f} min; report: {report}/report.md")
    return report
