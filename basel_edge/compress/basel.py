"""Basel (basis selection, arXiv 2405.15877) and BSI (second-order basis importance): trained compression.

Every decoder linear becomes W(c) = B diag(c ⊙ m) A + U_add V_add: the frozen full-rank bases B [out,n] and
A [n,in] of a (weighted) SVD, trainable non-negative coefficients c = w² (w initialised to sqrt(σ)), a 0/1
mask m, and `r_add` new bases that are trained like LoRA and never pruned. Training minimises the task's
causal-LM loss; after `keep_steps` steps, `prune_events` evenly spaced events shrink the masks, either per
matrix by coefficient mass (τ = K^(1/N), the paper) or towards a global parameter budget (the last event
allocates exactly with `ranks.allocate`). At the end the effective weight of each matrix is re-factored by
SVD into `a = diag(S_r) V_rᵀ`, `b = U_r` at a rank rounded to the rank multiple (exact: its rank is at most
kept + r_add).

BSI ranks the bases by the estimated loss increase of removing each, ΔL_i ≈ -g_i c_i + ½ H_ii c_i². diag(H)
comes either from symmetric ±ε Hutchinson probes of the coefficients (for Rademacher z, g(c+εz) - g(c-εz) ≈
2εHz, so z ⊙ that / 2ε estimates diag(H) and the mean of the two gradients estimates g), or from the empirical
Fisher of per-position gradient contributions (the default): on SmolLM2 a Hutchinson probe of all ~10⁵
coefficients at once is dominated by the cross terms Σ_j H_ij z_i z_j, so half its estimates are negative
even with 32 probes and the largest bases score lowest (README "Basel and BSI"); the Fisher diagonal has no
cross terms and is never negative. By default the score drops the first-order term (Optimal Brain Damage's
½ H_ii c_i²): the gradient of a few batches is mostly noise, and summing -g_i c_i over the ~60% of bases
removed at once made BSI prune bases whose removal only looked free on those batches (python-code ppl 1172
with the term, 75.6 without, keep 0.4; README).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from ..data import TokenBlocks
from ..errors import UserError
from ..lowrank import (
    DEFAULT_RANK_MULTIPLE,
    LowRankLinear,
    decoder_linears,
    low_rank_from_factors,
    max_useful_rank,
    round_rank,
    set_module,
    svd_factors,
)
from ..ranks import ALLOCATIONS, DEFAULT_KEEP, Budget, MatrixScores, allocate, uniform_ranks
from ..train import (
    DEFAULT_DENSE_LR, DEFAULT_LOSS, LOSSES, LoopConfig, Objective, fingerprint, loop_settings, step_generator, step_rows,
    train_loop,
)
from .base import Method, Weighting, decompose
from .calibration import CalibrationStats, collect
from .registry import METHODS, register

PRUNE_MODES = ("budget", "mass")
IMPORTANCES = ("coefficient", "bsi")
BSI_HESSIANS = ("fisher", "hutchinson")


@dataclass
class BaselConfig:
    """Settings of a Basel/BSI run (part 1, plus an optional part-2 fine-tuning phase).

    mode `budget` reaches `keep` of the decoder-linear parameters (new bases included), either the same
    fraction in every matrix (`allocation` uniform, the default: it beat global allocation for SVD-LLM at
    keep <= 0.6, eval/results/baselines.md) or across matrices by importance (global); mode `mass` keeps a
    fraction `mass` of each matrix's coefficient mass (the paper). `basis` names the SVD-family method
    whose (weighted) SVD supplies the frozen bases: `svd` is the paper's plain SVD; the default `svd-llm`
    (whitened) starts from a far better truncation, which matters with CPU-sized training budgets.
    """

    keep: float = DEFAULT_KEEP
    mode: str = "budget"
    mass: float = 0.5
    allocation: str = "uniform"  # measured better than global for Basel (README); loss is the SVD family's
    importance: str = "coefficient"
    basis: str = "svd-llm"
    r_add: int = 32
    rank_multiple: int = DEFAULT_RANK_MULTIPLE
    # CPU-sized: `compress --method basel` on SmolLM2-135M takes well under 30 minutes on a loaded 2-core machine
    # (about 5 s per step at one thread, README "Basel"): 160 steps of 2 rows of 256 tokens = 81,920 tokens
    steps: int = 160
    keep_steps: int | None = None
    prune_events: int = 4
    # lr 1e-2 / 1e-3: the best of the settings measured at keep 0.4 (README "Basel and BSI"); with Adam the
    # coefficients (w ~ sqrt σ) hardly move in a CPU-sized number of steps at 1e-3
    lr: float = 1e-2
    lr_add: float | None = 1e-3
    bsi_hessian: str = "fisher"
    bsi_first_order: bool = False
    bsi_probes: int = 4
    bsi_eps: float = 1e-2
    finetune_steps: int = 0
    finetune_lr: float = 1e-4
    basis_dtype: str = "auto"
    # what part 1, the BSI importances and part 2 minimise (train.LOSSES): kl and kl+ce distil from the dense model
    loss: str = DEFAULT_LOSS
    # part 1 also trains every parameter outside the decoder linears (norms, embedding), as the released Basel
    # code does (all parameters trainable), at `dense_lr`
    train_dense: bool = False
    dense_lr: float = DEFAULT_DENSE_LR

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise UserError(f"keep must be in (0, 1], got {self.keep}")
        if not 0.0 < self.mass <= 1.0:
            raise UserError(f"mass must be in (0, 1], got {self.mass}")
        if self.mode not in PRUNE_MODES:
            raise UserError(f"unknown prune mode '{self.mode}'; choose one of {', '.join(PRUNE_MODES)}")
        if self.allocation not in ALLOCATIONS:
            raise UserError(f"unknown allocation '{self.allocation}'; choose one of {', '.join(ALLOCATIONS)}")
        if self.allocation == "loss":
            raise UserError("--allocation loss is for the SVD-family methods; basel and bsi prune by their own "
                            "importances (bsi's is a loss increase already): use uniform or global")
        if self.importance not in IMPORTANCES:
            raise UserError(f"unknown importance '{self.importance}'; choose one of {', '.join(IMPORTANCES)}")
        if self.basis not in METHODS or getattr(METHODS[self.basis], "trainable", False):
            bases = sorted(n for n, m in METHODS.items() if not getattr(m, "trainable", False))
            raise UserError(f"unknown basis '{self.basis}'; choose one of {', '.join(bases)}")
        if self.r_add < 0 or self.rank_multiple < 1:
            raise UserError("r_add must be >= 0 and the rank multiple >= 1")
        if self.steps < 1 or self.prune_events < 1:
            raise UserError("steps and prune events must be positive")
        if self.keep_steps is None:
            self.keep_steps = self.steps // 4
        if not 0 <= self.keep_steps < self.steps:
            raise UserError(f"keep steps must be in [0, steps), got {self.keep_steps} of {self.steps}")
        if self.prune_events > self.steps - self.keep_steps:
            raise UserError(
                f"{self.prune_events} pruning events do not fit in the {self.steps - self.keep_steps} steps after "
                "the keep phase; give more steps or fewer events"
            )
        rates = (self.lr, self.finetune_lr, self.dense_lr) + (() if self.lr_add is None else (self.lr_add,))
        if not all(0 < r < math.inf for r in rates):  # written so that NaN fails too
            raise UserError(f"learning rates must be positive and finite, got {', '.join(map(str, rates))}")
        if self.bsi_probes < 1 or not 0 < self.bsi_eps < math.inf:
            raise UserError("BSI needs at least one probe and a positive epsilon")
        if self.bsi_hessian not in BSI_HESSIANS:
            raise UserError(f"unknown BSI Hessian estimate '{self.bsi_hessian}'; choose one of {', '.join(BSI_HESSIANS)}")
        if self.finetune_steps < 0:
            raise UserError("finetune steps must be non-negative")
        if self.basis_dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"basis dtype must be auto, float32 or bfloat16, got {self.basis_dtype}")
        if self.loss not in LOSSES:
            raise UserError(f"unknown loss '{self.loss}'; choose one of {', '.join(LOSSES)}")

    @property
    def tau(self) -> float:
        """Per-event mass threshold: after N events a fraction K = mass of the coefficient mass is left."""
        return self.mass ** (1.0 / self.prune_events)

    def event_steps(self) -> list[int]:
        """Steps before which pruning happens: the first right after the keep phase, evenly spaced, and the
        last one leaving as many steps after it as between events (so the pruned model trains too)."""
        span = self.steps - self.keep_steps
        return [self.keep_steps + (j * span) // self.prune_events for j in range(self.prune_events)]


class BaselLinear(nn.Module):
    """y = B diag(w² ⊙ m) A x + U_add V_add x (+ bias), with B and A frozen buffers."""

    def __init__(self, b: torch.Tensor, a: torch.Tensor, sigma: torch.Tensor, r_add: int,
                 bias: torch.Tensor | None, generator: torch.Generator) -> None:
        super().__init__()
        out_features, n = b.shape
        self.in_features = a.shape[1]
        self.out_features = out_features
        self.register_buffer("basis_b", b)
        self.register_buffer("basis_a", a)
        self.register_buffer("mask", torch.ones(n, dtype=torch.float32, device=b.device))
        self.w = nn.Parameter(sigma.float().clamp_min(0).sqrt().to(b.device))
        self.u_add = nn.Parameter(torch.zeros(out_features, r_add, device=b.device))
        v = torch.randn(r_add, self.in_features, generator=generator) / math.sqrt(max(r_add, 1))
        self.v_add = nn.Parameter(v.to(b.device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fisher: torch.Tensor | None = None  # set to zeros to accumulate Σ_positions (∂L/∂c_i per position)²

    @property
    def n_bases(self) -> int:
        return self.mask.numel()

    def coefficients(self) -> torch.Tensor:
        """c ⊙ m, non-negative by construction (c = w²); a BSI probe substitutes c + δ for c."""
        c = self.w.square() if self.probe is None else self.probe[0] + self.probe[1]
        return c * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.basis_a, self.basis_b
        if not torch.is_autocast_enabled(x.device.type) and a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        c = self.coefficients()
        z = F.linear(x, a)
        u = z * c.to(x.dtype)
        if self.fisher is not None and u.requires_grad:
            u.register_hook(self._fisher_hook(z.detach()))
        y = F.linear(u, b)
        y = y + F.linear(F.linear(x, self.v_add), self.u_add)
        return y if self.bias is None else y + self.bias

    def _fisher_hook(self, z: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            # ∂L/∂c_i = Σ_positions z_i ∂L/∂u_i: square each position's term, sum
            self.fisher += (z * grad).float().square().flatten(0, -2).sum(0)
        return hook

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The dense weight this layer computes, in float64 on the CPU."""
        c = self.coefficients().double().cpu()
        b, a = self.basis_b.double().cpu(), self.basis_a.double().cpu()
        return (b * c[None, :]) @ a + self.u_add.double().cpu() @ self.v_add.double().cpu()

    def kept(self) -> int:
        return int(self.mask.sum())


