"""ASVD (Yuan et al. 2023): scale input channels by mean |activation|^α before the SVD."""

from .base import Method, Weighting
from .registry import register

ALPHA = 0.5


@register
class ASVD(Method):
    name = "asvd"
    needs = frozenset({"absmean"})
    description = "activation-aware SVD (input channels scaled by mean |x|^0.5)"

    def weighting(self, name, weight, stats):
        s = stats.input_absmean(name).double().pow(ALPHA)
        floor = max(float(s.max()) * 1e-6, 1e-12)
        return Weighting(right=s.clamp_min(floor))
