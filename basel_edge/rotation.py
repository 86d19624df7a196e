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
from .families import ModelFamily, family_of
from .lowrank import LowRankLinear

# per-head norms on queries and keys (Gemma 3) leave the value space free to rotate
QK_NORMS = ("q_norm", "k_norm")


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A reproducible random orthogonal n×n matrix (float64, Haar-distributed)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None]


def _first(module: nn.Module) -> nn.Linear:
    return module.a if isinstance(module, LowRankLinear) else module


def _last(module: nn.Module) -> nn.Linear:
    return module.b if isinstance(module, LowRankLinear) else module


def _is_rms_norm(norm: nn.Module, size: int, offset: float = 0.0) -> bool:
    """`(offset + weight) * x / sqrt(mean(x²) + eps)`: a norm whose scale can be folded into the next linear."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.shape != (size,) or eps is None:
        return False
    x = torch.randn(2, 3, size, generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    with torch.no_grad():
        expect = (offset + weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        return bool(torch.allclose(norm(x), expect, rtol=1e-4, atol=1e-5))


def _layers(model: nn.Module):
    config, inner = getattr(model, "config", None), getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if config is None or layers is None or len(layers) == 0:
        return None, None, ()
    try:
        return config, family_of(config), layers
    except UserError:
        return None, None, ()


def _norm_readers(layer: nn.Module, family: ModelFamily) -> list[tuple[nn.Module, list[nn.Module]]]:
    """(pre-norm, the projections reading its output) for the attention and the MLP of one decoder layer."""
    attn, mlp = getattr(layer, family.attention), getattr(layer, family.mlp)
    q, k, v, _ = (getattr(attn, n, None) for n in family.attention_projections)
    gate, up, _ = (getattr(mlp, n, None) for n in family.mlp_projections)
    return [(getattr(layer, family.attention_norm, None), [q, k, v]), (getattr(layer, family.mlp_norm, None), [gate, up])]


def _writers(layer: nn.Module, family: ModelFamily) -> tuple[nn.Module | None, nn.Module | None]:
    """The projections that write into the residual stream: o_proj and down_proj."""
    return (getattr(getattr(layer, family.attention), family.attention_projections[3], None),
            getattr(getattr(layer, family.mlp), family.mlp_projections[2], None))


def _linear(module: object) -> bool:
    return isinstance(module, (nn.Linear, LowRankLinear))


@torch.no_grad()
def fold_norms_(model: nn.Module) -> int:
    """Fold the scale of each pre-attention / pre-MLP RMSNorm (and the final one, when lm_head is untied) into the
    linears that read it, leaving the norm's scale at 1. Exact in float; per-token int8 activations then no
    longer carry the norm weights' large channels. Returns how many norms were folded."""
    config, family, layers = _layers(model)
    if family is None:
        return 0
    size, offset = config.hidden_size, family.norm_weight_offset
    pairs = [pair for layer in layers for pair in _norm_readers(layer, family)]
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(lm_head, nn.Linear) and lm_head.weight is not model.get_input_embeddings().weight:
        pairs.append((getattr(model.model, "norm", None), [lm_head]))
    count = 0
    for norm, readers in pairs:
        if not (_is_rms_norm(norm, size, offset) and all(_linear(r) for r in readers)):
            continue
        scale = offset + norm.weight.double()
        for reader in readers:
            first = _first(reader)
            first.weight.copy_((first.weight.double() * scale[None]).to(first.weight.dtype))
        norm.weight.fill_(1.0 - offset)
        count += 1
    return count


@torch.no_grad()
def rotate_value_heads_(model: nn.Module, seed: int = 0) -> int:
    """Rotate each attention head's value space: v_proj writes Q_h·v, o_proj reads each head through Q_hᵀ.
    Exact (attention mixes values linearly); skipped for attention modules with anything on the values (a
    v_norm). Returns how many layers were rotated."""
    config, family, layers = _layers(model)
    if family is None:
        return 0
    head = family.head_dim(config)
    q_head = random_orthogonal(head, seed)
    count = 0
    for layer in layers:
        attn = getattr(layer, family.attention)
        _, _, v_proj, o_proj = (getattr(attn, n, None) for n in family.attention_projections)
        children = {name for name, _ in attn.named_children()}
        if not (_linear(v_proj) and _linear(o_proj)) or not children <= {*family.attention_projections, *QK_NORMS}:
            continue
        v, o = _last(v_proj), _first(o_proj)
        v.weight.copy_(torch.einsum("ij,kjn->kin", q_head, v.weight.double().view(-1, head, v.weight.shape[1]))
                       .reshape(v.weight.shape).to(v.weight.dtype))
        if v.bias is not None:
            v.bias.copy_((v.bias.double().view(-1, head) @ q_head.T).reshape(-1).to(v.bias.dtype))
        o.weight.copy_((o.weight.double().view(o.weight.shape[0], -1, head) @ q_head.T).reshape(o.weight.shape)
                       .to(o.weight.dtype))
        count += 1
    return count


