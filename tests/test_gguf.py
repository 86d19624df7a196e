"""GGUF export (exporters/gguf.py) and the low-rank llama.cpp runtime (runtimes/llama_cpp) on tiny models.

llama.cpp runs only in child processes (basel_edge.runtimes.isolation.run_isolated): a native abort fails one test with
llama.cpp's own message instead of killing pytest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import llama_logits_in_child, llama_tokenizer_in_child, make_tiny_llama, needs_llama_cpp, stdlib_ids, torch_logits

from basel_edge.checkpoint import load_model, save_factorized
from basel_edge.cli import main
from basel_edge.compress import compress
from basel_edge.errors import UserError
from basel_edge.models import load_tokenizer
from basel_edge.ranks import Budget
from basel_edge.exporters.gguf import export_gguf
from basel_edge.exporters.gguf_format import (
    LR_A_SUFFIX,
    LR_B_SUFFIX,
    is_lowrank_tensor,
    read_summary,
)
from basel_edge.runtimes.isolation import run_isolated

# Q8_0 rows are blocks of 32: hidden 64 and MLP 128 keep every row length a multiple of 32
HIDDEN, MLP = 64, 128
UNICODE_AND_SPECIALS = [
    "def f(x):\n    return x ** 2  # ünïcödé ✓",
    "日本語のテキスト and emoji 🙂🚀, tabs\tand  double  spaces",
    "<s>special tokens</s> inside <unk> text",
    "numbers 1234567 3.14159 -42 0x1F",
    "  leading spaces and trailing newline\n\n",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny", hidden=HIDDEN, intermediate=MLP)


def _factorize(src: Path, out: Path, ranks: dict) -> Path:
    model = load_model(src)
    compress(model, "svd", Budget(ranks=ranks, rank_multiple=32, force=True), progress=False)
    save_factorized(model, out, src, method="svd")
    return out


@pytest.fixture(scope="module")
def tiny_full_rank(tiny, tmp_path_factory) -> Path:
    """Every linear factorized at its full rank: the factors multiply back to the dense weight exactly."""
    kv = HIDDEN // 2  # 2 of 4 heads are KV heads
    return _factorize(tiny, tmp_path_factory.mktemp("gguf") / "full", {"*.k_proj": kv, "*.v_proj": kv, "*": HIDDEN})


@pytest.fixture(scope="module")
def tiny_rank32(tiny, tmp_path_factory) -> Path:
    return _factorize(tiny, tmp_path_factory.mktemp("gguf") / "r32", {"*": 32})


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    return run_isolated(llama_logits_in_child, str(path), ids)


def _generate_in_child(path: str, prompt: list[int], n: int):
    from basel_edge.runtimes import open_runtime

    runtime = open_runtime("llama_cpp", path, threads=1)
    try:
        return runtime.generate(prompt, n), runtime.info()
    finally:
        runtime.close()


def _tensors(path: Path) -> dict[str, tuple[int, ...]]:
    from gguf import GGUFReader

    return {t.name: tuple(int(d) for d in t.shape) for t in GGUFReader(path).tensors}


def test_factorized_layout_names_shapes_and_metadata(tiny_rank32, tmp_path):
    from gguf import GGUFReader

    out = export_gguf(tiny_rank32, tmp_path / "m.gguf", progress=False)
    shapes = _tensors(tmp_path / "m.gguf")
    assert out["factorized_linears"] == 14
    assert (out["target"], Path(out["source"]).resolve()) == ("gguf", Path(tiny_rank32).resolve())  # as onnx/pte
    # ggml shapes: _lr_a {n_in, r} applied first, _lr_b {r, n_out}
    assert shapes[f"blk.0.ffn_down{LR_A_SUFFIX}.weight"] == (MLP, 32)
    assert shapes[f"blk.0.ffn_down{LR_B_SUFFIX}.weight"] == (32, HIDDEN)
    assert shapes[f"blk.1.attn_k{LR_B_SUFFIX}.weight"] == (32, HIDDEN // 2)
    assert "blk.0.attn_q.weight" not in shapes
    # q/k/v and gate/up first factors fused into one matmul each
    assert shapes[f"blk.0.attn_qkv{LR_A_SUFFIX}.weight"] == (HIDDEN, 3 * 32)
    assert shapes[f"blk.1.ffn_gate_up{LR_A_SUFFIX}.weight"] == (HIDDEN, 2 * 32)
    assert f"blk.0.attn_q{LR_A_SUFFIX}.weight" not in shapes
    fields = GGUFReader(tmp_path / "m.gguf").fields
    assert fields["basel.layout"].contents() == "factorized"
    assert fields["basel.method"].contents() == "svd"
    assert fields["basel.rank_max"].contents() == 32
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.merges"].data) > 0
    assert read_summary(tmp_path / "m.gguf").factorized


def test_dense_layout_is_a_standard_llama_gguf(tiny_rank32, tmp_path):
    export_gguf(tiny_rank32, tmp_path / "d.gguf", layout="dense", progress=False)
    shapes = _tensors(tmp_path / "d.gguf")
    assert not any(is_lowrank_tensor(name) for name in shapes)
    assert shapes["blk.0.attn_q.weight"] == (HIDDEN, HIDDEN)
    assert shapes["blk.1.ffn_down.weight"] == (MLP, HIDDEN)
    summary = read_summary(tmp_path / "d.gguf")
    assert not summary.factorized and summary.layout == "dense"
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "d.gguf").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_rank_is_zero_padded_to_q8_0_blocks(tiny, tmp_path):
    src = _factorize(tiny, tmp_path / "r20", {"*": 20})
    export_gguf(src, tmp_path / "p.gguf", progress=False)
    assert _tensors(tmp_path / "p.gguf")[f"blk.0.attn_q{LR_B_SUFFIX}.weight"] == (32, HIDDEN)


def test_truncated_gguf_gives_a_clear_error(tiny_rank32, tmp_path):
    full = tmp_path / "m.gguf"
    export_gguf(tiny_rank32, full, progress=False)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated"):
        read_summary(cut)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(full.read_bytes()[:100])
    with pytest.raises(UserError, match="not a complete GGUF"):
        read_summary(header_only)


def test_bad_input_is_one_line_error_and_leaves_no_file(tiny, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert main(["export", "--target", "gguf", str(tiny), "-o", str(out), "--weights", "q4_k"]) == 2
    assert main(["export", "--target", "gguf", str(tiny), "-o", str(out), "--layout", "factorized"]) == 2
    err = capsys.readouterr().err
    assert "q4_k" in err and "dense model" in err
    # hidden 48 is not a whole number of Q8_0 blocks: the export fails part-way and must leave nothing behind
    odd = make_tiny_llama(tmp_path / "odd", hidden=48, intermediate=96)
    with pytest.raises(UserError, match="multiple of 32"):
        export_gguf(odd, out, progress=False)
    assert list(tmp_path.glob("*.gguf*")) == []


def test_cli_export_and_overwrite(tiny_rank32, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", "--target", "gguf", str(tiny_rank32), "-o", str(out), "--quiet"]) == 0
    assert out.is_file()
    assert main(["export", "--target", "gguf", str(tiny_rank32), "-o", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_unfused_layout_has_one_first_factor_per_projection(tiny_rank32, tmp_path):
    export_gguf(tiny_rank32, tmp_path / "u.gguf", fuse=False, progress=False)
    shapes = _tensors(tmp_path / "u.gguf")
    assert shapes[f"blk.0.attn_q{LR_A_SUFFIX}.weight"] == (HIDDEN, 32)
    assert not any("qkv" in name or "gate_up" in name for name in shapes)


@needs_llama_cpp
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_full_rank_factorized_f32_matches_dense_f32(tiny_full_rank, tmp_path, fuse):
    """The patched graph is right: full-rank factors give the dense model's logits (and torch's)."""
    ids = stdlib_ids(tiny_full_rank, 200)
    export_gguf(tiny_full_rank, tmp_path / "f.gguf", weights="f32", layout="factorized", fuse=fuse, progress=False)
    export_gguf(tiny_full_rank, tmp_path / "d.gguf", weights="f32", layout="dense", progress=False)
    factorized = _llama_logits(tmp_path / "f.gguf", ids)
    dense = _llama_logits(tmp_path / "d.gguf", ids)
    assert np.abs(factorized - dense).max() < 1e-3
    assert np.abs(dense - torch_logits(tiny_full_rank, ids)).max() < 1e-3


@needs_llama_cpp
def test_q8_0_factorized_top1_agrees_with_torch(tiny_rank32, tmp_path):
    ids = stdlib_ids(tiny_rank32, 300)
    export_gguf(tiny_rank32, tmp_path / "q.gguf", progress=False)
    agreement = (_llama_logits(tmp_path / "q.gguf", ids).argmax(-1) == torch_logits(tiny_rank32, ids).argmax(-1))
    assert agreement.mean() >= 0.98


@needs_llama_cpp
def test_tokenizer_round_trips_like_hf(tiny, tmp_path):
    export_gguf(tiny, tmp_path / "d.gguf", progress=False)
    hf = load_tokenizer(tiny)
    expected = [hf(text, add_special_tokens=False)["input_ids"] for text in UNICODE_AND_SPECIALS]
    tokenized, detokenized = run_isolated(llama_tokenizer_in_child, str(tmp_path / "d.gguf"), UNICODE_AND_SPECIALS, expected)
    for text, ids, got, back in zip(UNICODE_AND_SPECIALS, expected, tokenized, detokenized):
        assert got == ids, text
        assert back == hf.decode(ids), text


@needs_llama_cpp
def test_generate_and_info(tiny_rank32, tmp_path):
    export_gguf(tiny_rank32, tmp_path / "q.gguf", progress=False)
    gen, info = run_isolated(_generate_in_child, str(tmp_path / "q.gguf"), stdlib_ids(tiny_rank32, 16), 8)
    assert len(gen.token_ids) == 8 and gen.prefill_seconds > 0 and gen.decode_seconds > 0
    assert info["lowrank_patch"] and info["bytes"] == (tmp_path / "q.gguf").stat().st_size


def test_factorized_file_on_a_stock_binding_says_which_build_it_needs(tiny_rank32, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from basel_edge.runtimes import Unavailable, open_runtime
    from basel_edge.runtimes.llama_cpp import build

    export_gguf(tiny_rank32, tmp_path / "q.gguf", progress=False)
    monkeypatch.setattr(build, "installed_key", lambda: None)  # as if a stock llama-cpp-python were installed
    with pytest.raises(Unavailable, match="low-rank llama.cpp build"):
        open_runtime("llama_cpp", tmp_path / "q.gguf")


@needs_llama_cpp
def test_untied_dense_f32_matches_torch(tiny_llama_untied, tmp_path):
    ids = stdlib_ids(tiny_llama_untied, 120)
    export_gguf(tiny_llama_untied, tmp_path / "u.gguf", weights="f32", progress=False)
    assert "output.weight" in _tensors(tmp_path / "u.gguf")
    assert np.abs(_llama_logits(tmp_path / "u.gguf", ids) - torch_logits(tiny_llama_untied, ids)).max() < 1e-3


def _with_tensor_type(src: Path, dst: Path, tensor: str, qtype) -> Path:
    """A copy of `src` whose `tensor` is declared of type `qtype` (same bytes): a file llama.cpp loads but
    cannot compute with."""
    import shutil

    from gguf import GGUFReader

    shutil.copy(src, dst)
    reader = GGUFReader(dst, "r+")
    info = next(t for t in reader.tensors if t.name == tensor)
    info.field.parts[-2][0] = int(qtype)  # tensor info: name, n_dims, dims, type, offset
    del reader
    return dst


@pytest.fixture(scope="module")
def crashing_ggufs(tiny_rank32, tmp_path_factory) -> dict[str, Path]:
    """F32 factorized files that load: one whose norm weight is int32 (ggml aborts with its own message), one
    whose factor tensor is int32 (ggml has no int32 matmul: a segfault without a message)."""
    from gguf import GGMLQuantizationType

    work = tmp_path_factory.mktemp("crash")
    f32 = Path(export_gguf(tiny_rank32, work / "f32.gguf", weights="f32", progress=False)["output"])
    return {
        "abort": _with_tensor_type(f32, work / "abort.gguf", "output_norm.weight", GGMLQuantizationType.I32),
        "segfault": _with_tensor_type(f32, work / "segfault.gguf", f"blk.0.attn_q{LR_B_SUFFIX}.weight",
                                      GGMLQuantizationType.I32),
    }


@needs_llama_cpp
def test_a_native_llama_cpp_abort_fails_one_call_with_its_own_message(tiny_rank32, crashing_ggufs):
    from basel_edge.runtimes.isolation import NativeCrash

    ids = stdlib_ids(tiny_rank32, 40)
    with pytest.raises(NativeCrash) as aborted:
        _llama_logits(crashing_ggufs["abort"], ids)
    assert str(aborted.value) == ("ggml/src/ggml-cpu/binary-ops.cpp:135: binary_op: unsupported types: dst: f32, "
                                  "src0: f32, src1: i32 (SIGABRT)")
    with pytest.raises(NativeCrash, match="SIGSEGV"):
        _llama_logits(crashing_ggufs["segfault"], ids)
    assert _llama_logits(crashing_ggufs["abort"].with_name("f32.gguf"), ids).shape[0] == len(ids)  # goes on


@needs_llama_cpp
def test_a_crashing_gguf_is_one_failed_row_with_the_engines_message(tiny, crashing_ggufs, tiny_text_data, tmp_path):
    from basel_edge.eval.harness import ValidateConfig, run_validation

    cfg = ValidateConfig(baseline=str(tiny), artifacts=[
        str(crashing_ggufs["abort"]), str(crashing_ggufs["abort"].with_name("f32.gguf"))], out=tmp_path / "report",
        task=None, data=str(tiny_text_data), threads=1, seq_len=32, eval_tokens=64, agreement_tokens=48,
        prompt_tokens=8, new_tokens=4, reps=1)
    rows = {Path(r["path"]).name: r for r in run_validation(cfg, progress=False)["rows"]}
    crashed = rows["abort.gguf"]
    assert crashed["status"] == "failed"
    assert crashed["error"] == ("ggml/src/ggml-cpu/binary-ops.cpp:135: binary_op: unsupported types: dst: f32, "
                                "src0: f32, src1: i32 (SIGABRT)")
    assert rows["f32.gguf"]["status"] == "ok"


def test_qwen2_split_regex_maps_to_llama_cpps_qwen2_pre_tokenizer():
    from basel_edge.exporters.gguf_tokenizer import PRE_QWEN2, pre_tokenizer_name

    # the pre_tokenizer of Qwen2.5-Coder-0.5B-Instruct's tokenizer.json, as the file spells it
    qwen2 = json.loads(r'''{"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex":
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
        "behavior": "Isolated", "invert": false}, {"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": false}]}''')
    assert pre_tokenizer_name({"pre_tokenizer": qwen2}) == PRE_QWEN2
    qwen2["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}+|\s+"  # another regex: not llama.cpp's qwen2
    with pytest.raises(UserError, match="not supported"):
        pre_tokenizer_name({"pre_tokenizer": qwen2})


def test_a_model_converted_from_a_gguf_keeps_that_files_tokenizer(tiny, tmp_path):
    """A checkpoint that records its source GGUF (basel-source.json) gets that file's tokenizer keys verbatim."""
    import shutil

    from gguf import GGUFReader

    from basel_edge.models import SOURCE_FILE

    source = tmp_path / "source.gguf"
    export_gguf(tiny, source, progress=False)
    writer_side = GGUFReader(source)
    model = tmp_path / "converted"
    shutil.copytree(tiny, model)
    (model / "tokenizer.json").write_text("{}")  # unusable: only the source file's keys can be right
    (model / SOURCE_FILE).write_text(json.dumps({"gguf": str(source)}))
    export_gguf(model, tmp_path / "out.gguf", progress=False)
    out = GGUFReader(tmp_path / "out.gguf")
    keys = [k for k in writer_side.fields if k.startswith("tokenizer.")]
    assert "tokenizer.ggml.merges" in keys and "tokenizer.ggml.pre" in keys
    for key in keys:
        assert out.fields[key].contents() == writer_side.fields[key].contents(), key


