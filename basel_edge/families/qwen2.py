"""The Qwen2 family: the Llama layout with biases on q/k/v. Compression, ONNX and ExecuTorch treat it as
Llama; its GGUFs are read (Qwen2.5-Coder ships as one); GGUF export (llama.cpp's `qwen2` architecture, bias
after the second factor) is not written yet."""

from __future__ import annotations

from . import ModelFamily, register

# gguf_architecture: the GGUFs of this family that basel-edge reads (and converts with transformers); the GGUF
# exporter writes `llama` only
QWEN2 = register(ModelFamily(name="qwen2", model_types=("qwen2",), gguf_architecture="qwen2"))
