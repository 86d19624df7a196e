import json

import pytest
import torch

from basel_edge.data import load_data, pack
from basel_edge.errors import UserError
from basel_edge.models import gguf_architecture, materialize_gguf, resolve_model
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
    with pytest.raises(UserError, match="architecture 'gpt2' is not supported; supported: llama"):
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
