"""Model families: one place that says what a family of decoder models looks like (gpt-fast style).

A family module defines a `ModelFamily` and registers it for the HF `config.model_type` values it covers. Every
consumer asks `family_of(config)` instead of knowing a layout: which linears are decoder linears (lowrank),
which read the same input (calibration statistics, rotation, fused first factors), the head size (KV caches
of the ONNX and ExecuTorch exporters and runtimes), the norms the rotation folds, the GGUF architecture and
which projections llama.cpp wants in its rotary row order. A new family is one new module imported below.
"""

from .base import (  # noqa: F401  (the package's interface)
    ATTENTION_PROJECTIONS,
    FAMILIES,
    MLP_PROJECTIONS,
    ModelFamily,
    family_of,
    gguf_architectures,
    register,
    supported_model_types,
)
from . import gemma3, llama, qwen2  # noqa: E402,F401  (each registers its families)
