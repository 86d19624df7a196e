"""Export targets, registered by name and discovered: a new target is new files, nothing else.

A target is one `Target` record (ARCHITECTURE.md, "Targets"): its name, the engine that runs its artifacts and
the module that registers that engine, how to recognise its artifact, its default and int8 weights, the
validate backends it runs on, and whether the artifact is a file or a folder. A target module defines an
`Exporter` subclass with that record as `target` and decorates it with `@register`. Every module of this package
is imported on the first registry query (the engine libraries themselves are imported only when exporting), so
`basel-edge export`, `validate` and the demo see a new module without any table being edited; a module elsewhere
(a plug-in, a test) registers the same way when it is imported.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar

from basel_edge.checkpoint import EXPORT_INFO_FILE
from basel_edge.errors import UserError
from basel_edge.runtimes import DEVICES

EXPORTERS: dict[str, type["Exporter"]] = {}
_discovered = False


def export_record(path: Path) -> Path:
    """Where the export record of artifact `path` lives: inside a folder, or beside a file."""
    return path / EXPORT_INFO_FILE if path.is_dir() else path.with_name(path.name + "." + EXPORT_INFO_FILE)


def recorded_traits(path: Path) -> dict:
    """Whether an exported artifact is factorized and its weight format, from the export record beside it."""
    from basel_edge.errors import read_json

    info = export_record(path)
    if not info.is_file():
        return {"factorized": None, "weights": "unknown"}
    data = read_json(info, f"{info} is missing")
    if not isinstance(data, dict):
        raise UserError(f"{info} is not an export record (a JSON object); export the artifact again")
    return {"factorized": bool(data.get("factorized_linears")), "weights": (data.get("scheme") or {}).get("weights", "unknown")}


@dataclass(frozen=True)
class Target:
    """Everything the tool knows about one export target; exporters, `validate` and the demo read only this."""

    name: str  # --target NAME
    kind: str  # the artifact kind that reports name (onnx, pte, gguf)
    engine: str  # the runtime engine that runs the artifact (runtimes registry)
    engine_module: str  # the module that registers that engine (the measuring worker imports it)
    default_weights: str
    int8_weights: str  # the 8-bit format the demo and the same-format comparisons use
    recognise: Callable[[Path], bool]  # whether a path on disk is this target's artifact
    devices: tuple[str, ...] = ("cpu",)  # the validate backends it runs on
    suffix: str | None = None  # the file suffix when the artifact is one file; None: a folder
    weight_files: tuple[str, ...] = ()  # a folder artifact: the patterns of its weight files (its size on disk)
    traits: Callable[[Path], dict] = recorded_traits  # {"factorized": bool | None, "weights": str}
    check: Callable[[Path], None] | None = None  # refuse a broken artifact before any measurement
    validates_after_export: bool = False  # the export runs its own checks (--no-validate skips them)
    slow: str | None = None  # why the demo's --quick leaves it out

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"target name {self.name!r} must be a plain word")
        unknown = set(self.devices) - set(DEVICES)
        if unknown or not self.devices:
            raise ValueError(f"target {self.name}: devices must be some of {DEVICES}, got {self.devices}")
        if self.suffix is not None and not self.suffix.startswith("."):
            raise ValueError(f"target {self.name}: suffix {self.suffix!r} must start with a dot")

    def bytes_on_disk(self, path: Path) -> int:
        """The artifact's weights on disk (tokenizer, config and records not counted)."""
        if path.is_file():
            return path.stat().st_size
        return sum(f.stat().st_size for pattern in self.weight_files for f in path.glob(pattern) if f.is_file())

    def output_name(self, stem: str) -> str:
        """The artifact's file or folder name for a model named `stem` (NAME.gguf, NAME-onnx)."""
        return stem + self.suffix if self.suffix else f"{stem}-{self.name}"


