"""The one code path every SVD-family method shares.

A method only says how to weight the matrix before the SVD: W' = diag(l) · W · R, with a left scaling `l`
over output rows and a right transform `R` over inputs (a diagonal vector or a lower-triangular matrix).
Then W' = U S Vᵀ, and the rank-r factors are a = S_r V_rᵀ R⁻¹ [r, in] and b = diag(1/l) U_r [out, r].
The squared singular values of W' are the importance of each basis for rank allocation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .calibration import CalibrationStats


@dataclass
class Weighting:
    """How a method weights W before the SVD; None means identity."""

    left: torch.Tensor | None = None
    right: torch.Tensor | None = None


@dataclass
class Decomposition:
    """Full-rank factors ordered by importance; slicing the first r bases gives the rank-r factors."""

    a_full: torch.Tensor
    b_full: torch.Tensor
    scores: torch.Tensor

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """a [rank, in] and b [out, rank], zero-padded past the full rank (which is exact)."""
        keep = min(rank, self.scores.numel())
        a = torch.zeros(rank, self.a_full.shape[1], dtype=self.a_full.dtype)
        b = torch.zeros(self.b_full.shape[0], rank, dtype=self.b_full.dtype)
        a[:keep] = self.a_full[:keep]
        b[:, :keep] = self.b_full[:, :keep]
        return a, b


def decompose(weight: torch.Tensor, weighting: Weighting, dtype: torch.dtype = torch.float32) -> Decomposition:
    """SVD of the weighted matrix and the un-weighted full factors (computed in float64)."""
    w = weight.detach().double().cpu()
    left, right = weighting.left, weighting.right
    if left is not None:
        w = left.double()[:, None] * w
    if right is not None:
        w = w * right.double()[None, :] if right.dim() == 1 else w @ right.double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    a = s[:, None] * vh
    if right is not None:
        if right.dim() == 1:
            a = a / right.double()[None, :]
        else:
            a = torch.linalg.solve_triangular(right.double(), a, upper=False, left=False)
    b = u if left is None else u / left.double()[:, None]
    return Decomposition(a.to(dtype), b.to(dtype), (s * s).to(torch.float64))


class Method:
    """A compression method: its name, the calibration statistics it needs, and its weighting."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    description: ClassVar[str] = ""

    def weighting(self, name: str, weight: torch.Tensor, stats: CalibrationStats) -> Weighting:
        raise NotImplementedError
