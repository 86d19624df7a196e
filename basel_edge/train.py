"""The training loop that Basel (part 1) and fine-tuning (part 2) share.

Deterministic by construction so an interrupted run resumes to the same result: the rows of step s are a
function of (seed, s) only, any randomness a step needs comes from a generator seeded by (seed, s), and a
checkpoint holds the trainable tensors, the optimizer state, the caller's extra state (masks, ...) and the
torch RNG state. Checkpoints are written to a temporary file and renamed, so a kill -9 never leaves a torn one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .data import IGNORE_INDEX, TokenBlocks
from .errors import UserError

STATE_FILE = "train_state.pt"
DEVICES = ("auto", "cpu", "cuda")
# what training minimises: task cross-entropy, KL from the dense teacher's next-token distribution, or both
LOSSES = ("ce", "kl", "kl+ce")
DEFAULT_LOSS = "ce"  # measured no worse than kl at the demo's budget (README, "Compression quality")
# the learning rate over a run: held, or cosine decay from the base rate towards zero after the last step
SCHEDULES = ("constant", "cosine")
# fine-tuning decays: 24.1 against 24.5 held at the demo's keep-0.5 budget, and the base rate 1e-4 stays best
# (2e-4 with warm-up: 24.8) (README, "Compression quality")
DEFAULT_FINETUNE_SCHEDULE = "cosine"
# the rate of the parameters outside the trained low-rank ones (norms, embedding, and in part 2 the decoder
# linears kept dense) when a run trains them too (`--train-dense`)
DEFAULT_DENSE_LR = 1e-5


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; asking for CUDA without one is a user error."""
    if device not in DEVICES:
        raise UserError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 autocast pays on `device`: CUDA, or a CPU with AVX512-BF16 or AMX instructions (elsewhere
    bf16 matmuls would be emulated, so training stays fp32). Step times: eval/results/train-step.md."""
    if device.type == "cuda":
        return True
    cpu = torch.cpu
    return device.type == "cpu" and any(getattr(cpu, f, lambda: False)()
                                        for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """bf16 autocast on `device` when `amp` is asked for and the device computes bf16 natively (bf16_native)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and bf16_native(device))


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class LoopConfig:
    """How to run the optimisation: steps, batch, learning rates, device, and checkpointing."""

    steps: int
    batch_size: int = 4
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast where the device computes bf16 natively (bf16_native)
    schedule: str = "constant"  # one of SCHEDULES
    grad_checkpointing: bool = False
    # torch.compile the training forward and backward: fused elementwise kernels, a faster step once compiled
    # (eval/results/train-step.md); speed only, so not part of the fingerprint, and an eager fallback if it fails
    compile: bool = False
    checkpoint_every: int = 0
    checkpoint_dir: Path | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise UserError(f"steps must be non-negative, got {self.steps}")
        if self.batch_size <= 0:
            raise UserError(f"batch size must be positive, got {self.batch_size}")
        if self.checkpoint_every < 0:
            raise UserError(f"checkpoint interval must be non-negative, got {self.checkpoint_every}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown learning-rate schedule '{self.schedule}'; choose one of {', '.join(SCHEDULES)}")
        if (self.checkpoint_every or self.resume) and self.checkpoint_dir is None:
            raise UserError("checkpointing and --resume need a checkpoint directory")
        resolve_device(self.device)


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The learning rate of `step` (0-based) of `steps` as a fraction of the base rate: a function of the step
    alone, so a resumed run sets the same rates as an uninterrupted one."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / steps))
    return 1.0


def step_rows(n_rows: int, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices of `step`: epochs are seeded permutations of all rows, consumed batch by batch."""
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[pos]))
    return torch.tensor(out, dtype=torch.long)


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, salt)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7919 + salt)


def fingerprint(obj: dict) -> str:
    """Short hash of a run's settings, so --resume refuses a checkpoint from different settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class LoopResult:
    """What the loop did: steps run in this process, the last loss, and the tokens trained on overall."""

    steps_run: int
    resumed_from: int
    last_loss: float | None
    train_tokens: int
    compiled: bool = False  # steps ran under torch.compile (asked for, and it did not fail)


def _save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(checkpoint_dir: Path, expect: str) -> dict | None:
    """The saved state of a run with fingerprint `expect`, or None when there is none yet."""
    path = checkpoint_dir / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != expect:
        raise UserError(
            f"{path} was written by a run with different settings; resume with the same arguments or delete it"
        )
    return state


def batch_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, amp: bool) -> torch.Tensor:
    """Causal-LM cross-entropy (HF shifts the labels; -100 marks prompt and padding)."""
    device = ids.device
    with autocast(device, amp):
        return model(input_ids=ids, labels=labels, use_cache=False).loss