def basel_layers(model: nn.Module) -> dict[str, BaselLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BaselLinear)}


def _basis_dtype(cfg: BaselConfig, device: torch.device) -> torch.dtype:
    """bf16 halves the frozen bases on a GPU (tensor cores, autocast); fp32 on the CPU, where bf16 matmuls
    are slower and the bases are only as large as the dense model."""
    if cfg.basis_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.basis_dtype)


def to_basel(
    model: nn.Module,
    cfg: BaselConfig,
    stats: CalibrationStats | None,
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, BaselLinear]:
    """Replace every decoder linear by a BaselLinear (full rank, all masks on) and freeze everything else."""
    method = METHODS[cfg.basis]()
    dtype = _basis_dtype(cfg, device)
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small SVDs: one thread is much faster (ARCHITECTURE.md section 7)
    try:
        for name, module in tqdm(list(decoder_linears(model).items()), desc=f"basel: {cfg.basis} SVD",
                                 unit="matrix", disable=not progress):
            w = module.weight.detach()
            weighting = method.weighting(name, w, stats) if method.needs else Weighting()
            d = decompose(w, weighting, dtype=torch.float64)
            sigma = d.scores.sqrt()
            a = d.a_full / sigma.clamp_min(1e-30)[:, None]
            layer = BaselLinear(d.b_full.to(device, dtype), a.to(device, dtype), sigma, cfg.r_add,
                                module.bias, generator)
            set_module(model, name, layer)
    finally:
        torch.set_num_threads(threads)
    return basel_layers(model)


