"""Shared fixtures: a tiny random Llama model with a small byte-level BPE tokenizer (basel_edge.tiny), built offline."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from basel_edge.tiny import make_tiny_llama


def llama_tokenizer_in_child(path: str, texts: list[str], id_lists: list[list[int]]) -> tuple[list, list]:
    """llama.cpp's token ids of each text and its text of each id list (vocab-only load); for run_isolated."""
    import llama_cpp

    llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    try:
        tokenized = [llm.tokenize(text.encode(), add_bos=False, special=True) for text in texts]
        return tokenized, [llm.detokenize(ids, special=True).decode() for ids in id_lists]
    finally:
        llm.close()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_untied(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama-untied", tie=False, seed=1)


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
