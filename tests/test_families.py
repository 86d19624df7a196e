"""Model families (basel_edge/families): what each registered family says about a model's layout."""

from __future__ import annotations

import pytest

from basel_edge.errors import UserError
from basel_edge.families import family_of, gguf_architectures, supported_model_types
from basel_edge.lowrank import decoder_linears
from basel_edge.models import load_dense


def test_llama_family_finds_the_seven_projections_of_each_layer(tiny_llama):
    model = load_dense(tiny_llama)
    family = family_of(model.config)
    assert family.name == "llama" and family.gguf_architecture == "llama"
    linears = decoder_linears(model)
    assert len(linears) == 2 * 7
    assert "model.layers.1.mlp.down_proj" in linears and "lm_head" not in linears
    assert family.input_key("model.layers.1.self_attn.k_proj") == "model.layers.1.self_attn.q_proj"
    assert family.input_key("model.layers.1.mlp.up_proj") == "model.layers.1.mlp.gate_proj"
    assert family.input_key("model.layers.1.self_attn.o_proj") == "model.layers.1.self_attn.o_proj"
    assert family.head_dim(model.config) == 64 // 4


def test_head_dim_from_config_dicts_and_an_explicit_head_dim():
    family = family_of({"model_type": "qwen2"})
    assert family.name == "qwen2" and family.gguf_architecture == "qwen2"
    assert family.head_dim({"hidden_size": 896, "num_attention_heads": 14}) == 64
    assert family.head_dim({"hidden_size": 640, "num_attention_heads": 4, "head_dim": 256}) == 256


def test_unknown_family_names_the_supported_ones():
    with pytest.raises(UserError, match=r"'gpt2' \(GPT2LMHeadModel\) is not supported; basel-edge supports gemma3_text, llama"):
        family_of({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "x")
    assert set(supported_model_types()) >= {"llama", "mistral", "qwen2"}
    assert gguf_architectures() == ("gemma3", "llama", "qwen2")