# ---- importance ------------------------------------------------------------------------------------------


def coefficient_importance(layers: dict[str, BaselLinear]) -> dict[str, torch.Tensor]:
    """Basel: a basis matters as much as its coefficient (the bases have unit norm in the weighted space)."""
    return {n: m.coefficients().detach().float().cpu() for n, m in layers.items()}


def _loss_increase(g: torch.Tensor, h: torch.Tensor, c: torch.Tensor, first_order: bool) -> torch.Tensor:
    """ΔL_i ≈ -g_i c_i + ½ H_ii c_i² (the second term alone without `first_order`), on the CPU."""
    return ((-g * c if first_order else 0.0) + 0.5 * h * c * c).cpu()


def bsi_importance(
    model: nn.Module,
    layers: dict[str, BaselLinear],
    blocks: TokenBlocks,
    rows: torch.Tensor,
    probes: int,
    eps: float,
    generator: torch.Generator,
    amp: bool = True,
    first_order: bool = True,
    objective: Objective | None = None,
) -> dict[str, torch.Tensor]:
    """ΔL_i ≈ -g_i c_i + ½ H_ii c_i² per basis from `probes` symmetric Hutchinson probes on one batch
    (without `first_order`, ½ H_ii c_i² alone), L the training `objective` (cross-entropy by default)."""
    objective = objective or Objective()
    device = next(model.parameters()).device
    ids, labels = blocks.input_ids[rows].to(device), blocks.labels[rows].to(device)
    base = {n: m.w.detach().square().float() for n, m in layers.items()}
    scale = {n: eps * float(c[m.mask > 0].mean()) if m.kept() else eps for (n, c), m in zip(base.items(), layers.values())}
    g_sum = {n: torch.zeros_like(c) for n, c in base.items()}
    h_sum = {n: torch.zeros_like(c) for n, c in base.items()}
    was_training = model.training
    model.train()
    try:
        for _ in range(probes):
            z = {n: (torch.randint(0, 2, c.shape, generator=generator) * 2 - 1).float().to(c.device) for n, c in base.items()}
            grads = []
            for sign in (1.0, -1.0):
                leaves = {}
                for n, m in layers.items():
                    leaves[n] = base[n].clone().requires_grad_(True)
                    m.probe = (leaves[n], sign * scale[n] * z[n])
                loss = objective(model, ids, labels, amp)
                loss.backward()
                grads.append({n: leaves[n].grad.detach() for n in layers})
            for n in layers:
                g_sum[n] += 0.5 * (grads[0][n] + grads[1][n])
                h_sum[n] += z[n] * (grads[0][n] - grads[1][n]) / (2.0 * scale[n])
    finally:
        for m in layers.values():
            m.probe = None
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {n: _loss_increase(g_sum[n] / probes, h_sum[n] / probes, c, first_order) for n, c in base.items()}


