"""Shared fixtures: a tiny random Llama model with a small byte-level BPE tokenizer (basel_edge.tiny), built offline."""

from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from basel_edge.checkpoint import load_model
from basel_edge.models import load_tokenizer
from basel_edge.tiny import make_tiny_llama
from basel_edge.runtimes.llama_cpp import patched_binding_installed

needs_llama_cpp = pytest.mark.skipif(
    not patched_binding_installed(),
    reason="the patched llama-cpp-python is not built; run `python -m basel_edge.runtimes.llama_cpp.build` (make setup)",
)


def llama_tokenizer_in_child(path: str, texts: list[str], id_lists: list[list[int]]) -> tuple[list, list]:
    """llama.cpp's token ids of each text and its text of each id list (vocab-only load); for run_isolated."""
    import llama_cpp

    llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    try:
        tokenized = [llm.tokenize(text.encode(), add_bos=False, special=True) for text in texts]
        return tokenized, [llm.detokenize(ids, special=True).decode() for ids in id_lists]
    finally:
        llm.close()


def llama_logits_in_child(path: str, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits of every position of `ids`; for run_isolated."""
    from basel_edge.runtimes import open_runtime

    runtime = open_runtime("llama_cpp", path)
    try:
        return runtime.logits(ids)
    finally:
        runtime.close()


def torch_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    """The torch model's logits of every position of `ids` (dense or factorized checkpoint)."""
    with torch.no_grad():
        return load_model(model_dir)(input_ids=torch.tensor([ids])).logits[0].numpy()


def stdlib_ids(model_dir: Path, n: int = 300) -> list[int]:
    """The first `n` token ids of a standard-library source, as held-out text."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "shlex.py").read_text(encoding="utf-8")
    return load_tokenizer(model_dir)(text)["input_ids"][:n]


def complete_greedy(binary: Path, gguf_file: Path, prompt: str) -> subprocess.CompletedProcess:
    """llama.cpp's llama-completion: greedy continuation of `prompt`, one thread, so two builds of the same
    arithmetic print the same text."""
    return subprocess.run(
        [str(binary), "-m", str(gguf_file), "-p", prompt, "-n", "16", "--temp", "0", "-t", "1", "-no-cnv",
         "--simple-io"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=False,
    )


@pytest.fixture(scope="session")
def stock_completion() -> Path:
    """llama.cpp's own llama-completion of the pinned version, without the low-rank patch (built once, ~4 min)."""
    from basel_edge.runtimes.llama_cpp.build import build_stock_tool

    return build_stock_tool()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_untied(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama-untied", tie=False, seed=1)


@pytest.fixture(scope="session")
def smollm2_half(tmp_path_factory) -> tuple[Path, Path, object]:
    """(dense dir, factorized dir, tokenizer): the real SmolLM2-135M and its SVD-LLM keep-0.5 checkpoint
    (uniform ranks, 2,048 python-code calibration tokens), made once for every slow test that needs it."""
    from basel_edge.checkpoint import save_factorized
    from basel_edge.compress import Budget, compress
    from basel_edge.data import load_task, pack
    from basel_edge.models import DEFAULT_MODEL, load_dense, load_tokenizer, resolve_model

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    dense = resolve_model(DEFAULT_MODEL).path
    tok = load_tokenizer(dense)
    model = load_dense(dense)
    calib = pack(load_task("python-code").train, tok, seq_len=256, max_tokens=2048)
    compress(model, "svd-llm", Budget(keep=0.5, allocation="uniform"), calib, progress=False)
    fact = tmp_path_factory.mktemp("smollm2-half") / "fact"
    save_factorized(model, fact, dense, method="svd-llm", task="python-code")
    torch.set_num_threads(old)
    return dense, fact, tok


@pytest.fixture(scope="session")
def tiny_text_data(tmp_path_factory) -> Path:
    """A folder of a few stdlib sources, as user text data."""
    root = tmp_path_factory.mktemp("data") / "code"
    root.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "bisect.py", "shlex.py", "fnmatch.py", "colorsys.py", "keyword.py"):
        (root / name).write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    return root


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny matmuls run far faster on one thread on this kind of machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
