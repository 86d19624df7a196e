"""The Gemma 3 text family (`gemma3_text`, e.g. Gemma-3-270M): the Llama projections, but RMSNorms that scale by
(1 + w), q/k norms inside attention, norms after attention and after the MLP as well as before them, a GELU
(tanh) gated MLP, an embedding scaled by sqrt(hidden) and sliding-window layers with their own rope base.

The norms after attention and MLP do not commute with a hidden-space rotation (`rotatable_residual=False`); only
the pre-norm folding, value-head and factor-rank rotations of basel_edge/rotation.py stay exact. llama.cpp's
`gemma3` architecture stores each norm weight as 1 + w and uses NeoX rotary order (no row permutation); the
sliding-window layers, their rope base and the head size are written as keys.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import UserError
from .base import ModelFamily, register


def _gguf_keys(config: Mapping[str, Any], head_dim: int, writer: Any) -> None:
    """Gemma 3's llama.cpp keys; refuse what the `gemma3` architecture cannot express."""
    if config.get("query_pre_attn_scalar", head_dim) != head_dim:
        raise UserError(f"query_pre_attn_scalar {config['query_pre_attn_scalar']} != head_dim {head_dim}: "
                        "llama.cpp's gemma3 scales queries by 1/sqrt(head_dim)")
    if config.get("final_logit_softcapping") or config.get("attn_logit_softcapping"):
        raise UserError("logit soft-capping is not supported by GGUF export")
    layer_types = config.get("layer_types") or []
    if config.get("sliding_window") and "sliding_attention" in layer_types:
        writer.add_sliding_window(int(config["sliding_window"]))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        local = (config.get("rope_parameters") or {}).get("sliding_attention") or {}
        if "rope_theta" in local:
            writer.add_rope_freq_base_swa(float(local["rope_theta"]))


GEMMA3 = register(ModelFamily(
    name="gemma3",
    model_types=("gemma3_text",),
    layer_children=frozenset({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm",
                              "pre_feedforward_layernorm", "post_feedforward_layernorm"}),
    attention_norm="input_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    rotatable_residual=False,
    norm_weight_offset=1.0,
    activation="gelu_pytorch_tanh",
    gguf_architecture="gemma3",
    gguf_keys=_gguf_keys,
))