def fisher_importance(
    model: nn.Module,
    layers: dict[str, BaselLinear],
    blocks: TokenBlocks,
    batches: list[torch.Tensor],
    amp: bool = True,
    first_order: bool = True,
    objective: Objective | None = None,
) -> dict[str, torch.Tensor]:
    """ΔL_i ≈ -g_i c_i + ½ H_ii c_i² per basis, g the mean gradient over `batches` and H_ii the empirical Fisher
    N Σ_t (∂L/∂c_i at position t)² (the loss, the training `objective`, is a mean over N positions, so each
    position's own gradient is N times its share)."""
    objective = objective or Objective()
    device = next(model.parameters()).device
    g_sum = {n: torch.zeros_like(m.w, dtype=torch.float32) for n, m in layers.items()}
    h_sum = {n: torch.zeros_like(m.w, dtype=torch.float32) for n, m in layers.items()}
    was_training = model.training
    model.train()
    try:
        for rows in batches:
            ids, labels = blocks.input_ids[rows].to(device), blocks.labels[rows].to(device)
            positions = int((labels[:, 1:] != -100).sum())
            for m in layers.values():
                m.fisher = torch.zeros_like(m.w, dtype=torch.float32)
            loss = objective(model, ids, labels, amp)
            grads = torch.autograd.grad(loss, [m.w for m in layers.values()])
            for (n, m), gw in zip(layers.items(), grads):
                g_sum[n] += gw.float() / (2.0 * m.w.detach().float()).where(m.w.detach() != 0, torch.ones_like(gw))
                h_sum[n] += positions * m.fisher
    finally:
        for m in layers.values():
            m.fisher = None
        model.train(was_training)
    return {n: _loss_increase(g_sum[n] / len(batches), h_sum[n] / len(batches), m.w.detach().float().square(),
                              first_order) for n, m in layers.items()}