@dataclass(frozen=True)
class ExportJob:
    """What every target's export is asked: the model, the output, the weight format (None: the target's
    default), what stays 8-bit in a 4-bit format, whether to run the target's own checks afterwards, and the
    target's own `options` (its `Exporter.Options`; None: their defaults). The CLI parses argv into one of
    these; the demo and other library callers build it directly."""

    model: str | Path
    output: Path
    weights: str | None = None
    keep_8bit: tuple[str, ...] = ()
    validate: bool = True
    overwrite: bool = False
    progress: bool = True
    options: Any = None

    def __post_init__(self) -> None:
        check_keep_8bit(self.keep_8bit)


@dataclass(frozen=True)
class NoOptions:
    """A target without options of its own."""


class Exporter:
    """One export target: its record, its own options (a dataclass, the CLI flags made from its fields) and the
    export itself."""

    target: ClassVar[Target]
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Target-specific flags of `basel-edge export` (refused with any other --target); their dests are the
        fields of `Options`."""

    @classmethod
    def options_from(cls, values: dict[str, Any]) -> Any:
        """The target's typed options from parsed flag values by dest."""
        return cls.Options(**{f.name: values[f.name] for f in fields(cls.Options) if f.name in values})

    def run(self, job: ExportJob, log: Callable[[str], None] = print) -> dict:
        """Export `job.model` to `job.output` atomically; returns the export's summary (at least `output` and
        `bytes`), `log` takes its progress lines."""
        raise NotImplementedError

    @staticmethod
    def describe(summary: dict) -> str:
        """One line for people about a finished export."""
        return f"basel-edge: wrote {summary['output']} ({summary['bytes']} bytes)"

    def weights(self, job: ExportJob) -> str:
        return job.weights or self.target.default_weights


def export(target: str, job: ExportJob, log: Callable[[str], None] = print) -> dict:
    """Export with the registered target `target` (library entry point); returns its summary."""
    exporter = get_exporter(target)
    if job.options is not None and not isinstance(job.options, exporter.Options):
        raise UserError(f"the options of a {target} export must be {exporter.Options.__name__}, got "
                        f"{type(job.options).__name__}")
    if not job.validate and not exporter.target.validates_after_export:
        raise UserError(f"--no-validate: the {target} export runs no checks to skip")
    return exporter().run(job, log=log)


KEEP_8BIT_NAMES = ("embedding", "output")  # --keep-8bit items besides layer numbers and projections
# --keep-8bit projections (in every layer), by their HF name, with the GGUF base name llama-quantize matches
KEEP_8BIT_PROJECTIONS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def parse_keep_8bit(text: str | None) -> tuple[str, ...]:
    """`embedding,output,down_proj,0,1` -> ("embedding", "output", "down_proj", "0", "1"): what a 4-bit export
    keeps at 8 bits (the embedding, the lm_head, a projection in every layer, whole layers)."""
    if not text:
        return ()
    return check_keep_8bit(tuple(t.strip() for t in text.split(",") if t.strip()))


def check_keep_8bit(items: tuple[str, ...]) -> tuple[str, ...]:
    """Refuse --keep-8bit items that name nothing a 4-bit export could keep at 8 bits."""
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
    """Class decorator: make an exporter available under `cls.target.name`."""
    EXPORTERS[cls.target.name] = cls
    return cls


def _discover() -> None:
    """Import every module of this package once, so each target module registers itself."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules(__path__, __name__ + "."):
        importlib.import_module(info.name)


def targets() -> dict[str, Target]:
    """Every registered target by name."""
    _discover()
    return {name: cls.target for name, cls in sorted(EXPORTERS.items())}


def get_exporter(name: str) -> type[Exporter]:
    _discover()
    if name not in EXPORTERS:
        raise UserError(f"unknown export target '{name}'; available: {', '.join(sorted(EXPORTERS)) or 'none'}")
    return EXPORTERS[name]


def target_of(path: Path) -> Target | None:
    """The target whose artifact `path` is, or None (a torch checkpoint folder is no target's)."""
    return next((t for t in targets().values() if t.recognise(path)), None)