@torch.no_grad()
def rotate_ranks_(model: nn.Module, seed: int = 0) -> int:
    """Rotate the rank space of every factorized linear: `a` ← R·a, `b` ← b·Rᵀ. Exact; the intermediate a·x,
    whose first components carry the largest singular values, is spread over all rank channels before it is
    quantized per token. Returns how many linears were rotated."""
    rotations: dict[int, torch.Tensor] = {}
    count = 0
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            r = rotations.setdefault(module.rank, random_orthogonal(module.rank, seed + module.rank))
            module.a.weight.copy_((r @ module.a.weight.double()).to(module.a.weight.dtype))
            module.b.weight.copy_((module.b.weight.double() @ r.T).to(module.b.weight.dtype))
            count += 1
    return count


def rotatable(model: nn.Module) -> bool:
    """Whether `model` has a layout the residual rotation is exact for: untied embeddings, plain RMSNorms before
    attention, MLP and lm_head, nothing else in a decoder layer (a norm after a sublayer would not commute)."""
    config, family, layers = _layers(model)
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if family is None or not family.rotatable_residual or not isinstance(lm_head, nn.Linear):
        return False
    if lm_head.weight is model.get_input_embeddings().weight:
        return False  # tied: the embedding and lm_head need different transforms
    size = config.hidden_size
    if not _is_rms_norm(getattr(model.model, "norm", None), size, family.norm_weight_offset):
        return False
    for layer in layers:
        if {name for name, _ in layer.named_children()} != family.layer_children:
            return False
        for norm, readers in _norm_readers(layer, family):
            if not (_is_rms_norm(norm, size, family.norm_weight_offset) and all(_linear(r) for r in readers)):
                return False
        if not all(_linear(w) for w in _writers(layer, family)):
            return False
    return True


@torch.no_grad()
def rotate_hidden_(model: nn.Module, seed: int = 0) -> bool:
    """Fold the norms into their readers, then rotate the residual stream and each attention head's value space
    of `model` in place.

    The float function is unchanged (up to rounding). Needs untied embeddings; returns False (and leaves the
    model alone) when the layout is not one this transform is exact for.
    """
    if not rotatable(model):
        return False
    config, family, layers = _layers(model)
    fold_norms_(model)
    q = random_orthogonal(config.hidden_size, seed)

    def read(linear: nn.Linear) -> None:  # W Qᵀ
        linear.weight.copy_((linear.weight.double() @ q.T).to(linear.weight.dtype))

    def write(linear: nn.Linear) -> None:  # Q W, Q b
        linear.weight.copy_((q @ linear.weight.double()).to(linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_((q @ linear.bias.double()).to(linear.bias.dtype))

    for layer in layers:
        for _, readers in _norm_readers(layer, family):
            for module in readers:
                read(_first(module))
        for module in _writers(layer, family):
            write(_last(module))
    read(model.get_output_embeddings())
    embedding = model.get_input_embeddings()
    embedding.weight.copy_((embedding.weight.double() @ q.T).to(embedding.weight.dtype))
    rotate_value_heads_(model, seed + 1)
    return True


def prepare_for_int8_(model: nn.Module, seed: int = 0) -> tuple[str, ...]:
    """The exact transforms that make this layout's 8da8w (per-token int8 activations, per-row int8 weights)
    closest to float, applied in place; returns what was done, for the export's metadata. Where the layout
    allows it: the residual rotation (norms folded first) and the value heads. Elsewhere: the value heads and
    the rank space of factorized linears.

    Chosen by eager 8da8w against fp32 on the export's validation prompts (issue 16), SVD-LLM checkpoints:
    - Gemma-3-270M, keep 0.6 (no residual rotation): top-1 0.86 untouched, 0.87 value heads, 0.90 value heads
      and ranks; folding the norms without the rotation that spreads them puts Gemma's large (1 + w) channels
      into every reader's per-row weight scales: 0.13.
    - SmolLM2-135M, keep 0.5: 0.85 untouched, 0.87 (mean KL 0.034) rotated; adding the rank rotation gave
      0.86-0.88 but KL 0.038-0.045 over three seeds (each rotated row of `a` mixes the large and small singular
      directions, so the per-row weight scales lose the small ones), so it is left out there."""
    if rotate_hidden_(model, seed):
        return ("norm scales folded", "hidden space rotated", "value heads rotated")
    done: list[str] = []
    if rotate_value_heads_(model, seed + 1):
        done.append("value heads rotated")
    if rotate_ranks_(model, seed + 2):
        done.append("factor ranks rotated")
    return tuple(done)
