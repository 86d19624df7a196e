"""The target registry: a target defined wholly outside exporters/ and runtimes/ (tests/fake_target.py) is
exported by `basel-edge export`, recognised by `validate`, measured by its own engine in the worker process and
shown in the report, with no table anywhere edited; and a target's options belong to it."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

from basel_edge import exporters
from basel_edge import runtimes
from basel_edge.cli import main
from basel_edge.eval.artifacts import parse_artifact

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_target(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    # the measuring worker is another process: it finds tests.fake_target through PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    module = importlib.import_module("tests.fake_target")
    yield module
    exporters.EXPORTERS.pop("fake", None)
    runtimes.ENGINES.pop("fake_engine", None)
    sys.modules.pop("tests.fake_target", None)


def test_builtin_targets_are_discovered_with_their_records():
    found = exporters.targets()
    assert {"onnx", "gguf", "executorch"} <= set(found)
    assert found["gguf"].suffix == ".gguf" and found["onnx"].suffix is None
    assert "mobile" in found["executorch"].devices and "mobile" not in found["onnx"].devices
    assert {t.engine for t in found.values()} >= {"onnxruntime", "llama_cpp", "executorch"}


def test_a_target_in_its_own_module_is_exported_validated_and_reported(fake_target, tiny_llama, tiny_text_data,
                                                                        tmp_path, capsys):
    out = tmp_path / "tiny-fake"
    assert main(["export", "--target", "fake", str(tiny_llama), "-o", str(out), "--fake-note", "hello"]) == 0
    assert (out / fake_target.MARKER).read_text() == "hello"
    artifact = parse_artifact(str(out))
    assert (artifact.kind, artifact.engine, artifact.target.name) == ("fakekind", "fake_engine", "fake")
    report_dir = tmp_path / "report"
    code = main(["validate", "--baseline", str(tiny_llama), str(out), "--data", str(tiny_text_data), "--seq-len", "32",
                 "--eval-tokens", "64", "--new-tokens", "4", "--reps", "1", "--threads", "1",
                 "--backends", "cpu,mobile", "-o", str(report_dir), "--quiet"])
    assert code == 0, capsys.readouterr().err
    rows = [r for r in json.loads((report_dir / "report.json").read_text())["rows"] if r["artifact"] == out.name]
    by_backend = {r["backend"]: r for r in rows}
    assert by_backend["cpu"]["status"] == "ok", by_backend["cpu"]
    assert by_backend["cpu"]["engine"] == "fake_engine" and by_backend["cpu"]["kind"] == "fakekind"
    assert by_backend["cpu"]["perplexity"] > 1
    assert by_backend["mobile"]["status"] == "skipped"  # its record says cpu only
    assert out.name in (report_dir / "report.md").read_text()


def test_an_option_of_one_target_is_refused_with_another(fake_target, tiny_llama, tmp_path, capsys):
    dest = tmp_path / "x.gguf"
    code = main(["export", "--target", "gguf", str(tiny_llama), "-o", str(dest), "--fake-note", "x", "--opset", "17"])
    err = capsys.readouterr().err
    assert code == 2 and "--target fake" in err and "--opset" in err and err.count("\n") == 1, err
    assert not dest.exists()
    code = main(["export", "--target", "gguf", str(tiny_llama), "-o", str(dest), "--no-validate"])
    assert code == 2 and "--no-validate" in capsys.readouterr().err and not dest.exists()


def test_the_library_entry_takes_a_typed_job_and_the_targets_own_options(fake_target, tiny_llama, tmp_path):
    """What the demo calls: `exporters.export(name, ExportJob)`, no argv; a target's options are its dataclass."""
    from basel_edge.errors import UserError

    out = tmp_path / "lib-fake"
    options = fake_target.FakeExporter.Options(fake_note="typed")
    summary = exporters.export("fake", exporters.ExportJob(model=str(tiny_llama), output=out, options=options),
                               log=lambda *a: None)
    assert summary["output"] == str(out) and summary["bytes"] > 0
    assert (out / fake_target.MARKER).read_text() == "typed"
    onnx_options = exporters.get_exporter("onnx").Options()
    with pytest.raises(UserError, match="FakeExporter|Options"):
        exporters.export("fake", exporters.ExportJob(model=str(tiny_llama), output=tmp_path / "y", options=onnx_options))
    with pytest.raises(UserError, match="keep-8bit"):
        exporters.ExportJob(model=str(tiny_llama), output=tmp_path / "z", keep_8bit=("nonsense",))
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
