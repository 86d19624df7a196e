"""Slow tests on the real Qwen2.5-Coder-0.5B (qwen2) and Gemma-3-270M (gemma3): their dense Q8_0 GGUF tokenizes
exactly as the HF tokenizer (unicode, whitespace, special and added tokens) and the unpatched llama.cpp of the
same pin prints the patched build's greedy tokens. The exports of compressed checkpoints of both models are too
slow for CI on 2 cores; `eval/bench_families.py` runs them (results in eval/results/families-<model>.md).
llama.cpp runs only in child processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import complete_greedy, llama_tokenizer_in_child, needs_llama_cpp

from basel_edge.models import load_tokenizer, resolve_model
from basel_edge.eval.bench_families import PROMPT, round_trip_texts
from basel_edge.exporters.gguf import export_gguf
from basel_edge.runtimes.isolation import run_isolated
from basel_edge.runtimes.llama_cpp.tools import tool

pytestmark = [pytest.mark.slow, needs_llama_cpp]
MODELS = ["qwen2.5-coder-0.5b", "gemma3-270m"]


@pytest.fixture(scope="module", params=MODELS)
def dense_gguf(request, tmp_path_factory) -> tuple[Path, Path]:
    """(HF dir, dense Q8_0 GGUF) of one real model; the HF dir is converted once into the cache."""
    dense = resolve_model(request.param).path
    out = tmp_path_factory.mktemp(request.param) / "dense-q8_0.gguf"
    export_gguf(dense, out, progress=False)
    return dense, out


def test_gguf_tokenizer_matches_hf_on_unicode_special_and_added_tokens(dense_gguf):
    dense, gguf_file = dense_gguf
    hf = load_tokenizer(dense)
    texts = round_trip_texts(hf)
    assert len(texts[-1]) > 12, "no special tokens found: the test would check plain text only"
    expected = [hf(text, add_special_tokens=False)["input_ids"] for text in texts]
    tokenized, detokenized = run_isolated(llama_tokenizer_in_child, str(gguf_file), texts, expected)
    for text, ids, got, back in zip(texts, expected, tokenized, detokenized):
        assert got == ids, text[:80]
        assert back == hf.decode(ids), text[:80]


def test_stock_llama_cpp_prints_the_patched_builds_greedy_tokens(dense_gguf, stock_completion):
    _, gguf_file = dense_gguf
    stock = complete_greedy(stock_completion, gguf_file, PROMPT)
    patched = complete_greedy(tool("llama-completion"), gguf_file, PROMPT)
    assert stock.returncode == 0, f"stock llama.cpp failed: {stock.stderr[-500:]}"
    assert stock.stdout.startswith(PROMPT) and len(stock.stdout) > len(PROMPT) + 8, stock.stdout
    assert stock.stdout == patched.stdout, "the low-rank patch changed a dense model's greedy output"
