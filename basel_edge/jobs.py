"""Typed jobs behind the commands that write a factorized checkpoint: compress and finetune (ARCHITECTURE.md
section 2).

Each job is a small dataclass validated where it is made; `compress_checkpoint` and `finetune_checkpoint`
load the model and the task data, run, write the checkpoint atomically and return a summary. The CLI parses argv
once into these jobs and the demo builds them directly, so neither goes through the other.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .models import DEFAULT_MODEL
from .compress.calibration import DEFAULT_CALIB_BATCH
from .data import DEFAULT_TRAIN_ROWS, TRAIN_ROWS
from .ranks import DEFAULT_KEEP, Budget
from .train import DEFAULT_FINETUNE_SCHEDULE, DEFAULT_LOSS

if TYPE_CHECKING:
    from .compress.basel import BaselConfig
    from .compress.error_aware import ErrorAwareConfig
    from .data import TaskData, TokenBlocks
    from .train import LoopConfig

DEFAULT_SEQ_LEN = 512  # tokens per packed row of calibration and evaluation data
DEFAULT_CALIB_TOKENS = 16384
DEFAULT_METHOD = "svd-llm"
DEFAULT_TRAIN_SEQ_LEN = 256  # rows of the trained methods and of fine-tuning
DEFAULT_TRAIN_BATCH = 2
DEFAULT_CHECKPOINT_EVERY = 10  # steps between saved training states of the trained methods (resume after a kill)


@dataclass(frozen=True)
class DataSource:
    """The task data of a job: a built-in `task` or a user's `data` path, packed into rows of `seq_len`."""

    task: str | None = None
    data: Path | None = None
    seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.task is None) == (self.data is None):
            raise UserError("give the task data one way: a built-in task or a data path")
        if self.seq_len <= 0:
            raise UserError(f"the row length must be positive, got {self.seq_len}")

    def load(self) -> TaskData:
        from .data import load_task

        return load_task(self.task, self.data, seed=self.seed)


@dataclass(frozen=True)
class CompressJob:
    """An SVD-family compression (svd, svd-llm, asvd, fwsvd): `budget` says how much to keep, the task's
    calibration rows feed the whitening, loss-aware ranks and the optional error-aware refit."""

    output: Path
    data: DataSource
    model: str = DEFAULT_MODEL
    method: str = DEFAULT_METHOD
    budget: Budget = field(default_factory=lambda: Budget(keep=DEFAULT_KEEP))
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    error_aware: ErrorAwareConfig | None = None
    batch_size: int = DEFAULT_CALIB_BATCH
    threads: int | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        from .compress import get_method

        if getattr(get_method(self.method), "trainable", False):
            raise UserError(f"'{self.method}' is a trained method; it runs as a TrainedCompressJob")
        if self.calib_tokens <= 0 or self.batch_size <= 0:
            raise UserError("calibration tokens and batch size must be positive")


@dataclass(frozen=True)
class TrainedCompressJob:
    """Basel or BSI (`basel.importance` says which): part 1 learns the coefficients of frozen bases on
    `train_tokens` of task rows and prunes, part 2 optionally fine-tunes; `loop.checkpoint_dir` defaults to a
    folder beside the output so that a resumed run finds it."""

    output: Path
    data: DataSource
    basel: BaselConfig
    loop: LoopConfig
    model: str = DEFAULT_MODEL
    train_seq_len: int = DEFAULT_TRAIN_SEQ_LEN
    train_tokens: int | None = None
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    threads: int | None = None  # one unless asked: on a shared 2-core machine two made a step ~13x slower
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        from .compress.basel import default_checkpoint_dir

        if self.loop.checkpoint_dir is None:
            object.__setattr__(self, "loop", replace(self.loop, checkpoint_dir=default_checkpoint_dir(self.output)))
        if self.train_seq_len <= 0 or (self.train_tokens is not None and self.train_tokens <= 0):
            raise UserError("training row length and tokens must be positive")

    @property
    def method(self) -> str:
        return "bsi" if self.basel.importance == "bsi" else "basel"


