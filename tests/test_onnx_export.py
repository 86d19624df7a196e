"""ONNX target and onnxruntime engine on tiny random Llama models."""

import json
from collections import Counter

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from conftest import torch_logits

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

from basel_edge.checkpoint import load_model, save_factorized  # noqa: E402
from basel_edge.cli import main  # noqa: E402
from basel_edge.compress import Budget, compress  # noqa: E402
from basel_edge.data import load_data, pack  # noqa: E402
from basel_edge.errors import UserError  # noqa: E402
from basel_edge.lowrank import decoder_linears  # noqa: E402
from basel_edge.models import load_dense, load_tokenizer  # noqa: E402
from basel_edge.exporters.onnx import OnnxExportConfig, export_onnx  # noqa: E402
from basel_edge.exporters.validation import compare_logits  # noqa: E402
from basel_edge.runtimes.onnxruntime import OrtRuntime  # noqa: E402

LINEARS_PER_LAYER = 7


@pytest.fixture(scope="module")
def factorized(tiny_llama, tmp_path_factory):
    model = load_dense(tiny_llama)
    compress(model, "svd", Budget(ranks={"*": 16}, rank_multiple=8), progress=False)
    out = tmp_path_factory.mktemp("onnx") / "fact"
    save_factorized(model, out, tiny_llama, method="svd", rank_multiple=8)
    return out


