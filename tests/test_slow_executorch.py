"""Slow: ExecuTorch export of the real SmolLM2-135M, dense int8 and factorized int8 (SVD-LLM, keep 0.5)."""

import pytest
import torch

pytest.importorskip("executorch")
pytest.importorskip("torchao")

from basel_edge.checkpoint import save_factorized  # noqa: E402
from basel_edge.compress import Budget, compress  # noqa: E402
from basel_edge.data import load_task, pack  # noqa: E402
from basel_edge.models import DEFAULT_MODEL, load_dense, load_tokenizer, resolve_model  # noqa: E402
from exporters.executorch import ExecutorchExportConfig, export_executorch  # noqa: E402
from runtimes.executorch import ExecutorchRuntime  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    torch.set_num_threads(2)
    dense = resolve_model(DEFAULT_MODEL).path
    tok = load_tokenizer(dense)
    model = load_dense(dense)
    calib = pack(load_task("python-code").train, tok, seq_len=256, max_tokens=2048)
    compress(model, "svd-llm", Budget(keep=0.5, allocation="uniform"), calib, progress=False)
    fact = tmp_path_factory.mktemp("smol") / "fact"
    save_factorized(model, fact, dense, method="svd-llm", task="python-code")
    return dense, fact, tok


@pytest.mark.parametrize("which", ["dense", "factorized"])
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
