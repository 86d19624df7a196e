"""What a model family is (`ModelFamily`), the registry of families and `family_of`; the family modules
register themselves here and `basel_edge.families` imports them (see its docstring)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import UserError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelFamily:
    """The layout of one family of HF causal LMs (names relative to a decoder layer). Projections are listed
    in the order (q, k, v, o) and (gate, up, down)."""

    name: str
    model_types: tuple[str, ...]
    attention: str = "self_attn"
    mlp: str = "mlp"
    attention_projections: tuple[str, ...] = ATTENTION_PROJECTIONS
    mlp_projections: tuple[str, ...] = MLP_PROJECTIONS
    # projection -> the projection whose input it reads (q/k/v read one tensor, so do gate/up)
    shared_inputs: Mapping[str, str] = field(default_factory=lambda: {
        "k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"})
    # the decoder layer's children (rotation checks a model against them)
    layer_children: frozenset[str] = frozenset({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"})
    attention_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    # whether rotating the residual stream is exact: not with norms after the sublayers (Gemma), whose scale
    # would have to commute with the rotation
    rotatable_residual: bool = True
    # RMSNorms scale by (norm_weight_offset + w): 0 for Llama, 1 for Gemma (GGUF stores the whole scale)
    norm_weight_offset: float = 0.0
    # the gated MLP's activation, as HF configs name it (`hidden_act` or `hidden_activation`)
    activation: str = "silu"
    gguf_architecture: str | None = None
    # "<module>.<projection>" -> which head count llama.cpp's rotary row permutation uses ("heads" / "kv_heads")
    gguf_rope_permuted: Mapping[str, str] = field(default_factory=dict)
    # writes the family's own GGUF keys (config dict, head_dim, gguf.GGUFWriter); UserError for what the
    # llama.cpp architecture cannot express
    gguf_keys: Callable[[Mapping[str, Any], int, Any], None] | None = None

    @property
    def decoder_linear(self) -> re.Pattern:
        """Full module names of the decoder linears (`model.layers.N.<module>.<projection>`)."""
        projections = "|".join((*self.attention_projections, *self.mlp_projections))
        return re.compile(rf"^model\.layers\.\d+\.({self.attention}|{self.mlp})\.({projections})$")

    def input_key(self, name: str) -> str:
        """The decoder linear whose input `name` reads too (itself when it shares none)."""
        prefix, _, projection = name.rpartition(".")
        return f"{prefix}.{self.shared_inputs.get(projection, projection)}"

    @staticmethod
    def head_dim(config: Any) -> int:
        """Size of one attention head, from an HF config object or its config.json dict."""
        get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key, None)
        return int(get("head_dim") or get("hidden_size") // get("num_attention_heads"))


FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(FAMILIES))


def gguf_architectures() -> tuple[str, ...]:
    """GGUF `general.architecture` values a registered family reads and writes."""
    return tuple(sorted({f.gguf_architecture for f in FAMILIES.values() if f.gguf_architecture}))


def family_of(config: Any, where: object = "the model") -> ModelFamily:
    """The family of an HF config (object or config.json dict); UserError naming the supported ones."""
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        archs = config.get("architectures") if isinstance(config, Mapping) else getattr(config, "architectures", None)
        raise UserError(
            f"{where}: architecture '{model_type}' ({', '.join(archs or []) or 'unknown'}) is not supported; "
            f"basel-edge supports {', '.join(supported_model_types())}"
        )
    return FAMILIES[model_type]