@pytest.fixture(scope="module")
def exported(factorized, tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-out")
    quiet = lambda *a: None  # noqa: E731
    return {
        "fp32": export_onnx(factorized, root / "fp32", OnnxExportConfig(weights="fp32"), log=quiet) and root / "fp32",
        "int8": export_onnx(factorized, root / "int8", OnnxExportConfig(weights="int8"), log=quiet) and root / "int8",
        "dense-int8": export_onnx(tiny_llama, root / "dense", OnnxExportConfig(weights="int8"), log=quiet) and root / "dense",
    }


@pytest.fixture(scope="module")
def positions(tiny_llama, tiny_text_data):
    """256 positions of real text for agreement checks."""
    blocks = pack(load_data(tiny_text_data).train, load_tokenizer(tiny_llama), seq_len=256, max_tokens=256)
    return blocks.input_ids[0].tolist()


def _by_module(path):
    graph = onnx.load(str(path / "model.onnx")).graph
    return graph, Counter((n.name.rsplit("/", 1)[0], n.op_type) for n in graph.node)


def test_fp32_factorized_matches_torch(exported, factorized, positions):
    got = OrtRuntime.open(exported["fp32"], "cpu", threads=1).logits(positions)
    ref = torch_logits(factorized, positions)
    assert got.shape == ref.shape == (256, ref.shape[1])
    assert np.abs(got - ref).max() < 1e-3


def test_int8_factorized_top1_agreement(exported, factorized, positions):
    got = OrtRuntime.open(exported["int8"], "cpu", threads=1).logits(positions)
    metrics = compare_logits(torch_logits(factorized, positions), got)
    assert metrics["positions"] == 256
    assert metrics["top1_agreement"] >= 0.98, metrics


@pytest.mark.parametrize("kind,op", [("fp32", "MatMul"), ("int8", "MatMulNBits")])
def test_two_matmuls_per_factorized_linear(exported, factorized, kind, op):
    graph, counts = _by_module(exported[kind])
    linears = list(decoder_linears(load_model(factorized)))
    assert len(linears) == 2 * LINEARS_PER_LAYER
    for name in linears:
        base = "/" + name.replace(".", "/")
        assert counts[(base + "/a", op)] == 1 and counts[(base + "/b", op)] == 1, name
        assert counts[(base, op)] == 0  # no dense matmul left for a factorized linear
    total = sum(v for (scope, o), v in counts.items() if o == op and "_proj/" in scope)
    assert total == 2 * len(linears)


def test_int8_quantizes_every_weight_and_records_scheme(exported):
    model = onnx.load(str(exported["int8"] / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    weight_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert weight_matmuls == []
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert all({a.name: a for a in n.attribute}["bits"].i == 8 for n in nbits)
    assert all({a.name: a for a in n.attribute}["accuracy_level"].i == 4 for n in nbits)
    assert all({a.name: a for a in n.attribute}["block_size"].i == 32 for n in nbits)
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits]
    assert any(inits[g.input[0]].data_type == onnx.TensorProto.INT8 for g in gathers)
    float_tables = [
        g for g in gathers
        if inits[g.input[0]].data_type == onnx.TensorProto.FLOAT and list(inits[g.input[0]].dims)[1:] != [1]
    ]
    assert float_tables == []  # only the per-row scale stays float
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["basel.weights"])["weights"] == "int8"
    assert OrtRuntime.open(exported["int8"]).info()["weights"]["weights"] == "int8"


def test_dense_int8_export_runs(exported, tiny_llama, positions):
    graph, counts = _by_module(exported["dense-int8"])
    assert counts[("/model/layers/0/self_attn/q_proj", "MatMulNBits")] == 1
    got = OrtRuntime.open(exported["dense-int8"]).logits(positions)
    assert compare_logits(torch_logits(tiny_llama, positions), got)["top1_agreement"] >= 0.98
    info = json.loads((exported["dense-int8"] / "basel-export.json").read_text())
    assert info["validation"]["ok"] and info["factorized_linears"] == 0


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_kv_cache_generation_equals_full_recompute(exported, kind, positions):
    rt = OrtRuntime.open(exported[kind], "cpu", threads=1)
    prompt = positions[:20]
    gen = rt.generate(prompt, 16)
    seq, recompute = list(prompt), []
    for _ in range(16):
        recompute.append(int(rt.logits(seq)[-1].argmax()))
        seq.append(recompute[-1])
    assert gen.token_ids == recompute
    assert gen.prefill_seconds > 0 and gen.decode_seconds > 0


def test_output_has_tokenizer_config_and_dimension_file(exported):
    names = {p.name for p in exported["int8"].iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "basel.json", "basel-export.json"} <= names
    assert not any(n.startswith(".") for n in names)


def test_corrupt_and_truncated_onnx_give_clear_errors(exported, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(exported["fp32"], bad)
    data = (bad / "model.onnx").read_bytes()
    (bad / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a loadable ONNX model"):
        OrtRuntime.open(bad)
    (bad / "model.onnx").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(UserError, match="not a loadable ONNX model"):
        OrtRuntime.open(bad)
    (bad / "model.onnx").unlink()
    with pytest.raises(UserError, match="has no model.onnx"):
        OrtRuntime.open(bad)


def test_missing_factor_is_a_clear_cli_error(factorized, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(factorized, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.0.mlp.down_proj.a.weight"]
    save_file(tensors, broken / "model.safetensors")
    code = main(["export", "--target", "onnx", str(broken), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "missing tensors" in err and "down_proj.a.weight" in err
    assert not (tmp_path / "out").exists()


def test_failed_validation_leaves_no_output(factorized, tmp_path, monkeypatch, capsys):
    import basel_edge.exporters.onnx as target

    real = target.quantize_embedding_int8

    def wrong_scale(proto):  # the class of bug validation exists for: quantized weights silently wrong
        name = real(proto)
        for init in proto.graph.initializer:
            if init.name.endswith(target.EMBED_SCALE_SUFFIX):
                arr = onnx.numpy_helper.to_array(init) * 0.0
                init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
        return name

    monkeypatch.setattr(target, "quantize_embedding_int8", wrong_scale)
    code = main(["export", "--target", "onnx", str(factorized), "-o", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert code == 2 and "validation" in out.err and "✗" in out.out
    assert list(tmp_path.iterdir()) == []


def test_bad_weights_option(capsys, factorized, tmp_path):
    code = main(["export", "--target", "onnx", str(factorized), "-o", str(tmp_path / "o"), "--weights", "q4"])
    assert code == 2 and "not an ONNX weight format" in capsys.readouterr().err


def test_unavailable_devices(exported):
    from basel_edge.runtimes import Unavailable

    with pytest.raises(Unavailable, match="mobile"):
        OrtRuntime.open(exported["fp32"], "mobile")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(Unavailable, match="CUDAExecutionProvider"):
            OrtRuntime.open(exported["fp32"], "cuda")


def test_dense_int4_quantizes_to_4_bits_but_keeps_the_lm_head_at_8(tiny_llama, exported, tmp_path, positions):
    info = export_onnx(tiny_llama, tmp_path / "int4", OnnxExportConfig(weights="int4"), log=lambda *a: None)
    assert info["validation"]["ok"] and info["scheme"]["kept_at_8_bits"] == ["output"]
    model = onnx.load(str(tmp_path / "int4" / "model.onnx"))
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert {b for name, b in bits.items() if not name.startswith("/lm_head/")} == {4}
    assert [b for name, b in bits.items() if name.startswith("/lm_head/")] == [8]
    assert not any(n.op_type == "MatMul" and n.input[1].startswith("model.") for n in model.graph.node)
    dense8 = OrtRuntime.open(exported["dense-int8"], "cpu", threads=1).logits(positions)
    dense4 = OrtRuntime.open(tmp_path / "int4", "cpu", threads=1).logits(positions)
    reference = torch_logits(tiny_llama, positions)
    assert np.abs(dense8 - reference).mean() < np.abs(dense4 - reference).mean()  # 4 bits: more error, not garbage
    assert (dense4.argmax(-1) == reference.argmax(-1)).mean() >= 0.6


def test_int4_keeps_a_named_projection_at_8_bits_in_every_layer(factorized, tmp_path):
    """`--keep-8bit down_proj` keeps both factors of every down_proj at 8 bits, and only those (and the lm_head)."""
    info = export_onnx(factorized, tmp_path / "int4", OnnxExportConfig(weights="int4", keep_8bit=("output", "down_proj")),
                       log=lambda *a: None)
    assert info["validation"]["ok"]
    model = onnx.load(str(tmp_path / "int4" / "model.onnx"))
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node if n.op_type == "MatMulNBits"}
    kept = {name for name, b in bits.items() if b == 8}
    assert kept and all("/down_proj/" in name or name.startswith("/lm_head/") for name in kept), kept
    assert sum("/down_proj/" in name for name in kept) == 2 * 2  # two factors in each of two layers
    assert {b for name, b in bits.items() if name not in kept} == {4}


def test_keep_8bit_only_with_int4(capsys, factorized, tmp_path):
    code = main(["export", "--target", "onnx", str(factorized), "-o", str(tmp_path / "x"), "--keep-8bit", "0"])
    assert code == 2 and "--keep-8bit applies to --weights int4" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
