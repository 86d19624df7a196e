"""Error-aware truncation (basel_edge/compress/error_aware.py) on tiny random models of every family."""

from __future__ import annotations

import json

import pytest
import torch

from basel_edge.cli import main
from basel_edge.compress import Budget, ErrorAwareConfig, compress
from basel_edge.data import load_data, pack
from basel_edge.errors import UserError
from basel_edge.lowrank import LowRankLinear, decoder_linears
from basel_edge.models import load_dense, load_tokenizer
from basel_edge.tiny import make_tiny_model

FAMILIES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "gemma3": ("gemma3_text", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8,
                               "layer_types": ["sliding_attention", "full_attention"]}),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    model_type, settings = FAMILIES[request.param]
    return make_tiny_model(tmp_path_factory.mktemp(request.param) / "dense", model_type, intermediate=128, **settings)


def _blocks(path, data, seq_len=64, tokens=4096):
    return pack(load_data(data).train, load_tokenizer(path), seq_len=seq_len, max_tokens=tokens)


def _compressed(path, blocks, error_aware, method="svd-llm", keep=0.4):
    model = load_dense(path)
    compress(model, method, Budget(keep=keep, rank_multiple=8, allocation="uniform"), calibration=blocks, progress=False,
             error_aware=error_aware)
    return model


def _logit_error(model, dense, blocks) -> float:
    with torch.no_grad():
        ids = blocks.input_ids
        return float((model(input_ids=ids).logits - dense(input_ids=ids).logits).square().mean())


def test_first_projections_match_plain_truncation_and_the_rest_fit_the_calibration_better(tiny, tiny_text_data):
    """Layer 0's q/k/v read the dense inputs, so their fit is plain SVD-LLM whatever the correction; everything
    after sees shifted inputs, and the full least-squares fit lowers the output error on the calibration rows."""
    blocks = _blocks(tiny, tiny_text_data)
    dense = load_dense(tiny)
    plain = _compressed(tiny, blocks, None)
    aware = _compressed(tiny, blocks, ErrorAwareConfig(correction=1.0))
    first = [f"model.layers.0.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]
    first = [n for n in first if isinstance(decoder_linears(plain)[n], LowRankLinear)]
    assert first
    for name in first:
        p, a = decoder_linears(plain)[name], decoder_linears(aware)[name]
        assert isinstance(a, LowRankLinear) and a.rank == p.rank
        assert torch.allclose(a.merged_weight(), p.merged_weight(), atol=1e-4)
    later = "model.layers.1.mlp.down_proj"
    assert not torch.allclose(decoder_linears(aware)[later].merged_weight(), decoder_linears(plain)[later].merged_weight(),
                              atol=1e-4)
    assert _logit_error(aware, dense, blocks) < 0.9 * _logit_error(plain, dense, blocks)


def test_ranks_are_those_of_the_plain_allocation(tiny, tiny_text_data):
    blocks = _blocks(tiny, tiny_text_data, tokens=1024)
    plain = _compressed(tiny, blocks, None, method="svd")
    aware = _compressed(tiny, blocks, ErrorAwareConfig(correction=0.5), method="svd")
    ranks = lambda m: {n: getattr(x, "rank", None) for n, x in decoder_linears(m).items()}  # noqa: E731
    assert ranks(aware) == ranks(plain) and any(r for r in ranks(aware).values())


def test_bad_settings_are_refused(tiny_llama):
    """(The CLI's --ls-correction values: tests/test_cli.py.)"""
    for correction in (1.5, -0.1, float("nan")):
        with pytest.raises(UserError, match="correction"):
            ErrorAwareConfig(correction=correction)
    with pytest.raises(UserError, match="calibration"):
        compress(load_dense(tiny_llama), "svd", Budget(keep=0.5), error_aware=ErrorAwareConfig())


def test_cli_records_the_setting(tiny_llama, tiny_text_data, tmp_path):
    out = tmp_path / "aware"
    assert main(["compress", "--model", str(tiny_llama), "--data", str(tiny_text_data), "--keep", "0.5",
                 "--rank-multiple", "8", "--error-aware", "--ls-correction", "0.5", "-o", str(out), "--quiet"]) == 0
    recorded = json.loads((out / "basel.json").read_text())["extra"]["error_aware"]
    assert recorded == {"ls_correction": 0.5, "local_steps": 0, "local_lr": 1e-4}


def test_local_distillation_brings_each_layer_closer_to_the_dense_one(tiny_llama, tiny_text_data):
    """A few Adam steps per layer after the closed form: lower output error on the calibration rows."""
    blocks = _blocks(tiny_llama, tiny_text_data)
    dense = load_dense(tiny_llama)
    closed = _compressed(tiny_llama, blocks, ErrorAwareConfig(correction=0.0))
    trained = _compressed(tiny_llama, blocks, ErrorAwareConfig(correction=0.0, local_steps=30, local_lr=3e-3))
    assert _logit_error(trained, dense, blocks) < 0.9 * _logit_error(closed, dense, blocks)
    assert [p.requires_grad for p in trained.parameters()] == [p.requires_grad for p in closed.parameters()]


def test_distil_layer_reduces_its_loss():
    from basel_edge.compress.error_aware import distil_layer
    from basel_edge.lowrank import low_rank_from_factors

    torch.manual_seed(0)
    target_layer = torch.nn.Linear(16, 16)
    layer = torch.nn.Sequential(low_rank_from_factors(torch.randn(4, 16) * 0.1, torch.randn(16, 4) * 0.1, None))
    xs = [torch.randn(1, 8, 16) for _ in range(2)]
    with torch.no_grad():
        ys = [target_layer(x) for x in xs]
    first = distil_layer(layer, xs, ys, [{}, {}], steps=1, lr=1e-2)
    last = distil_layer(layer, xs, ys, [{}, {}], steps=200, lr=1e-2)
    assert last < 0.5 * first
