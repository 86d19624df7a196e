"""What an artifact is (torch checkpoint, ONNX folder, .pte, .gguf), which engine runs it, and which torch
checkpoint holds the same weights (the reference for export fidelity)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from basel_edge.errors import UserError, read_json

EXPORT_INFO_FILE = "basel-export.json"
ENGINE_BY_KIND = {"torch": "torch", "onnx": "onnxruntime", "gguf": "llama_cpp", "pte": "executorch"}


@dataclass(frozen=True)
class Artifact:
    """One model to validate. `source` is the torch checkpoint with the same weights, when known."""

    label: str
    path: Path
    kind: str
    source: Path | None

    @property
    def engine(self) -> str:
        return ENGINE_BY_KIND[self.kind]

    def bytes_on_disk(self) -> int:
        if self.path.is_file():
            return self.path.stat().st_size
        weights = ("model.onnx", "model.onnx.data", "model.safetensors")
        return sum(f.stat().st_size for f in self.path.iterdir() if f.name in weights or f.suffix in (".pte", ".ptd"))


def traits(artifact: Artifact) -> dict:
    """Whether an artifact is factorized and its weight format, from what the exporters wrote into it."""
    if artifact.kind == "torch":
        return {"factorized": (artifact.path / "basel.json").is_file(), "weights": "fp32"}
    if artifact.kind == "gguf":
        from gguf import GGUFReader, LlamaFileType

        from exporters.gguf_format import is_lowrank_tensor

        reader = GGUFReader(artifact.path)
        field = reader.fields.get("general.file_type")
        weights = LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_").removeprefix(
            "ALL_").lower() if field else "unknown"
        return {"factorized": any(is_lowrank_tensor(t.name) for t in reader.tensors), "weights": weights}
    info = artifact.path / EXPORT_INFO_FILE if artifact.path.is_dir() else None
    if info is None or not info.is_file():
        return {"factorized": None, "weights": "unknown"}
    data = read_json(info, f"{info} is missing")
    if not isinstance(data, dict):
        raise UserError(f"{info} is not an export record (a JSON object); export the artifact again")
    return {"factorized": bool(data.get("factorized_linears")), "weights": (data.get("scheme") or {}).get("weights", "unknown")}


def _kind(path: Path) -> str:
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return "gguf"
        if suffix == ".pte":
            return "pte"
        raise UserError(f"{path}: unknown artifact type '{suffix}'; give a model folder, an ONNX folder, a .pte or a .gguf")
    if (path / "model.onnx").is_file():
        return "onnx"
    if any(path.glob("*.pte")):
        return "pte"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "torch"
    raise UserError(f"{path}: not a model folder (config.json + safetensors), an ONNX folder, a .pte or a .gguf")


def _recorded_source(path: Path) -> Path | None:
    """The source checkpoint an exporter recorded in basel-export.json (inside a folder or beside a file)."""
    info = path / EXPORT_INFO_FILE if path.is_dir() else path.with_name(path.name + "." + EXPORT_INFO_FILE)
    if info.is_file():
        data = read_json(info, f"{info} is missing")
        source = data.get("source") if isinstance(data, dict) else None
        if isinstance(source, str) and Path(source).is_dir():
            return Path(source)
    return None


def parse_artifact(spec: str) -> Artifact:
    """`PATH` or `PATH@SOURCE_DIR` (SOURCE_DIR: the torch checkpoint with the same weights)."""
    path_text, _, source_text = spec.partition("@")
    # absolute: the measuring workers run from the repository root, not the caller's folder
    path = Path(path_text).expanduser().absolute()
    if not path.exists():
        raise UserError(f"artifact {path} does not exist")
    kind = _kind(path)
    if kind == "gguf":
        from exporters.gguf_format import read_summary

        read_summary(path)  # a truncated or foreign file is refused here, before any measurement
    if source_text:
        source = Path(source_text).expanduser().absolute()
        if not source.is_dir():
            raise UserError(f"source checkpoint {source} (after '@' in {spec}) is not a folder")
    elif kind == "torch":
        source = path
    else:
        source = _recorded_source(path)
    return Artifact(label=path.name, path=path, kind=kind, source=source)