# ---- pruning ---------------------------------------------------------------------------------------------


def mass_masks(
    importance: dict[str, torch.Tensor], coefficients: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
    tau: float,
) -> dict[str, torch.Tensor]:
    """Per matrix: keep the fewest active bases, most important first, whose coefficient mass reaches τ of
    the active mass (at least one). With importance = coefficient this is the paper's rule."""
    out = {}
    for n, mask in masks.items():
        active = torch.nonzero(mask > 0).flatten()
        order = active[torch.argsort(importance[n][active], descending=True, stable=True)]
        mass = coefficients[n][order].double().clamp_min(0)
        total = float(mass.sum())
        k = len(order) if total <= 0 else int(torch.searchsorted(mass.cumsum(0), tau * total * (1 - 1e-12))) + 1
        new = torch.zeros_like(mask)
        new[order[: max(1, min(k, len(order)))]] = 1.0
        out[n] = new
    return out


def _ranked(importance: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    active = torch.nonzero(mask > 0).flatten()
    return active[torch.argsort(importance[active], descending=True, stable=True)]


def budget_masks(
    importance: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    target_params: float,
    minimum: int,
) -> dict[str, torch.Tensor]:
    """An intermediate budget event: keep the active bases with the largest share of their matrix's
    importance per parameter until `target_params` (sum of kept·(in+out)) is spent; at least `minimum` each."""
    order, fractions, kept = {}, [], {}
    spent = 0.0
    for n, mask in masks.items():
        order[n] = _ranked(importance[n], mask)
        s = importance[n][order[n]].double().clamp_min(0)
        total = float(s.sum()) or 1.0
        cost = sum(shapes[n])
        first = min(minimum, len(order[n]))
        kept[n] = first
        spent += first * cost
        for i in range(first, len(order[n])):
            fractions.append((float(s[i]) / total / cost, n, i))
    fractions.sort(key=lambda t: -t[0])
    for _, n, i in fractions:
        cost = sum(shapes[n])
        if spent + cost > target_params:
            break
        if i == kept[n]:  # bases of one matrix enter in order of importance
            kept[n] += 1
            spent += cost
    out = {}
    for n, mask in masks.items():
        new = torch.zeros_like(mask)
        new[order[n][: kept[n]]] = 1.0
        out[n] = new
    return out


def final_budget_masks(
    importance: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    keep: float,
    r_add: int,
    multiple: int,
) -> dict[str, torch.Tensor]:
    """The last budget event: `ranks.allocate` over the active bases (ordered by importance) with the budget
    left after the new bases, so the re-factored ranks (kept + r_add, rounded) hit `keep` exactly."""
    dense = sum(i * o for i, o in shapes.values())
    reserved = sum(r_add * (i + o) for i, o in shapes.values())
    left = keep * dense - reserved
    if left <= 0:
        raise UserError(
            f"keep {keep} leaves nothing for the original bases once the {r_add} new bases per matrix are paid "
            "for; raise --keep or lower --r-add"
        )
    order = {n: _ranked(importance[n], m) for n, m in masks.items()}
    matrices = {
        n: MatrixScores(shapes[n][0], shapes[n][1], importance[n][order[n]].double().clamp_min(0)) for n in masks
    }
    try:
        ranks = allocate(Budget(keep=left / dense, rank_multiple=multiple, allocation="global"), matrices)
    except UserError:
        least = sum((multiple + r_add) * (i + o) for i, o in shapes.values()) / dense
        raise UserError(
            f"keep {keep} is too small: rank {multiple} plus the {r_add} new bases in every matrix keep {least:.3f} "
            "of the decoder-linear parameters; raise --keep or lower --rank-multiple / --r-add"
        ) from None
    out = {}
    for n, mask in masks.items():
        r = len(order[n]) if ranks[n] is None else min(ranks[n], len(order[n]))
        new = torch.zeros_like(mask)
        new[order[n][:r]] = 1.0
        out[n] = new
    return out


def uniform_budget_masks(
    importance: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    keep: float,
    r_add: int,
    multiple: int,
    events_left: int,
) -> dict[str, torch.Tensor]:
    """A budget event with uniform allocation: each matrix moves geometrically towards the rank that keeps
    `keep` of its own parameters (new bases included, rounded to the multiple), reaching it when
    `events_left` is 1; within a matrix the most important active bases stay."""
    matrices = {n: MatrixScores(i, o, torch.empty(0)) for n, (i, o) in shapes.items()}
    final = uniform_ranks(keep, matrices, multiple)
    out = {}
    for n, mask in masks.items():
        order = _ranked(importance[n], mask)
        current = len(order)
        goal = current if final[n] is None else max(1, min(current, final[n] - r_add))
        k = round(current * (goal / current) ** (1.0 / max(events_left, 1)))  # = goal at the last event
        new = torch.zeros_like(mask)
        new[order[: max(goal, k)]] = 1.0
        out[n] = new
    return out


def final_rank(layer: BaselLinear, r_add: int, multiple: int) -> int | None:
    """Rank of the re-factored layer: kept + r_add rounded up; None (stay dense) past break-even."""
    rank = round_rank(layer.kept() + r_add, multiple)
    limit = max_useful_rank(layer.in_features, layer.out_features, multiple)
    return None if limit == 0 or rank > limit else rank


@torch.no_grad()
def refactor(model: nn.Module, r_add: int, multiple: int, dtype: torch.dtype = torch.float32) -> dict[str, int | None]:
    """Replace each BaselLinear by a LowRankLinear holding the SVD of its effective weight (or a dense
    nn.Linear when the rank would pass break-even); returns the ranks."""
    ranks = {}
    for name, layer in basel_layers(model).items():
        w = layer.effective_weight()
        rank = final_rank(layer, r_add, multiple)
        bias = None if layer.bias is None else layer.bias.detach().float().cpu()
        if rank is None:
            new = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, dtype=dtype)
            new.weight.copy_(w.to(dtype))
            if bias is not None:
                new.bias.copy_(bias)
        else:
            a, b = svd_factors(w, rank)
            new = low_rank_from_factors(a.to(dtype), b.to(dtype), None if bias is None else bias.to(dtype))
        set_module(model, name, new)
        ranks[name] = rank
    return ranks