@dataclass(frozen=True)
class FinetuneJob:
    """Part 2 on any factorized checkpoint `model`: both factors of every factorized linear train on the task
    (`loss` ce), against the dense `teacher` (kl), or both (kl+ce); with `dense_lr` every other parameter too."""

    model: str
    output: Path
    data: DataSource
    steps: int = 40
    lr: float = 1e-4
    schedule: str = DEFAULT_FINETUNE_SCHEDULE
    batch_size: int = DEFAULT_TRAIN_BATCH
    train_tokens: int | None = None
    loss: str = DEFAULT_LOSS
    teacher: str | None = None  # default: the model the checkpoint was compressed from
    train_rows: str = DEFAULT_TRAIN_ROWS  # data.TRAIN_ROWS
    dense_lr: float | None = None  # also train every other parameter (kept-dense linears, norms, embedding)
    device: str = "auto"
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the training step (LoopConfig.compile)
    threads: int | None = None  # one unless asked, as TrainedCompressJob
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        from .train import LOSSES

        if self.loss not in LOSSES:
            raise UserError(f"unknown loss '{self.loss}'; choose one of {', '.join(LOSSES)}")
        if self.train_rows not in TRAIN_ROWS:
            raise UserError(f"unknown training rows '{self.train_rows}'; choose one of {', '.join(TRAIN_ROWS)}")
        if not self.lr > 0:
            raise UserError(f"the learning rate must be positive, got {self.lr}")
        if self.dense_lr is not None and not self.dense_lr > 0:
            raise UserError(f"the learning rate of --train-dense must be positive, got {self.dense_lr}")
        self.loop()  # steps, batch size, schedule and device are checked once, where the loop defines them

    def loop(self) -> LoopConfig:
        """How the fine-tuning loop runs."""
        from .train import LoopConfig

        return LoopConfig(steps=self.steps, batch_size=self.batch_size, seed=self.data.seed, device=self.device,
                          grad_checkpointing=self.grad_checkpointing, schedule=self.schedule, compile=self.compile)


def _dense_source(model: str):
    from .models import resolve_model

    ref = resolve_model(model)
    if ref.factorized:
        raise UserError(f"{ref.path} is already factorized; `basel-edge merge` it first or give the dense model")
    return ref