class Objective:
    """The training loss on one batch: task cross-entropy (`ce`), distillation (`kl`: KL(teacher ‖ model) of the
    next-token distributions, Minitron's logit-only distillation), or their sum (`kl+ce`), all averaged over the
    positions the labels score. The teacher (the dense model) is frozen and runs without gradients."""

    def __init__(self, loss: str = DEFAULT_LOSS, teacher: nn.Module | None = None) -> None:
        if loss not in LOSSES:
            raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if loss != "ce" and teacher is None:
            raise UserError(f"--loss {loss} distils from the dense model, and none was given")
        self.loss = loss
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None and loss != "ce" else None

    def to(self, device: torch.device) -> "Objective":
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    def check(self, model: nn.Module) -> None:
        """Refuse a teacher whose vocabulary is not the model's (its distribution would be over other tokens)."""
        if self.teacher is not None:
            theirs, ours = self.teacher.get_output_embeddings().out_features, model.get_output_embeddings().out_features
            if theirs != ours:
                raise UserError(f"the teacher predicts {theirs} tokens and the model {ours}; distil from the dense "
                                "model this one was compressed from")

    def __call__(self, model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, amp: bool) -> torch.Tensor:
        if self.teacher is None:
            return batch_loss(model, ids, labels, amp)
        device = ids.device
        with autocast(device, amp):
            with torch.no_grad():
                target = self.teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
            out = model(input_ids=ids, labels=labels if self.loss == "kl+ce" else None, use_cache=False)
        scored = labels[:, 1:] != IGNORE_INDEX
        student = torch.log_softmax(out.logits[:, :-1].float()[scored], dim=-1)
        teacher = torch.log_softmax(target[scored], dim=-1)
        kl = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")
        return kl + out.loss if self.loss == "kl+ce" else kl


def _compile_failed(err: Exception) -> None:
    first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
    tqdm.write(f"basel-edge: torch.compile failed ({first[:160]}); training without it")


def train_loop(
    model: nn.Module,
    param_groups: list[dict],
    blocks: TokenBlocks,
    cfg: LoopConfig,
    run_fingerprint: str,
    before_step: Callable[[int], None] | None = None,
    extra_state: tuple[Callable[[], dict], Callable[[dict], None]] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    desc: str = "train",
    progress: bool = True,
    objective: Objective | None = None,
) -> LoopResult:
    """AdamW over `param_groups` for `cfg.steps` steps on `blocks` minimising `objective` (cross-entropy by
    default), resumable from `cfg.checkpoint_dir`.

    `before_step(s)` runs before step s (pruning events); `extra_state` saves/restores what it changes.
    """
    device = next(model.parameters()).device
    objective = objective or Objective()
    objective.check(model)
    objective.to(device)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a resumed state overwrites them
    start = 0
    if cfg.resume and cfg.checkpoint_dir is not None:
        state = load_state(cfg.checkpoint_dir, run_fingerprint)
        if state is not None:
            with torch.no_grad():
                for n, t in state["params"].items():
                    named[n].copy_(t)
            optimizer.load_state_dict(state["optimizer"])
            if extra_state is not None:
                extra_state[1](state["extra"])
            torch.set_rng_state(state["rng"])
            start = int(state["step"])
    if cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    forward = torch.compile(model) if cfg.compile else model  # shares `model`'s parameters
    compiled_steps = 0
    last = None
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for step in range(start, cfg.steps):
            if before_step is not None:
                before_step(step)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * lr_factor(cfg.schedule, step, cfg.steps)
            rows = step_rows(len(blocks), step, cfg.batch_size, cfg.seed)
            ids = blocks.input_ids[rows].to(device)
            labels = blocks.labels[rows].to(device)
            try:
                loss = objective(forward, ids, labels, cfg.amp)
                loss.backward()
            except RuntimeError as err:  # torch.compile's: no C++ compiler, an unsupported op, ...
                if forward is model or not isinstance(err, torch._dynamo.exc.TorchDynamoException):
                    raise
                _compile_failed(err)
                optimizer.zero_grad(set_to_none=True)
                forward = model
                loss = objective(model, ids, labels, cfg.amp)
                loss.backward()
            compiled_steps += forward is not model
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last = float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{last:.3f}", rss=f"{peak_rss_mib():.0f}M")
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                _save_state(
                    cfg.checkpoint_dir / STATE_FILE,
                    {
                        "fingerprint": run_fingerprint,
                        "step": step + 1,
                        "params": {n: p.detach().cpu().clone() for n, p in named.items()},
                        "optimizer": optimizer.state_dict(),
                        "extra": extra_state[0]() if extra_state is not None else {},
                        "rng": torch.get_rng_state(),
                    },
                )
            if on_step is not None:
                on_step(step, last)
    finally:
        bar.close()
        model.eval()
        if cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
            model.gradient_checkpointing_disable()
    tokens = cfg.steps * cfg.batch_size * blocks.input_ids.shape[1]
    return LoopResult(steps_run=cfg.steps - start, resumed_from=start, last_loss=last, train_tokens=tokens,
                      compiled=compiled_steps > 0)


def loop_settings(cfg: LoopConfig) -> dict:
    """The parts of a LoopConfig that change the result (for the fingerprint)."""
    d = asdict(cfg)
    for k in ("checkpoint_every", "checkpoint_dir", "resume", "grad_checkpointing", "compile", "device"):
        d.pop(k)
    return d
