"""SVD-LLM (Wang et al. 2024): whiten inputs with the Cholesky factor L of XᵀX before the SVD.

With XᵀX = L Lᵀ, ‖(W − W')Xᵀ‖² = ‖(W − W')L‖², so truncating the SVD of W·L minimises the output error on the
calibration data and each dropped σᵢ² is exactly the error it adds.
"""

import torch

from .base import Method, Weighting
from .registry import register

JITTER_START = 1e-6
JITTER_TRIES = 8


def cholesky_with_jitter(gram: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a Gram matrix, adding growing diagonal jitter until it is positive definite."""
    g = gram.double()
    mean_diag = float(torch.diagonal(g).mean()) or 1.0
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    jitter = 0.0
    for attempt in range(JITTER_TRIES + 1):
        factor, info = torch.linalg.cholesky_ex(g + jitter * eye)
        if int(info) == 0:
            return factor
        jitter = mean_diag * JITTER_START * (10**attempt)
    raise ValueError("XᵀX is not positive definite even with jitter; add calibration data")


@register
class SVDLLM(Method):
    name = "svd-llm"
    needs = frozenset({"xtx"})
    description = "truncation-aware whitening by the Cholesky factor of XᵀX"

    def weighting(self, name, weight, stats):
        return Weighting(right=cholesky_with_jitter(stats.input_xtx(name)))