def train_blocks(task: TaskData, tokenizer, seq_len: int, tokens: int, seed: int = 0,
                 rows: str = DEFAULT_TRAIN_ROWS) -> TokenBlocks:
    """The training rows of a `tokens` budget, as `compress` and `finetune` draw them (benchmarks use it to train
    on the same rows): packed (prompts masked), or for plain text `windows` of as many documents as rows."""
    from .data import pack, sample_windows

    if not task.train:
        raise UserError(f"task '{task.name}' is evaluation-only; give a task with training data")
    if rows == "packed":
        return pack(task.train, tokenizer, seq_len, max_tokens=tokens)
    if task.has_prompt:
        raise UserError(f"--train-rows windows cuts plain text, and task '{task.name}' has prompts; "
                        "use --train-rows packed")
    return sample_windows(task.train, tokenizer, seq_len, max(1, tokens // seq_len), seed)


def _summary(output: Path, method: str, dims, seconds: float, **extra) -> dict:
    return {"output": str(output), "method": method, "factorized_linears": len(dims.linears),
            "decoder_linear_params": dims.params,
            "kept_fraction": round(dims.params["factorized"] / dims.params["dense"], 4), "seconds": seconds, **extra}


def compress_checkpoint(job: CompressJob | TrainedCompressJob) -> dict:
    """Compress `job.model` for the job's task and write the factorized checkpoint; returns a summary (output,
    method, factorized linears, parameter counts, kept fraction, seconds; training tokens and peak RSS for the
    trained methods)."""
    if isinstance(job, TrainedCompressJob):
        return _compress_trained(job)
    import torch

    from .atomic import check_output_dir
    from .checkpoint import save_factorized
    from .compress import compress, get_method
    from .data import pack
    from .models import load_dense, load_tokenizer

    method, budget = get_method(job.method), job.budget
    check_output_dir(job.output, job.overwrite)
    if job.threads:
        torch.set_num_threads(job.threads)
    ref = _dense_source(job.model)
    task = job.data.load()
    # plain svd needs no data, but loss-aware ranks and the error-aware refit run the calibration data through it
    calibrated = bool(method.needs or job.error_aware or (budget.ranks is None and budget.allocation == "loss"))
    if calibrated and not task.train:
        hint = "" if method.needs or job.error_aware else " (or --allocation uniform, which reads no data)"
        raise UserError(f"task '{task.name}' is evaluation-only; give a task with training data for calibration{hint}")
    start = time.perf_counter()
    tokenizer = load_tokenizer(ref.path)
    model = load_dense(ref.path)
    calib = pack(task.train, tokenizer, job.data.seq_len, max_tokens=job.calib_tokens) if calibrated else None
    compress(model, method, budget, calibration=calib, progress=job.progress, batch_size=job.batch_size,
             error_aware=job.error_aware)
    ea = job.error_aware
    extra = {
        **({"error_aware": {"ls_correction": ea.correction, "local_steps": ea.local_steps,
                            "local_lr": ea.local_lr}} if ea else {}),
        "keep": budget.keep,
        "allocation": budget.allocation if budget.ranks is None else "explicit",
        "calibration_tokens": int(calib.input_ids.numel()) if calib is not None else 0,
        "source_model": str(job.model),
        "seconds": round(time.perf_counter() - start, 1),
    }
    dims = save_factorized(model, job.output, ref.path, method.name, task.name, budget.rank_multiple, extra,
                           overwrite=job.overwrite)
    return _summary(job.output, method.name, dims, extra["seconds"])


def _compress_trained(job: TrainedCompressJob) -> dict:
    import torch

    from .atomic import check_output_dir
    from .checkpoint import save_factorized
    from .compress import METHODS
    from .compress.basel import run_basel
    from .data import pack
    from .models import load_dense, load_tokenizer
    from .train import peak_rss_mib

    cfg, loop = job.basel, job.loop
    check_output_dir(job.output, job.overwrite)
    torch.set_num_threads(job.threads or 1)
    ref = _dense_source(job.model)
    task = job.data.load()
    start = time.perf_counter()
    tokenizer = load_tokenizer(ref.path)
    blocks = train_blocks(task, tokenizer, job.train_seq_len, job.train_tokens or loop.steps * loop.batch_size
                          * job.train_seq_len)
    model = load_dense(ref.path)
    calib = None
    if METHODS[cfg.basis].needs:
        calib = pack(task.train, tokenizer, job.data.seq_len, max_tokens=job.calib_tokens)
    teacher = load_dense(ref.path) if cfg.loss != "ce" else None
    result = run_basel(model, blocks, cfg, loop, calibration=calib, progress=job.progress, teacher=teacher)
    seconds = round(time.perf_counter() - start, 1)
    extra = {
        "keep": cfg.keep if cfg.mode == "budget" else None,
        "basel": asdict(cfg),
        "train_tokens": result.train_tokens,
        "finetune_tokens": result.finetune_tokens,
        "resumed_from_step": result.resumed_from,
        "final_loss": result.last_loss,
        "source_model": str(job.model),
        "seconds": seconds,
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    dims = save_factorized(model, job.output, ref.path, job.method, task.name, cfg.rank_multiple, extra,
                           overwrite=job.overwrite)
    shutil.rmtree(loop.checkpoint_dir, ignore_errors=True)
    return _summary(job.output, job.method, dims, seconds, train_tokens=result.train_tokens,
                    peak_rss_mib=extra["peak_rss_mib"])


def finetune_checkpoint(job: FinetuneJob) -> dict:
    """Fine-tune a factorized checkpoint and write it as `<method>+ft`; returns a summary (output, method,
    fine-tuning tokens, final loss, seconds, peak RSS)."""
    import torch

    from .atomic import check_output_dir
    from .checkpoint import load_factorized, read_dimension_file, save_factorized
    from .compress.basel import finetune
    from .models import load_dense, load_tokenizer, resolve_model
    from .train import Objective, peak_rss_mib

    ref = resolve_model(job.model)
    if not ref.factorized:
        raise UserError(f"{ref.path} is not a factorized checkpoint; `basel-edge compress` a model first")
    dims = read_dimension_file(ref.path)
    teacher_ref = None
    if job.loss != "ce":
        source = job.teacher or dims.extra.get("source_model")
        if not source:
            raise UserError(f"--loss {job.loss} distils from the dense model, and {ref.path} does not record it; "
                            "give --teacher DENSE_MODEL")
        teacher_ref = resolve_model(source)
        if teacher_ref.factorized:
            raise UserError(f"--teacher {source} is factorized; give the dense model it was compressed from")
    loop = job.loop()
    check_output_dir(job.output, job.overwrite)
    torch.set_num_threads(job.threads or 1)
    task = job.data.load()
    start = time.perf_counter()
    blocks = train_blocks(task, load_tokenizer(ref.path), job.data.seq_len,
                          job.train_tokens or job.steps * job.batch_size * job.data.seq_len, job.data.seed,
                          job.train_rows)
    model = load_factorized(ref.path)
    objective = Objective(job.loss, load_dense(teacher_ref.path) if teacher_ref else None)
    result = finetune(model, blocks, loop, job.lr, progress=job.progress, objective=objective, dense_lr=job.dense_lr)
    seconds = round(time.perf_counter() - start, 1)
    extra = {**dims.extra, "finetune": {"steps": job.steps, "lr": job.lr, "schedule": job.schedule,
                                        "train_rows": job.train_rows,
                                        **({"dense_lr": job.dense_lr} if job.dense_lr is not None else {}),
                                        "tokens": result.train_tokens,
                                        "loss": job.loss, **({"teacher": str(teacher_ref.path)} if teacher_ref else {}),
                                        "task": task.name, "final_loss": result.last_loss,
                                        "seconds": seconds, "peak_rss_mib": round(peak_rss_mib(), 1),
                                        **({"compiled": result.compiled} if job.compile else {})}}
    method = dims.method if dims.method.endswith("+ft") else f"{dims.method}+ft"
    save_factorized(model, job.output, ref.path, method, task.name, dims.rank_multiple, extra,
                    overwrite=job.overwrite)
    return {"output": str(job.output), "method": method, "train_tokens": result.train_tokens,
            "final_loss": result.last_loss, "seconds": seconds, "peak_rss_mib": extra["finetune"]["peak_rss_mib"]}