# ---- the run ---------------------------------------------------------------------------------------------


@dataclass
class BaselResult:
    """What a Basel/BSI run did."""

    ranks: dict[str, int | None]
    history: list[dict] = field(default_factory=list)
    train_tokens: int = 0
    finetune_tokens: int = 0
    resumed_from: int = 0
    last_loss: float | None = None


class Pruner:
    """Runs the pruning events of a BaselConfig on the model's BaselLinear layers; its masks are the state
    a checkpoint saves."""

    def __init__(self, model: nn.Module, cfg: BaselConfig, blocks: TokenBlocks, loop: LoopConfig,
                 objective: Objective | None = None) -> None:
        self.model, self.cfg, self.blocks, self.loop = model, cfg, blocks, loop
        self.objective = objective
        self.layers = basel_layers(model)
        self.shapes = {n: (m.in_features, m.out_features) for n, m in self.layers.items()}
        self.events = cfg.event_steps()
        self.history: list[dict] = []

    def importance(self, step: int) -> dict[str, torch.Tensor]:
        if self.cfg.importance == "coefficient":
            c = coefficient_importance(self.layers)
            # Across matrices the budget compares energies c², the (weighted) squared error a basis carries,
            # as the SVD-family methods do with σ²; within a matrix c and c² order the bases alike.
            return c if self.cfg.mode == "mass" else {n: v.square() for n, v in c.items()}
        if self.cfg.bsi_hessian == "fisher":
            probes = self.cfg.bsi_probes
            batches = [step_rows(len(self.blocks), step * probes + k, self.loop.batch_size, self.loop.seed + 1)
                       for k in range(probes)]
            return fisher_importance(self.model, self.layers, self.blocks, batches, self.loop.amp,
                                     self.cfg.bsi_first_order, self.objective)
        rows = step_rows(len(self.blocks), step, self.loop.batch_size, self.loop.seed + 1)
        gen = step_generator(self.loop.seed, step, salt=1)
        return bsi_importance(self.model, self.layers, self.blocks, rows, self.cfg.bsi_probes, self.cfg.bsi_eps, gen,
                              self.loop.amp, self.cfg.bsi_first_order, self.objective)

    def __call__(self, step: int) -> None:
        if step not in self.events:
            return
        j = self.events.index(step) + 1
        n_events = len(self.events)
        imp = self.importance(step)
        masks = {n: m.mask.detach().cpu() for n, m in self.layers.items()}
        if self.cfg.mode == "mass":
            new = mass_masks(imp, coefficient_importance(self.layers), masks, self.cfg.tau)
        elif self.cfg.allocation == "uniform":
            new = uniform_budget_masks(imp, masks, self.shapes, self.cfg.keep, self.cfg.r_add, self.cfg.rank_multiple,
                                       n_events - j + 1)
        elif j == n_events:
            new = final_budget_masks(imp, masks, self.shapes, self.cfg.keep, self.cfg.r_add, self.cfg.rank_multiple)
        else:
            start = sum(int(masks[n].sum()) * (i + o) for n, (i, o) in self.shapes.items())
            dense = sum(i * o for i, o in self.shapes.values())
            goal = max(self.cfg.keep * dense - sum(self.cfg.r_add * (i + o) for i, o in self.shapes.values()), 1.0)
            target = start * (goal / start) ** (1.0 / (n_events - j + 1)) if goal < start else start
            new = budget_masks(imp, masks, self.shapes, target, self.cfg.rank_multiple)
        for n, m in self.layers.items():
            m.mask.copy_(new[n].to(m.mask.device))
        self.history.append({"step": step, "event": j, "kept": {n: m.kept() for n, m in self.layers.items()}})

    def state(self) -> dict:
        return {"masks": {n: m.mask.detach().cpu().clone() for n, m in self.layers.items()}, "history": self.history}

    def load(self, state: dict) -> None:
        for n, m in self.layers.items():
            m.mask.copy_(state["masks"][n].to(m.mask.device))
        self.history = list(state["history"])


