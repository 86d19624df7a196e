"""What an artifact is (a torch checkpoint, or one registered target's export), which engine runs it, and which
torch checkpoint holds the same weights (the reference for export fidelity). The targets themselves say how to
recognise their artifacts (`exporters.Target`); this module knows only the torch checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from basel_edge.errors import UserError, read_json
from basel_edge.exporters import Target, export_record, target_of, targets

# the checkpoint itself, run by torch eager: not an export target, but validated like one
TORCH_KIND, TORCH_ENGINE, TORCH_ENGINE_MODULE, TORCH_DEVICES = "torch", "torch", "basel_edge.runtimes.torch_eager", ("cpu", "cuda")


@dataclass(frozen=True)
class Artifact:
    """One model to validate. `source` is the torch checkpoint with the same weights, when known; `target` is
    the export target it came from (None: a torch checkpoint)."""

    label: str
    path: Path
    target: Target | None
    source: Path | None

    @property
    def kind(self) -> str:
        return self.target.kind if self.target else TORCH_KIND

    @property
    def engine(self) -> str:
        return self.target.engine if self.target else TORCH_ENGINE

    @property
    def engine_module(self) -> str:
        return self.target.engine_module if self.target else TORCH_ENGINE_MODULE

    @property
    def devices(self) -> tuple[str, ...]:
        return self.target.devices if self.target else TORCH_DEVICES

    def bytes_on_disk(self) -> int:
        if self.target is not None:
            return self.target.bytes_on_disk(self.path)
        return sum(f.stat().st_size for f in self.path.glob("*.safetensors"))


def traits(artifact: Artifact) -> dict:
    """Whether an artifact is factorized and its weight format, from what the exporters wrote into it."""
    if artifact.target is None:
        return {"factorized": (artifact.path / "basel.json").is_file(), "weights": "fp32"}
    return artifact.target.traits(artifact.path)


def _target(path: Path) -> Target | None:
    target = target_of(path)
    if target is not None:
        return target
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return None
    known = ", ".join(f"{t.name} ({t.suffix or 'folder'})" for t in targets().values())
    raise UserError(f"{path}: not a model folder (config.json + safetensors) nor an export of any target: {known}")


def _recorded_source(path: Path) -> Path | None:
    """The source checkpoint an exporter recorded in its export record (inside a folder or beside a file)."""
    info = export_record(path)
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
    target = _target(path)
    if target is not None and target.check is not None:
        target.check(path)
    if source_text:
        source = Path(source_text).expanduser().absolute()
        if not source.is_dir():
            raise UserError(f"source checkpoint {source} (after '@' in {spec}) is not a folder")
    elif target is None:
        source = path
    else:
        source = _recorded_source(path)
    return Artifact(label=path.name, path=path, target=target, source=source)
