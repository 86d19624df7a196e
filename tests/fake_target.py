"""A whole export target outside exporters/ and runtimes/, for tests/test_targets.py: its record, its exporter
(a copy of the checkpoint beside a `model.fake` marker) and its engine (torch eager under another name).
Importing this module registers both; nothing else in the repo names it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from basel_edge import exporters
from basel_edge import runtimes
from basel_edge.exporters import Exporter, ExportJob, Target
from basel_edge.runtimes.torch_eager import TorchRuntime

MARKER = "model.fake"


@exporters.register
class FakeExporter(Exporter):
    target = Target(
        name="fake", kind="fakekind", engine="fake_engine", engine_module=__name__,
        default_weights="fp32", int8_weights="fp32", devices=("cpu",), weight_files=("*.safetensors",),
        recognise=lambda path: path.is_dir() and (path / MARKER).is_file(),
        traits=lambda path: {"factorized": (path / "basel.json").is_file(), "weights": "fp32"},
    )
    description = "a copy of the checkpoint, for the registry test"

    @dataclass(frozen=True)
    class Options:
        fake_note: str = ""

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--fake-note", default=cls.Options.fake_note, help="written into the marker (fake target)")

    def run(self, job: ExportJob, log=print) -> dict:
        from basel_edge.models import resolve_model

        shutil.copytree(resolve_model(job.model).path, job.output)
        (Path(job.output) / MARKER).write_text((job.options or self.Options()).fake_note)
        return {"output": str(job.output), "bytes": self.target.bytes_on_disk(Path(job.output))}


@runtimes.register
class FakeRuntime(TorchRuntime):
    engine = "fake_engine"

    def info(self) -> dict:
        return {**super().info(), "engine": self.engine}