def run_basel(
    model: nn.Module,
    blocks: TokenBlocks,
    cfg: BaselConfig,
    loop: LoopConfig,
    calibration: TokenBlocks | None = None,
    progress: bool = True,
    on_step=None,
    teacher: nn.Module | None = None,
) -> BaselResult:
    """Part 1 (and part 2 when cfg.finetune_steps > 0) on `model` in place; it ends with LowRankLinear layers.
    `teacher`, the dense model, is needed when `cfg.loss` distils."""
    from ..train import resolve_device

    if loop.steps != cfg.steps:
        loop = LoopConfig(**{**asdict(loop), "steps": cfg.steps})
    device = resolve_device(loop.device)
    method = METHODS[cfg.basis]()
    if method.needs and calibration is None:
        raise UserError(f"basis '{cfg.basis}' needs calibration data")
    stats = collect(model, calibration, method.needs, progress=progress) if method.needs else None
    model.to(device)
    to_basel(model, cfg, stats, device, seed=loop.seed, progress=progress)
    layers = basel_layers(model)
    if cfg.mode == "budget":
        shapes = {n: (m.in_features, m.out_features) for n, m in layers.items()}
        dense = sum(i * o for i, o in shapes.values())
        least = sum((cfg.rank_multiple + cfg.r_add) * (i + o) for i, o in shapes.values()) / dense
        if least > cfg.keep:
            raise UserError(
                f"keep {cfg.keep} is too small: rank {cfg.rank_multiple} plus the {cfg.r_add} new bases in every "
                f"matrix keep {least:.3f} of the decoder-linear parameters; raise --keep or lower --r-add"
            )
    objective = Objective(cfg.loss, teacher).to(device)
    pruner = Pruner(model, cfg, blocks, loop, objective)
    lr_add = cfg.lr_add if cfg.lr_add is not None else cfg.lr
    groups = [
        {"params": [m.w for m in layers.values()], "lr": cfg.lr},
        {"params": [p for m in layers.values() for p in (m.u_add, m.v_add)], "lr": lr_add},
    ]
    outside = []
    if cfg.train_dense:
        outside = _params_outside(model, [p for m in layers.values() for p in m.parameters()])
        for p in outside:
            p.requires_grad_(True)
        groups.append({"params": outside, "lr": cfg.dense_lr})
    settings = {"basel": asdict(cfg), "loop": loop_settings(loop), "rows": len(blocks), "seq": blocks.input_ids.shape[1]}
    result = train_loop(
        model, groups, blocks, loop, fingerprint(settings), before_step=pruner,
        extra_state=(pruner.state, pruner.load), on_step=on_step, desc=f"{cfg.importance == 'bsi' and 'bsi' or 'basel'} part 1",
        progress=progress, objective=objective,
    )
    for p in outside:
        p.requires_grad_(False)
    model.to("cpu")
    ranks = refactor(model, cfg.r_add, cfg.rank_multiple)
    out = BaselResult(ranks=ranks, history=pruner.history, train_tokens=result.train_tokens,
                      resumed_from=result.resumed_from, last_loss=result.last_loss)
    if cfg.finetune_steps:
        ft_loop = LoopConfig(**{**asdict(loop), "steps": cfg.finetune_steps, "resume": False, "checkpoint_every": 0})
        ft = finetune(model, blocks, ft_loop, cfg.finetune_lr, progress=progress, objective=objective)
        out.finetune_tokens = ft.train_tokens
        out.last_loss = ft.last_loss
    objective.to("cpu")
    return out


