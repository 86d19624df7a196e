"""Export targets, registered by name: a new target is a new module that calls `register`.

Each target module defines a subclass of `Exporter` and decorates it with `@register`; `basel-edge export
--target NAME` finds it here. Modules are imported lazily so that a target whose engine is not installed
does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
from typing import ClassVar

from basel_edge.errors import UserError

# target name -> module that registers it
TARGET_MODULES: dict[str, str] = {}
EXPORTERS: dict[str, type["Exporter"]] = {}


class Exporter:
    """One export target: its CLI options and the export itself."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Target-specific options for `basel-edge export`."""

    def export(self, args: argparse.Namespace) -> int:
        """Run the export for parsed CLI arguments; return the exit status."""
        raise NotImplementedError


KEEP_8BIT_NAMES = ("embedding", "output")  # --keep-8bit items besides layer numbers and projections
# --keep-8bit projections (in every layer), by their HF name, with the GGUF base name llama-quantize matches
KEEP_8BIT_PROJECTIONS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def parse_keep_8bit(text: str | None) -> tuple[str, ...]:
    """`embedding,output,down_proj,0,1` -> ("embedding", "output", "down_proj", "0", "1"): what a 4-bit export
    keeps at 8 bits (the embedding, the lm_head, a projection in every layer, whole layers)."""
    if not text:
        return ()
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in items if t not in KEEP_8BIT_NAMES and t not in KEEP_8BIT_PROJECTIONS and not t.isdigit()]
    if bad:
        raise UserError(f"--keep-8bit: {', '.join(bad)} not understood; give embedding, output (the lm_head), "
                        f"projections ({', '.join(KEEP_8BIT_PROJECTIONS)}) and/or layer numbers")
    return items


def kept_8bit(path: tuple[str, ...], keep_8bit: tuple[str, ...]) -> bool:
    """Whether the linear at module path `path` (("model", "layers", "3", "mlp", "down_proj", ...) or
    ("lm_head",)) is one that `keep_8bit` keeps at 8 bits; the ONNX and ExecuTorch exporters share it."""
    if "output" in keep_8bit and path[:1] == ("lm_head",):
        return True
    in_layer = len(path) > 2 and path[:2] == ("model", "layers")
    return in_layer and (path[2] in keep_8bit or any(p in keep_8bit for p in path[3:] if p in KEEP_8BIT_PROJECTIONS))


def register(cls: type[Exporter]) -> type[Exporter]:
    """Class decorator: make an exporter available under `cls.name`."""
    EXPORTERS[cls.name] = cls
    return cls


def declare(name: str, module: str) -> None:
    """Tell the registry which module provides target `name` (imported on first use)."""
    TARGET_MODULES[name] = module


def get_exporter(name: str) -> type[Exporter]:
    if name not in TARGET_MODULES:
        raise UserError(f"unknown export target '{name}'; available: {', '.join(sorted(TARGET_MODULES)) or 'none'}")
    if name not in EXPORTERS:
        try:
            importlib.import_module(TARGET_MODULES[name])
        except ImportError as exc:
            raise UserError(f"export target '{name}' is not installed here ({exc}); run `make setup`") from None
    return EXPORTERS[name]


declare("onnx", "exporters.onnx")
declare("gguf", "exporters.gguf")
declare("executorch", "exporters.executorch")
