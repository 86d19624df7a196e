"""Slow: `basel-edge demo --quick` end to end on the embedded SmolLM2-135M."""

import json

import pytest

from basel_edge.eval.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow


def _installed_engines() -> set[str]:
    """Engines of the registered export targets, less those --quick leaves out by design (all are installed by
    `make setup`)."""
    from basel_edge import exporters

    return {"torch"} | {t.engine for t in exporters.targets().values() if not t.slow}


def test_quick_demo_reports_torch_and_every_installed_engine(tmp_path):
    report_dir = run_demo(DemoConfig(out=tmp_path / "demo", quick=True))
    report = json.loads((report_dir / "report.json").read_text())
    rows = report["rows"]
    torch_ok = [r for r in rows if r["engine"] == "torch" and r["backend"] == "cpu" and r["status"] == "ok"]
    assert len(torch_ok) == 2  # dense baseline and the compressed checkpoint
    present = {r["engine"] for r in rows}
    assert _installed_engines() <= present
    assert all(r["status"] in ("ok", "skipped") for r in rows if r["engine"] in ("torch", "onnxruntime")), [
        (r["artifact"], r["backend"], r.get("error")) for r in rows if r["status"] == "failed"
    ]
    assert (report_dir / "report.md").is_file() and (report_dir / "accuracy_vs_size.png").stat().st_size > 0