def _params_outside(model: nn.Module, trained: list[nn.Parameter]) -> list[nn.Parameter]:
    """Every parameter of `model` not in `trained`: what `--train-dense` adds, in part 1 and part 2."""
    inside = {id(p) for p in trained}
    return [p for p in model.parameters() if id(p) not in inside]


def finetune(model: nn.Module, blocks: TokenBlocks, loop: LoopConfig, lr: float, progress: bool = True, on_step=None,
             objective: Objective | None = None, dense_lr: float | None = None):
    """Part 2: train both factors of every LowRankLinear on the task at `lr`, minimising `objective`
    (cross-entropy by default). Everything else stays frozen, unless `dense_lr` is given: then every other
    parameter (the decoder linears the rank allocation kept dense, norms, embedding) trains too, at that rate,
    as part 1's `train_dense`. Training the kept-dense linears at `lr` as well measured no better (README)."""
    objective = objective or Objective()
    from ..train import resolve_device

    device = resolve_device(loop.device)
    factors = [p for m in model.modules() if isinstance(m, LowRankLinear) for p in (m.a.weight, m.b.weight)]
    if not factors:
        raise UserError("the model has no factorized linears to fine-tune")
    outside = _params_outside(model, factors) if dense_lr is not None else []
    for p in model.parameters():
        p.requires_grad_(False)
    for p in (*factors, *outside):
        p.requires_grad_(True)
    model.to(device)
    groups = [{"params": factors, "lr": lr}] + ([{"params": outside, "lr": dense_lr}] if outside else [])
    settings = {"finetune": lr, "loop": loop_settings(loop), "rows": len(blocks), "seq": blocks.input_ids.shape[1],
                **({"loss": objective.loss} if objective.loss != "ce" else {}),
                **({"dense_lr": dense_lr} if dense_lr is not None else {})}
    try:
        return train_loop(model, groups, blocks, loop, fingerprint(settings),
                          on_step=on_step, desc="fine-tune", progress=progress, objective=objective)
    finally:
        model.to("cpu")
        objective.to("cpu")
        for p in (*factors, *outside):
            p.requires_grad_(False)


class _Trained(Method):
    """A method that trains on the task; `basel-edge compress` runs it through `run_basel`."""

    trainable: ClassVar[bool] = True
    importance: ClassVar[str] = "coefficient"

    def weighting(self, name, weight, stats):
        raise UserError(f"'{self.name}' is a trained method; run it with `basel-edge compress --method {self.name}`")


@register
class Basel(_Trained):
    name = "basel"
    description = "trained basis coefficients + new bases, progressive pruning (Basel)"
    importance = "coefficient"


@register
class BSI(_Trained):
    name = "bsi"
    description = "Basel training, bases ranked by second-order loss increase (Hutchinson diag H)"
    importance = "bsi"


def default_checkpoint_dir(output: Path) -> Path:
    """Training state lives beside the output directory, so a resumed run finds it."""
    return output.parent / f".{output.name}.train"
