"""The Llama family: llama and mistral (q/k/v/o and gate/up/down projections, RMSNorm before attention and
MLP). GGUF export writes llama.cpp's `llama` architecture; mistral checkpoints are not exported to GGUF (a
sliding window would need its own keys)."""

from __future__ import annotations

from dataclasses import replace

from .base import ModelFamily, register

LLAMA = register(ModelFamily(
    name="llama",
    model_types=("llama",),
    gguf_architecture="llama",
    gguf_rope_permuted={"self_attn.q_proj": "heads", "self_attn.k_proj": "kv_heads"},
))
MISTRAL = register(replace(LLAMA, name="mistral", model_types=("mistral",), gguf_architecture=None,
                           gguf_rope_permuted={}))
