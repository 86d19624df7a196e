"""Slow: ExecuTorch export of the real SmolLM2-135M, factorized int8 (SVD-LLM, keep 0.5).

The dense int8 export of the same model (about 5 minutes here) is exercised by `python -m basel_edge.eval.bench_executorch`,
whose committed results (eval/results/executorch.json) record its inline validation passing; running it here
too would put CI over its 45-minute budget.
"""

import pytest
import torch

pytest.importorskip("executorch")
pytest.importorskip("torchao")

from basel_edge.exporters.executorch import ExecutorchExportConfig, export_executorch  # noqa: E402
from basel_edge.runtimes.executorch import ExecutorchRuntime  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_half):
    torch.set_num_threads(2)
    return smollm2_half


@pytest.mark.parametrize("which", ["factorized"])
def test_int8_export_loads_and_generates(smollm2, tmp_path, which):
    # issue 6: without the hidden-space rotation the factorized .pte scored top-1 0.81 vs its own eager int8
    # model and 0.80 vs fp32 (8da8w noise is amplified so much that float rounding order alone flips tokens)
    dense, fact, tok = smollm2
    src = dense if which == "dense" else fact
    info = export_executorch(src, tmp_path / "pte", ExecutorchExportConfig(weights="int8", max_seq_len=512))
    assert info["validation"]["ok"]
    metrics = info["validation"]["metrics"]
    assert ("rotation" in info["scheme"]) == (which == "factorized")
    print(f"{which} int8 .pte: {info['bytes'] / 2**20:.1f} MiB, top-1 {metrics['top1_agreement']:.3f} vs fp32, "
          f"{metrics['vs_eager_int8']['top1_agreement']:.3f} vs eager int8, "
          f"{info['export_seconds']} s {info['timings']}")
    assert info["bytes"] < 0.5 * sum(f.stat().st_size for f in dense.glob("*.safetensors"))
    for device in ("cpu", "mobile"):
        rt = ExecutorchRuntime.open(tmp_path / "pte", device)
        prompt = tok("def fibonacci(n):", add_special_tokens=False)["input_ids"]
        gen = rt.generate(prompt, 16)
        assert len(gen.token_ids) == 16
        assert tok.decode(gen.token_ids, skip_special_tokens=True).strip()
