"""`basel-edge demo`: the whole pipeline on the embedded SmolLM2-135M, offline.

compress for python-code at keep 0.5 with the method measured best at an equal training budget (SVD-LLM with
its default loss-aware ranks, then part-2 fine-tuning of both factors with a cosine schedule:
eval/results/compress-ablation.md, compress-demo-budget.md and compress.md, where no Basel/BSI setting beat it)
→ export to every available target with int8 weights → validate everything against the dense model on cpu and
mobile (and cuda when there is a GPU) → print where the report is. `--method basel|bsi` runs the trained
methods instead (their part 2 inside the same step budget). `--quick` uses small budgets for a first look.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from basel_edge.errors import UserError
from basel_edge.jobs import DEFAULT_CALIB_TOKENS, DEFAULT_METHOD
from basel_edge.ranks import DEFAULT_KEEP

if TYPE_CHECKING:
    from basel_edge.eval.harness import ValidateConfig
    from basel_edge.jobs import CompressJob, FinetuneJob, TrainedCompressJob

# Training uses --threads like every other phase: the demo has the machine to itself, and a fine-tuning step of
# the keep-0.5 model took 3.52 s on one AMD EPYC core and 2.15 s on two, 1.38 s with the bf16 autocast that
# training uses where the CPU has bf16 instructions (eval/results/train-step-2026-12-06.md). 320 steps with the cosine
# schedule fit compression plus fine-tuning into about 10 minutes there (eval/results/compress-demo-budget.md).
TRAIN_STEPS = 320
# rows of 256 tokens, as the trained methods and eval/bench_compress.py use
TRAIN_SEQ_LEN = 256
TRAIN_BATCH = 2
DEMO_MARKER = ".basel-edge-demo"  # in a folder the demo made, so that a rerun may replace its outputs there


@dataclass
class DemoConfig:
    """Budgets of the demo; `quick` trades accuracy of the numbers for a run of a few minutes."""

    out: Path
    quick: bool = False
    keep: float = DEFAULT_KEEP
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
        return self.method or DEFAULT_METHOD

    @property
    def train_steps(self) -> int:
        """Training steps of the compression phase (fine-tuning, or Basel part 1 + part 2); none in --quick."""
        return 0 if self.quick else TRAIN_STEPS

    def trained(self) -> bool:
        return self.chosen_method() in ("basel", "bsi")

    def fine_tunes(self) -> bool:
        """Whether a fine-tuning phase follows the compression (SVD-family methods outside --quick)."""
        return not self.trained() and self.train_steps > 0

    def compress_job(self, output: Path) -> CompressJob | TrainedCompressJob:
        """The compression phase: SVD-LLM with its default ranks, or Basel/BSI with part 2 inside the budget."""
        from basel_edge.compress import get_method
        from basel_edge.compress.basel import BaselConfig, default_checkpoint_dir
        from basel_edge.jobs import DEFAULT_CHECKPOINT_EVERY, CompressJob, DataSource, TrainedCompressJob
        from basel_edge.ranks import Budget
        from basel_edge.train import LoopConfig

        data = DataSource(task="python-code")
        if self.trained():
            # the best Basel setting measured at keep 0.4 (eval/results/compress.md): no new bases, lr 1e-2,
            # half the steps in part 1 and half in part 2
            steps = 40 if self.quick else self.train_steps // 2
            basel = BaselConfig(keep=self.keep, importance=get_method(self.chosen_method()).importance, r_add=0,
                                lr=1e-2, steps=steps, finetune_steps=0 if self.quick else self.train_steps - steps)
            return TrainedCompressJob(
                output=output, data=data, basel=basel,
                loop=LoopConfig(steps=steps, batch_size=TRAIN_BATCH, checkpoint_every=DEFAULT_CHECKPOINT_EVERY,
                                checkpoint_dir=default_checkpoint_dir(output)),
                train_seq_len=TRAIN_SEQ_LEN, threads=self.threads, overwrite=True,
                train_tokens=None if self.quick else self.train_steps * TRAIN_BATCH * TRAIN_SEQ_LEN)
        return CompressJob(output=output, data=data, method=self.chosen_method(), budget=Budget(keep=self.keep),
                           calib_tokens=2048 if self.quick else DEFAULT_CALIB_TOKENS, threads=self.threads,
                           overwrite=True)

    def finetune_job(self, model: Path, output: Path) -> FinetuneJob | None:
        """Fine-tuning after an SVD-family compression (None: no fine-tuning phase)."""
        from basel_edge.jobs import DataSource, FinetuneJob

        if not self.fine_tunes():
            return None
        return FinetuneJob(model=str(model), output=output, data=DataSource(task="python-code", seq_len=TRAIN_SEQ_LEN),
                           steps=self.train_steps, batch_size=TRAIN_BATCH, threads=self.threads, overwrite=True)

    def validate_config(self, baseline: Path, artifacts: list[str], out: Path) -> ValidateConfig:
        from basel_edge.eval.harness import ValidateConfig

        backends = ["cpu", "mobile"] + (["cuda"] if torch.cuda.is_available() else [])
        budget = dict(eval_tokens=1024, new_tokens=16, reps=1) if self.quick else dict(eval_tokens=8192, new_tokens=32,
                                                                                       reps=3)
        return ValidateConfig(baseline=str(baseline), artifacts=artifacts, out=out, backends=backends,
                              threads=self.threads, **budget)


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
    """Run every phase through the library's typed jobs; returns the report folder."""
    from basel_edge import exporters
    from basel_edge.eval.harness import run_validation
    from basel_edge.jobs import compress_checkpoint, finetune_checkpoint
    from basel_edge.models import DEFAULT_MODEL, resolve_model

    start = time.perf_counter()
    out = cfg.out
    claim_output(out, cfg.overwrite)
    t = _phase(1, 4, "materialise the embedded SmolLM2-135M-Instruct")
    dense = resolve_model(DEFAULT_MODEL).path
    print(f"dense model: {dense} ({time.perf_counter() - t:.0f} s)")

    tunes = cfg.fine_tunes()
    fact = out / f"smollm2-135m-{cfg.chosen_method()}{'-ft' if tunes else ''}-{cfg.keep}"
    t = _phase(2, 4, f"compress for python-code with {cfg.chosen_method()} at keep {cfg.keep}"
                     + (f", then fine-tune {cfg.train_steps} steps" if tunes else ""))
    compressed = fact.with_name(fact.name + ".untuned") if tunes else fact
    summary = compress_checkpoint(cfg.compress_job(compressed))
    print(f"wrote {compressed} ({summary['kept_fraction']:.3f} of decoder-linear parameters kept)")
    if tunes:
        tuned = finetune_checkpoint(cfg.finetune_job(compressed, fact))
        print(f"fine-tuned on {tuned['train_tokens']} tokens (final loss {tuned['final_loss']:.4f}): {fact}")
        shutil.rmtree(compressed, ignore_errors=True)
    print(f"compressed in {time.perf_counter() - t:.0f} s")

    t = _phase(3, 4, "export to every available target with int8 weights")
    artifacts = [str(fact)]
    for target in exporters.targets().values():
        if cfg.quick and target.slow:
            print(f"skip {target.name} in --quick: {target.slow}")
            continue
        dest = out / target.output_name(fact.name)
        try:
            summary = exporters.export(target.name, exporters.ExportJob(
                model=fact, output=dest, weights=target.int8_weights, overwrite=True))
        except UserError as exc:
            print(f"export to {target.name} failed: {exc}; it is left out of the report")
            continue
        print(exporters.get_exporter(target.name).describe(summary))
        artifacts.append(f"{dest}@{fact}")
    print(f"exported in {time.perf_counter() - t:.0f} s")

    t = _phase(4, 4, "validate against the dense model")
    report = out / "report"
    run_validation(cfg.validate_config(dense, artifacts, report))
    print((report / "report.md").read_text())
    if not torch.cuda.is_available():
        print("cuda backend: skipped (no CUDA GPU on this machine)")
    print(f"\nbasel-edge demo finished in {(time.perf_counter() - start) / 60:.1f} min; report: {report}/report.md")
    return report