@needs_llama_cpp
def test_4bit_export_quantizes_factors_and_keeps_chosen_tensors_at_8_bits(tiny_rank32, tmp_path):
    ids = stdlib_ids(tiny_rank32)
    q8 = export_gguf(tiny_rank32, tmp_path / "q8.gguf", weights="q8_0", progress=False)
    q4 = export_gguf(tiny_rank32, tmp_path / "q4.gguf", weights="q4_0", keep_8bit=("embedding", "1"), progress=False)
    export_gguf(tiny_rank32, tmp_path / "q2.gguf", weights="q2_k", progress=False)
    assert q4["bytes"] < q8["bytes"] and q4["layout"] == "factorized"
    from gguf import GGUFReader

    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "q4.gguf").tensors}
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.1.attn_output_lr_b.weight"] == "Q8_0" and types["blk.1.ffn_down_lr_a.weight"] == "Q8_0"
    assert types["blk.0.attn_output_lr_b.weight"] == "Q4_0" and types["blk.0.ffn_down_lr_a.weight"] == "Q4_0"
    assert q4["tensor_types"]["Q4_0"] >= 10
    reference = torch_logits(tiny_rank32, ids)
    errors = {}
    for name in ("q8", "q4", "q2"):
        logits = _llama_logits(tmp_path / f"{name}.gguf", ids)
        errors[name] = float(np.abs(logits - reference).mean())
    # fewer bits, more error: a 4-bit file that computed something else (or nothing) breaks the order
    assert errors["q8"] < errors["q4"] < errors["q2"], errors
    assert (_llama_logits(tmp_path / "q4.gguf", ids).argmax(-1) == reference.argmax(-1)).mean() >= 0.5


