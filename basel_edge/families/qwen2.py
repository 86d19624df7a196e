"""The Qwen2 family: the Llama layout with biases on q/k/v (added after the second factor of a factorized
projection). llama.cpp's `qwen2` architecture uses NeoX rotary order, so no projection's rows are permuted for
GGUF; the patched llama.cpp runs its low-rank form."""

from __future__ import annotations

from .base import ModelFamily, register

QWEN2 = register(ModelFamily(name="qwen2", model_types=("qwen2",), gguf_architecture="qwen2"))
