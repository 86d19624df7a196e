"""Slow: ONNX export of the real SmolLM2-135M, dense int8 and factorized int8 (SVD-LLM, keep 0.5)."""

import pytest
import torch

pytest.importorskip("onnxruntime")

from basel_edge.exporters.onnx import OnnxExportConfig, export_onnx  # noqa: E402
from basel_edge.runtimes.onnxruntime import OrtRuntime  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_half):
    torch.set_num_threads(2)
    return smollm2_half


@pytest.mark.parametrize("which", ["dense", "factorized"])
def test_int8_export_loads_and_generates(smollm2, tmp_path, which):
    dense, fact, tok = smollm2
    src = dense if which == "dense" else fact
    info = export_onnx(src, tmp_path / "onnx", OnnxExportConfig(weights="int8"))
    assert info["validation"]["ok"]
    print(f"{which} int8 ONNX: {info['bytes'] / 2**20:.1f} MiB, top-1 {info['validation']['metrics']['top1_agreement']:.3f}")
    assert info["bytes"] < 0.5 * sum(f.stat().st_size for f in dense.glob("*.safetensors"))
    rt = OrtRuntime.open(tmp_path / "onnx", "cpu", threads=2)
    prompt = tok("def fibonacci(n):", add_special_tokens=False)["input_ids"]
    gen = rt.generate(prompt, 16)
    assert len(gen.token_ids) == 16
    assert tok.decode(gen.token_ids, skip_special_tokens=True).strip()
