"""Rank allocation: turn a parameter budget (or explicit ranks) into one rank per decoder linear."""

from __future__ import annotations

import fnmatch
import heapq
from dataclasses import dataclass, field

import torch

from .errors import UserError
from .lowrank import DEFAULT_RANK_MULTIPLE, check_rank, max_useful_rank, round_rank

# uniform: the same fraction everywhere; global: greedy over each matrix's share of its own importance; loss:
# greedy over the importances as given (the caller scales them into estimated loss increases)
ALLOCATIONS = ("global", "uniform", "loss")
# loss measured best for the SVD-family methods on SmolLM2 at keep 0.5 and 0.4, training-free and after the same
# fine-tuning (eval/results/compress-ablation.md, README "Compression quality"); it needs calibration data. Basel
# and BSI prune by their own scores and keep their own default (BaselConfig.allocation).
DEFAULT_ALLOCATION = "loss"
DEFAULT_KEEP = 0.5  # fraction of decoder-linear parameters kept, unless told otherwise (compress, the demo, Basel)


@dataclass
class Budget:
    """How much to keep: a fraction `keep` of decoder-linear parameters, or explicit `ranks` per matrix.

    `ranks` maps a linear name or an fnmatch pattern (`*.q_proj`, `*`) to a rank, or to None to keep that
    linear dense; unmatched linears stay dense. Ranks are rounded up to `rank_multiple` and refused above
    break-even unless `force`.
    """

    keep: float | None = None
    ranks: dict[str, int | None] | None = None
    rank_multiple: int = DEFAULT_RANK_MULTIPLE
    allocation: str = DEFAULT_ALLOCATION
    force: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.ranks is None):
            raise UserError("give exactly one budget: a keep fraction or explicit ranks")
        if self.keep is not None and not (0.0 < self.keep <= 1.0):
            raise UserError(f"keep must be in (0, 1], got {self.keep}")
        if self.rank_multiple < 1:
            raise UserError(f"rank multiple must be a positive integer, got {self.rank_multiple}")
        if self.allocation not in ALLOCATIONS:
            raise UserError(f"unknown allocation '{self.allocation}'; choose one of {', '.join(ALLOCATIONS)}")
        if self.ranks is not None:
            for key, value in self.ranks.items():
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                    raise UserError(f"rank for '{key}' must be a positive integer or null (dense), got {value!r}")


@dataclass
class MatrixScores:
    """What the allocator needs to know about one matrix: its shape and basis importances (descending)."""

    in_features: int
    out_features: int
    scores: torch.Tensor

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features


def params_for(ranks: dict[str, int | None], shapes: dict[str, MatrixScores]) -> int:
    """Stored parameters of the decoder linears for given ranks (None = dense)."""
    total = 0
    for name, m in shapes.items():
        r = ranks.get(name)
        total += m.dense_params if r is None else r * (m.in_features + m.out_features)
    return total


def explicit_ranks(budget: Budget, matrices: dict[str, MatrixScores]) -> dict[str, int | None]:
    """Resolve name/pattern ranks; the most specific (exact name, then longest pattern) wins."""
    assert budget.ranks is not None
    unknown = [k for k in budget.ranks if not any(fnmatch.fnmatchcase(n, k) for n in matrices)]
    if unknown:
        raise UserError(f"rank entries match no decoder linear: {', '.join(unknown)}")
    out: dict[str, int | None] = {}
    for name, m in matrices.items():
        matches = [k for k in budget.ranks if fnmatch.fnmatchcase(name, k)]
        if not matches:
            out[name] = None
            continue
        key = name if name in matches else max(matches, key=len)
        value = budget.ranks[key]
        if value is None:
            out[name] = None
            continue
        rank = round_rank(value, budget.rank_multiple)
        check_rank(name, rank, m.in_features, m.out_features, force=budget.force)
        out[name] = rank
    return out


def uniform_ranks(keep: float, matrices: dict[str, MatrixScores], multiple: int) -> dict[str, int | None]:
    """The same kept fraction in every matrix, rounded to the nearest multiple (at least one multiple)."""
    out: dict[str, int | None] = {}
    for name, m in matrices.items():
        limit = max_useful_rank(m.in_features, m.out_features, multiple)
        target = keep * m.dense_params / (m.in_features + m.out_features)
        rank = max(multiple, int(round(target / multiple)) * multiple)
        out[name] = None if keep >= 1.0 or limit == 0 or rank > limit else rank
    return out


def global_ranks(keep: float, matrices: dict[str, MatrixScores], multiple: int,
                 normalise: bool = True) -> dict[str, int | None]:
    """Greedy global allocation: repeatedly grant the block of `multiple` bases (or the step to dense) with
    the largest share of its matrix's importance per parameter, while the budget allows.

    With `normalise`, importances are fractions of their matrix's total, so matrices of different scale
    compete evenly; without it they compete as given (estimated loss increases, `--allocation loss`). Every
    factorizable matrix gets at least one block; one too small to factorize stays dense.
    """
    budget = keep * sum(m.dense_params for m in matrices.values())
    ranks: dict[str, int | None] = {}
    spent = 0
    fractions: dict[str, torch.Tensor] = {}
    for name, m in matrices.items():
        limit = max_useful_rank(m.in_features, m.out_features, multiple)
        if limit == 0:
            ranks[name] = None
            spent += m.dense_params
            continue
        s = m.scores.double().clamp_min(0)
        total = (float(s.sum()) or 1.0) if normalise else 1.0
        padded = torch.zeros(max(limit, s.numel()), dtype=torch.float64)
        padded[: s.numel()] = s / total
        fractions[name] = padded
        ranks[name] = multiple
        spent += multiple * (m.in_features + m.out_features)
    if spent > budget + 1e-6:
        raise UserError(
            f"keep {keep} is too small: even rank {multiple} in every matrix keeps {spent / (budget / keep):.3f} "
            "of the decoder-linear parameters; raise --keep or lower --rank-multiple"
        )

    def next_step(name: str) -> tuple[float, int] | None:
        m, r = matrices[name], ranks[name]
        if r is None:
            return None
        limit = max_useful_rank(m.in_features, m.out_features, multiple)
        if r + multiple <= limit:
            return float(fractions[name][r : r + multiple].sum()), multiple * (m.in_features + m.out_features)
        return float(fractions[name][r:].sum()), m.dense_params - r * (m.in_features + m.out_features)

    heap: list[tuple[float, str]] = []
    for name in fractions:
        step = next_step(name)
        if step is not None:
            heapq.heappush(heap, (-step[0] / max(step[1], 1), name))
    while heap:
        _, name = heapq.heappop(heap)
        gain, cost = next_step(name)  # type: ignore[misc]
        if spent + cost > budget + 1e-6:
            continue
        spent += cost
        m = matrices[name]
        r = ranks[name]
        limit = max_useful_rank(m.in_features, m.out_features, multiple)
        ranks[name] = r + multiple if r + multiple <= limit else None
        step = next_step(name)
        if step is not None:
            heapq.heappush(heap, (-step[0] / max(step[1], 1), name))
    return ranks


def allocate(budget: Budget, matrices: dict[str, MatrixScores]) -> dict[str, int | None]:
    """Ranks per decoder linear for a budget (None means the linear stays dense)."""
    if budget.ranks is not None:
        return explicit_ranks(budget, matrices)
    assert budget.keep is not None
    if budget.allocation == "uniform":
        return uniform_ranks(budget.keep, matrices, budget.rank_multiple)
    return global_ranks(budget.keep, matrices, budget.rank_multiple, normalise=budget.allocation == "global")
