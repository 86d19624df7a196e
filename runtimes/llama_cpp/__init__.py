"""The llama.cpp engine on llama-cpp-python, built with the low-rank patch (see build.py and lowrank.patch).

`LlamaCppRuntime.open(path.gguf)` checks the file first: a factorized GGUF (`_lr_a`/`_lr_b` tensors) only runs
on the patched build, and basel-edge says so instead of surfacing llama.cpp's missing-tensor error alone.
llama.cpp runs in the calling process: callers that must survive a native abort run it through
`runtimes.isolation.run_isolated` (tests) or a worker process (eval.worker).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

from exporters.gguf_format import read_summary

from .. import Generation, Runtime, Unavailable, peak_rss_bytes, register

DEFAULT_CONTEXT = 1024  # with logits for every position: n_ctx x vocab floats (200 MB for SmolLM2)
BUILD_COMMAND = "python -m runtimes.llama_cpp.build"


def patched_binding_installed() -> bool:
    """Whether this environment's llama-cpp-python is the patched build of this checkout's patch, for this CPU,
    of the build profile that passed the post-build smoke check."""
    # imported here so that `python -m runtimes.llama_cpp.build` does not import its own module twice
    from .build import build_key, installed_key, installed_profile, selected_profile

    for cuda in (False, True):
        if installed_key() == build_key(cuda):
            selected = selected_profile(cuda)
            return selected is not None and selected["profile"] == installed_profile()
    return False


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise Unavailable(f"llama-cpp-python is not installed ({exc}); run `{BUILD_COMMAND}` (or `make setup`)") from None
    return llama_cpp


@contextlib.contextmanager
def model_params(use_extra_bufts: bool):
    """Models created inside load with llama.cpp's extra buffer types (weight repacking) on or off.

    llama-cpp-python's `Llama` takes no such argument; it reads `llama_model_default_params()` when it loads,
    so that function is wrapped for the duration (`--no-repack` of the llama.cpp tools).
    """
    from llama_cpp import llama as high_level

    low_level = high_level.llama_cpp
    default = low_level.llama_model_default_params

    def params():
        value = default()
        value.use_extra_bufts = use_extra_bufts
        return value

    low_level.llama_model_default_params = params
    try:
        yield
    finally:
        low_level.llama_model_default_params = default


@register
class LlamaCppRuntime(Runtime):
    engine = "llama_cpp"

    def __init__(self, path: Path, llm, device: str, threads: int, extra_buffer_types: bool = True) -> None:
        self.path, self.llm, self.device, self.threads = path, llm, device, threads
        self.extra_buffer_types = extra_buffer_types

    @classmethod
    def open(cls, artifact_path, device="cpu", threads=None, n_ctx: int = DEFAULT_CONTEXT,
             extra_buffer_types: bool = True):
        """Load a GGUF; `extra_buffer_types=False` keeps every weight in plain CPU buffers (no repacking)."""
        path = Path(artifact_path)
        if device == "mobile":
            raise Unavailable("llama.cpp has no mobile profile here (use the executorch engine)")
        summary = read_summary(path)
        llama_cpp = _import_llama_cpp()
        if device == "cuda" and not llama_cpp.llama_supports_gpu_offload():
            raise Unavailable(f"this llama-cpp-python has no GPU backend; run `{BUILD_COMMAND} --cuda` on a GPU machine")
        if summary.factorized and not patched_binding_installed():
            from .build import PIN

            raise Unavailable(
                f"{path} is a factorized GGUF ({summary.lowrank_tensor_count} _lr_a/_lr_b tensors): it needs the "
                f"low-rank llama.cpp build of llama-cpp-python {PIN}; run `{BUILD_COMMAND}`"
            )
        threads = threads or 1
        try:
            with model_params(use_extra_bufts=extra_buffer_types):
                llm = llama_cpp.Llama(
                    model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True, n_threads=threads,
                    n_threads_batch=threads, n_gpu_layers=-1 if device == "cuda" else 0, verbose=False,
                )
        except ValueError as exc:
            hint = (f"; a factorized GGUF needs the low-rank build (`{BUILD_COMMAND}`)" if summary.factorized else "")
            raise Unavailable(f"llama.cpp could not load {path} ({exc}){hint}") from None
        return cls(path, llm, device, threads, extra_buffer_types)

    def logits(self, token_ids):
        if len(token_ids) > self.llm.n_ctx():
            raise ValueError(f"{len(token_ids)} tokens exceed the context of {self.llm.n_ctx()}")
        self.llm.reset()
        self.llm.eval(list(token_ids))
        return np.array(self.llm.scores[: len(token_ids)], dtype=np.float32)

    def generate(self, prompt_ids, max_new_tokens):
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(list(prompt_ids))
        tokens = [int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))]
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        while len(tokens) < max_new_tokens and self.llm.n_tokens < self.llm.n_ctx():
            self.llm.eval([tokens[-1]])
            tokens.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
        return Generation(tokens, prefill, time.perf_counter() - start, peak_rss_bytes(),
                          extra={"factorized": read_summary(self.path).factorized})

    def close(self) -> None:
        """Free the model now (llama-cpp-python otherwise frees it at interpreter exit, noisily)."""
        self.llm.close()

    def info(self):
        import llama_cpp

        from .build import installed_profile

        return {
            "engine": self.engine,
            "version": llama_cpp.__version__,
            "lowrank_patch": patched_binding_installed(),
            "build_profile": installed_profile(),
            "extra_buffer_types": self.extra_buffer_types,
            "device": self.device,
            "threads": self.threads,
            "bytes": self.path.stat().st_size,
        }
