"""Slow GGUF tests on SmolLM2-135M: factorized (keep 0.5) and dense Q8_0 files generate text in llama.cpp, and
an unpatched llama.cpp of the same pin runs the dense-layout files exactly as the patched one and refuses the
factorized file with its own missing-tensor error. llama.cpp runs only in child processes (run_isolated)."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import complete_greedy, llama_tokenizer_in_child

from basel_edge.models import DEFAULT_MODEL, load_tokenizer
from basel_edge.exporters.gguf import export_gguf
from basel_edge.exporters.gguf_format import read_summary
from basel_edge.runtimes.isolation import run_isolated
from basel_edge.runtimes.llama_cpp import patched_binding_installed
from basel_edge.runtimes.llama_cpp.tools import tool

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not patched_binding_installed(),
                       reason="the patched llama-cpp-python is not built; run `python -m basel_edge.runtimes.llama_cpp.build`"),
]
PROMPT = "def fibonacci(n):"
TOKENIZER_STRINGS = [
    "<|im_start|>user\nWrite a function ü → ∑ 日本<|im_end|>\n<|im_start|>assistant\n",
    "def f(x: int) -> int:\n\treturn x * 1234  # émoji 🙂",
    "  two  spaces, trailing space \n",
]


@pytest.fixture(scope="module")
def smollm2_files(smollm2_half, tmp_path_factory):
    torch.set_num_threads(1)
    path, half, _ = smollm2_half
    work = tmp_path_factory.mktemp("smollm2-gguf")
    shutil.copytree(half, work / "half")
    export_gguf(work / "half", work / "half-q8_0.gguf", progress=False)
    export_gguf(DEFAULT_MODEL, work / "dense-q8_0.gguf", progress=False)
    return path, work / "half-q8_0.gguf", work / "dense-q8_0.gguf"


def _generate_in_child(path: str, prompt: list[int], n: int):
    from basel_edge.runtimes import open_runtime

    runtime = open_runtime("llama_cpp", path, threads=2)
    try:
        return runtime.generate(prompt, n)
    finally:
        runtime.close()


@pytest.mark.parametrize("which", ["factorized", "dense"])
def test_q8_0_generates_text(smollm2_files, which):
    path, factorized, dense = smollm2_files
    gguf_file = factorized if which == "factorized" else dense
    assert read_summary(gguf_file).factorized == (which == "factorized")
    tok = load_tokenizer(path)
    gen = run_isolated(_generate_in_child, str(gguf_file), tok(PROMPT)["input_ids"], 24)
    text = tok.decode(gen.token_ids, skip_special_tokens=True)
    assert len(gen.token_ids) == 24 and text.strip(), f"{which}: empty continuation"
    assert gen.decode_tokens_per_second > 0


def test_smollm2_tokenizer_round_trips_like_hf(smollm2_files):
    path, _, dense = smollm2_files
    hf = load_tokenizer(path)
    expected = [hf(text, add_special_tokens=False)["input_ids"] for text in TOKENIZER_STRINGS]
    tokenized, detokenized = run_isolated(llama_tokenizer_in_child, str(dense), TOKENIZER_STRINGS, expected)
    for text, ids, got, back in zip(TOKENIZER_STRINGS, expected, tokenized, detokenized):
        assert got == ids, text
        assert back == hf.decode(ids), text


def test_stock_llama_cpp_runs_dense_layouts_as_the_patched_build_does(smollm2_files, stock_completion, tmp_path):
    _, factorized, dense = smollm2_files
    merged = tmp_path / "half-dense-q8_0.gguf"
    export_gguf(factorized.parent / "half", merged, layout="dense", progress=False)
    for gguf_file in (dense, merged):
        stock = complete_greedy(stock_completion, gguf_file, PROMPT)
        patched = complete_greedy(tool("llama-completion"), gguf_file, PROMPT)
        assert stock.returncode == 0, f"stock llama.cpp failed on {gguf_file.name}: {stock.stderr[-500:]}"
        assert stock.stdout.startswith(PROMPT) and len(stock.stdout) > len(PROMPT) + 8, stock.stdout
        assert stock.stdout == patched.stdout, f"{gguf_file.name}: the low-rank patch changed a dense model's output"


def test_stock_llama_cpp_refuses_a_factorized_file_with_its_own_error(smollm2_files, stock_completion):
    _, factorized, _ = smollm2_files
    stock = complete_greedy(stock_completion, factorized, PROMPT)
    assert stock.returncode != 0
    assert "tensor 'blk.0.attn_q.weight' not found" in stock.stderr, stock.stderr[-800:]
    assert complete_greedy(tool("llama-completion"), factorized, PROMPT).returncode == 0
