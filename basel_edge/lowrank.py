"""LowRankLinear (y = B(Ax)), rank arithmetic, and model surgery on decoder linears."""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import UserError
from .families import family_of

DEFAULT_RANK_MULTIPLE = 32


class LowRankLinear(nn.Module):
    """A linear layer stored as two factors: `a` [rank, in] applied first, then `b` [out, rank] (+ bias)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.a = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.b = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def merged_weight(self) -> torch.Tensor:
        """The dense weight B·A [out, in] this layer computes."""
        return self.b.weight @ self.a.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def break_even(in_features: int, out_features: int) -> float:
    """Rank at which two factors hold as many parameters as the dense matrix: in·out/(in+out)."""
    return in_features * out_features / (in_features + out_features)


def round_rank(rank: int, multiple: int = DEFAULT_RANK_MULTIPLE) -> int:
    """Round a rank up to a multiple (Q8_0 and int8 block kernels want whole blocks of 32)."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    return int(math.ceil(rank / multiple) * multiple)


def max_useful_rank(in_features: int, out_features: int, multiple: int = DEFAULT_RANK_MULTIPLE) -> int:
    """Largest multiple of `multiple` that does not exceed break-even (0 when none does)."""
    return int(break_even(in_features, out_features) // multiple) * multiple


def check_rank(name: str, rank: int, in_features: int, out_features: int, force: bool = False) -> None:
    """Reject rank 0 and (unless forced) ranks above break-even, which would grow the layer."""
    if rank <= 0:
        raise UserError(f"{name}: rank must be positive, got {rank}")
    limit = break_even(in_features, out_features)
    if rank > limit and not force:
        raise UserError(
            f"{name}: rank {rank} is above the break-even rank {limit:.1f} of a {out_features}x{in_features} "
            "matrix, so factorizing would grow it; lower the rank, keep the layer dense, or force it"
        )


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The projections inside the decoder layers (q/k/v/o, gate/up/down: the model family says which), dense
    or already factorized."""
    pattern = family_of(model.config).decoder_linear
    return {
        name: module
        for name, module in model.named_modules()
        if pattern.match(name) and isinstance(module, (nn.Linear, LowRankLinear))
    }


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def low_rank_from_factors(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
    """Build a LowRankLinear holding the given factors a [r, in] and b [out, r]."""
    rank, in_features = a.shape
    out_features, rank_b = b.shape
    if rank_b != rank:
        raise ValueError(f"factor shapes disagree: a {tuple(a.shape)}, b {tuple(b.shape)}")
    layer = LowRankLinear(in_features, out_features, rank, bias=bias is not None, dtype=a.dtype, device=a.device)
    with torch.no_grad():
        layer.a.weight.copy_(a)
        layer.b.weight.copy_(b)
        if bias is not None:
            layer.b.bias.copy_(bias)
    return layer


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of W into a = diag(S_r)·V_rᵀ and b = U_r, zero-padded when rank > min(out, in)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    keep = min(rank, s.numel())
    a = torch.zeros(rank, weight.shape[1], dtype=torch.float64)
    b = torch.zeros(weight.shape[0], rank, dtype=torch.float64)
    a[:keep] = s[:keep, None] * vh[:keep]
    b[:, :keep] = u[:, :keep]
    return a.to(weight.dtype), b.to(weight.dtype)


@torch.no_grad()
def balance_factors_(model: nn.Module) -> int:
    """Rescale each LowRankLinear's rank dimension so row i of `a` and column i of `b` have equal norms.

    B·A is unchanged (b·D · D⁻¹·a), but the intermediate activation a·x no longer carries the singular values
    alone (first components ~σ₁, last ~σ_r). int8 kernels that quantize that activation per block (onnxruntime
    MatMulNBits accuracy_level 4, llama.cpp Q8_0) lose its small components otherwise. Returns the layers changed.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            a_norm = module.a.weight.double().norm(dim=1)
            b_norm = module.b.weight.double().norm(dim=0)
            live = (a_norm > 0) & (b_norm > 0)
            d = torch.ones_like(a_norm)
            d[live] = (a_norm[live] / b_norm[live]).sqrt()
            module.a.weight.div_(d[:, None].to(module.a.weight.dtype))
            module.b.weight.mul_(d[None, :].to(module.b.weight.dtype))
            count += 1
    return count


def untie_embeddings_(model: nn.Module) -> None:
    """Give lm_head its own weight, so exporters can quantize it and the embedding by different schemes."""
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and out.weight is emb.weight:
        out.weight = nn.Parameter(emb.weight.detach().clone())
        model.config.tie_word_embeddings = False


def merge_to_dense_(model: nn.Module) -> nn.Module:
    """Replace every LowRankLinear in `model` by an nn.Linear with weight B·A (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            dense = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.b.bias is not None,
                dtype=module.a.weight.dtype,
                device=module.a.weight.device,
            )
            with torch.no_grad():
                dense.weight.copy_(module.merged_weight())
                if module.b.bias is not None:
                    dense.bias.copy_(module.b.bias)
            set_module(model, name, dense)
    return model
