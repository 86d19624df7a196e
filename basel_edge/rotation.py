"""Orthogonal rotation of a llama-style decoder's hidden space (QuaRot-style), exact in float.

Per-token int8 activation quantization (ExecuTorch 8da8w) sets each token's step from its largest entry, and
the normalized hidden states of these models carry a few huge channels (RMSNorm weights and massive
activations), so most entries are quantized coarsely. Rotating the residual stream by a random orthogonal Q
spreads those channels over all dimensions: RMSNorm without weight commutes with Q, so after folding each
norm's weight into the linears that read it, every reader takes `W Qᵀ`, every writer (o_proj, down_proj,
the embedding) produces `Q y`, and the float model computes the same logits. The value/output projections
get a second rotation inside each head. Factorized linears stay two matmuls: the reader's `a` factor and the
writer's `b` factor absorb the rotation.

Measured on SmolLM2-135M factorized by SVD-LLM (keep 0.5), eager 8da8w vs fp32 over the export's validation
prompts: top-1 0.815 → 0.902, mean KL 0.068 → 0.043 (issue 6).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError
from .families import family_of
from .lowrank import LowRankLinear


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A reproducible random orthogonal n×n matrix (float64, Haar-distributed)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None]


def _first(module: nn.Module) -> nn.Linear:
    return module.a if isinstance(module, LowRankLinear) else module


def _last(module: nn.Module) -> nn.Linear:
    return module.b if isinstance(module, LowRankLinear) else module


def _is_plain_rms_norm(norm: nn.Module, size: int) -> bool:
    """`weight * x / sqrt(mean(x²) + eps)`: the form whose weight can be folded into the next linear."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.shape != (size,) or eps is None:
        return False
    x = torch.randn(2, 3, size, generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    with torch.no_grad():
        expect = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        return bool(torch.allclose(norm(x), expect, rtol=1e-4, atol=1e-5))


def rotatable(model: nn.Module) -> bool:
    """Whether `model` has the llama layout rotate_hidden_ knows to be exact (else it must not be rotated)."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if config is None or layers is None or len(layers) == 0 or not isinstance(lm_head, nn.Linear):
        return False
    try:
        family = family_of(config)
    except UserError:
        return False
    if lm_head.weight is model.get_input_embeddings().weight:
        return False  # tied: the embedding and lm_head need different transforms
    size = config.hidden_size
    if not _is_plain_rms_norm(getattr(inner, "norm", None), size):
        return False
    for layer in layers:
        if {name for name, _ in layer.named_children()} != family.layer_children:
            return False  # extra norms (Gemma's post-norms, ...) would not commute with the rotation
        if not all(_is_plain_rms_norm(getattr(layer, n), size) for n in (family.attention_norm, family.mlp_norm)):
            return False
        for parent, names in ((getattr(layer, family.attention), family.attention_projections),
                              (getattr(layer, family.mlp), family.mlp_projections)):
            if not all(isinstance(getattr(parent, n, None), (nn.Linear, LowRankLinear)) for n in names):
                return False
    return True


@torch.no_grad()
def rotate_hidden_(model: nn.Module, seed: int = 0) -> bool:
    """Rotate the residual stream and each attention head's value space of `model` in place.

    The float function is unchanged (up to rounding). Needs untied embeddings; returns False (and leaves the
    model alone) when the layout is not one this transform is exact for.
    """
    if not rotatable(model):
        return False
    config, inner = model.config, model.model
    family = family_of(config)
    head = family.head_dim(config)
    q = random_orthogonal(config.hidden_size, seed)
    q_head = random_orthogonal(head, seed + 1)

    def set_weight(linear: nn.Linear, weight: torch.Tensor) -> None:
        linear.weight.copy_(weight.to(linear.weight.dtype))

    def read(linear: nn.Linear, norm_weight: torch.Tensor) -> None:  # W diag(γ) Qᵀ
        set_weight(linear, (linear.weight.double() * norm_weight.double()[None]) @ q.T)

    def write(linear: nn.Linear) -> None:  # Q W, Q b
        set_weight(linear, q @ linear.weight.double())
        if linear.bias is not None:
            linear.bias.copy_((q @ linear.bias.double()).to(linear.bias.dtype))

    for layer in inner.layers:
        attn, mlp = getattr(layer, family.attention), getattr(layer, family.mlp)
        attn_norm, mlp_norm = getattr(layer, family.attention_norm), getattr(layer, family.mlp_norm)
        q_proj, k_proj, v_proj, o_proj = (getattr(attn, n) for n in family.attention_projections)
        gate_proj, up_proj, down_proj = (getattr(mlp, n) for n in family.mlp_projections)
        for norm, readers in ((attn_norm, (q_proj, k_proj, v_proj)), (mlp_norm, (gate_proj, up_proj))):
            for module in readers:
                read(_first(module), norm.weight)
            norm.weight.fill_(1.0)
        write(_last(o_proj))
        write(_last(down_proj))
        # per head: values v → Q_h v, and o_proj reads each head's block through Q_hᵀ
        v, o = _last(v_proj), _first(o_proj)
        set_weight(v, torch.einsum("ij,kjn->kin", q_head, v.weight.double().view(-1, head, v.weight.shape[1])).reshape(v.weight.shape))
        if v.bias is not None:
            v.bias.copy_((v.bias.double().view(-1, head) @ q_head.T).reshape(-1).to(v.bias.dtype))
        set_weight(o, (o.weight.double().view(o.weight.shape[0], -1, head) @ q_head.T).reshape(o.weight.shape))
    lm_head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    read(lm_head, inner.norm.weight)
    inner.norm.weight.fill_(1.0)
    set_weight(embedding, embedding.weight.double() @ q.T)
    return True