@needs_llama_cpp
def test_4bit_export_keeps_a_named_projection_at_8_bits_in_every_layer(tiny_rank32, tmp_path):
    export_gguf(tiny_rank32, tmp_path / "q4.gguf", weights="q4_0", keep_8bit=("down_proj",), progress=False)
    from gguf import GGUFReader

    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "q4.gguf").tensors}
    kept = {name for name, t in types.items() if t == "Q8_0" and name.startswith("blk.")}
    assert kept == {f"blk.{i}.ffn_down{s}.weight" for i in range(2) for s in ("_lr_a", "_lr_b")}, kept
    assert types["blk.0.attn_output_lr_b.weight"] == "Q4_0" and types["blk.1.ffn_gate_up_lr_a.weight"] == "Q4_0"


_INTERRUPTED_EXPORT = """
import os, signal, sys
import gguf
from basel_edge.cli import main
original = gguf.GGUFWriter.write_tensors_to_file
def interrupted(self, *args, **kwargs):
    original(self, *args, **kwargs)  # the partial file holds every tensor now
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
gguf.GGUFWriter.write_tensors_to_file = interrupted
sys.exit(main(["export", "--target", "gguf", sys.argv[2], "-o", sys.argv[3], "--quiet"]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_an_interrupted_gguf_write_leaves_nothing_or_is_cleaned_by_the_next_run(tiny_rank32, tmp_path, sig):
    """SIGTERM during the write: the CLI removes its partial file, one line, exit 143. kill -9 cannot be
    handled: the partial file stays, and the next export to the same path removes it."""
    import subprocess
    import sys

    out = tmp_path / "m.gguf"
    proc = subprocess.run([sys.executable, "-c", _INTERRUPTED_EXPORT, sig, str(tiny_rank32), str(out)],
                          capture_output=True, text=True, timeout=300)
    partials = list(tmp_path.glob(".m.gguf.partial-*"))
    if sig == "SIGTERM":
        assert proc.returncode == 143, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == "basel-edge: terminated (SIGTERM)"
        assert "Traceback" not in proc.stderr and not partials
    else:
        assert proc.returncode == -9 and len(partials) == 1 and partials[0].stat().st_size > 0
    assert not out.exists()
    assert main(["export", "--target", "gguf", str(tiny_rank32), "-o", str(out), "--quiet"]) == 0
    assert out.is_file() and not list(tmp_path.glob(".m.gguf.partial-*"))


def test_keep_8bit_is_checked_at_the_edge(tiny_rank32, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    for extra, message in ((["--weights", "q8_0", "--keep-8bit", "embedding"], "--keep-8bit applies"),
                           (["--weights", "q4_0", "--keep-8bit", "lm_head"], "lm_head not understood"),
                           (["--weights", "q4_0", "--keep-8bit", "99"], "layer 99 does not exist")):
        assert main(["export", "--target", "gguf", str(tiny_rank32), "-o", str(out), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))


@needs_llama_cpp
def test_validate_compares_a_factorized_gguf_with_the_dense_gguf_of_the_same_format(tiny, tiny_rank32, tiny_text_data, tmp_path):
    from basel_edge.eval.harness import ValidateConfig, run_validation

    export_gguf(tiny, tmp_path / "dense-q8.gguf", progress=False)
    export_gguf(tiny, tmp_path / "dense-f32.gguf", weights="f32", progress=False)
    export_gguf(tiny_rank32, tmp_path / "fact-q8.gguf", progress=False)
    cfg = ValidateConfig(baseline=str(tiny), artifacts=[str(tmp_path / n) for n in ("dense-f32.gguf", "fact-q8.gguf", "dense-q8.gguf")],
                         out=tmp_path / "report", task=None, data=str(tiny_text_data), threads=1, seq_len=32,
                         eval_tokens=64, agreement_tokens=48, prompt_tokens=8, new_tokens=4, reps=1)
    rows = {r["artifact"]: r for r in run_validation(cfg, progress=False)["rows"]}
    fact = rows["fact-q8.gguf"]
    assert (fact["factorized"], fact["weights"]) == (True, "q8_0")
    assert rows["dense-f32.gguf"]["weights"] == "f32" and rows["dense-q8.gguf"]["factorized"] is False
    same = fact["vs_dense_same_engine"]
    assert same["artifact"] == "dense-q8.gguf"
    sizes = {n: (tmp_path / n).stat().st_size for n in ("fact-q8.gguf", "dense-q8.gguf")}
    assert same["bytes"] == pytest.approx(sizes["fact-q8.gguf"] / sizes["dense-q8.gguf"])
    assert same["perplexity"] == pytest.approx(fact["perplexity"] / rows["dense-q8.gguf"]["perplexity"])
    assert "vs_dense_same_engine" not in rows["dense-q8.gguf"]
    import jsonschema

    from basel_edge.eval.report import validate_schema

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    validate_schema(report)  # the written report, vs_dense_same_engine included, follows the schema
    broken = next(r for r in report["rows"] if r["artifact"] == "fact-q8.gguf")
    del broken["vs_dense_same_engine"]["bytes"]
    with pytest.raises(jsonschema.ValidationError, match="bytes"):
        validate_schema(report)
    assert "| fact-q8.gguf | cpu | llama_cpp | q8_0 | dense-q8.gguf |" in (tmp_path / "report" / "report.md").read_text()
