"""Plain truncated SVD: keep the bases with the largest singular values."""

from .base import Method, Weighting
from .registry import register


@register
class SVD(Method):
    name = "svd"
    description = "truncated SVD of each weight"

    def weighting(self, name, weight, stats):
        return Weighting()
