"""The Qwen2 family: the Llama layout with biases on q/k/v. Compression, ONNX and ExecuTorch treat it as
Llama; GGUF export (llama.cpp's `qwen2` architecture, bias after the second factor) is not written yet."""

from __future__ import annotations

from . import ModelFamily, register

QWEN2 = register(ModelFamily(name="qwen2", model_types=("qwen2",)))
