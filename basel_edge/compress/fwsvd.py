"""FWSVD (Hsu et al. 2022): weight output rows by the square root of their Fisher information."""

from .base import Method, Weighting
from .registry import register


@register
class FWSVD(Method):
    name = "fwsvd"
    needs = frozenset({"fisher"})
    description = "Fisher-weighted SVD (rows scaled by sqrt of summed squared gradients)"

    def weighting(self, name, weight, stats):
        f = stats.fisher[name].double().sqrt()
        floor = max(float(f.max()) * 1e-6, 1e-12)
        return Weighting(left=f.clamp_min(floor))
