"""The llama.cpp engine on llama-cpp-python, built with the low-rank patch (see build.py and lowrank.patch).

`LlamaCppRuntime.open(path.gguf)` checks the file first: a factorized GGUF (`_lr_a`/`_lr_b` tensors) only runs
on the patched build, and basel-edge says so instead of surfacing llama.cpp's missing-tensor error alone.
llama.cpp runs in the calling process: callers that must survive a native abort run it through
`basel_edge.runtimes.isolation.run_isolated` (tests) or a worker process (basel_edge.eval.worker).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

from basel_edge.exporters.gguf_format import read_summary

from .. import Generation, Runtime, Unavailable, peak_rss_bytes, register

DEFAULT_CONTEXT = 1024  # with logits for every position: n_ctx x vocab floats (200 MB for SmolLM2)
BUILD_COMMAND = "python -m basel_edge.runtimes.llama_cpp.build"


def patched_binding_installed() -> bool:
    """Whether this environment's llama-cpp-python is the patched build of this checkout's patch, for this CPU,
    of the build profile that passed the post-build smoke check."""
    # imported here so that `python -m basel_edge.runtimes.llama_cpp.build` does not import its own module twice
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

    def generate_batch(self, prompts, max_new_tokens, stop=None, batch=8):
        """Continuous batching: up to `batch` sequences decode together in one llama.cpp context (one KV
        stream each); a finished sequence's slot takes the next prompt at once. Greedy, like `generate`."""
        import llama_cpp as lc

        per_seq = -(-(max(len(p) for p in prompts) + max_new_tokens + 1) // 256) * 256  # llama.cpp pads n_ctx to 256
        parallel = max(1, min(batch, len(prompts)))
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = per_seq * parallel, parallel, False
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = self.threads
        ctx = lc.llama_init_from_model(self.llm._model.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a {parallel}-sequence context of {per_seq} tokens each")
        batch = lc.llama_batch_init(params.n_batch, 0, 1)
        n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.llm._model.model))
        outputs: list[list[int]] = [[] for _ in prompts]
        queue = list(range(len(prompts)))
        slots: dict[int, dict] = {}  # seq id -> {"prompt": index, "fed": prompt tokens fed, "pos": next position}
        try:
            memory = lc.llama_get_memory(ctx)
            while queue or slots:
                for seq in range(parallel):
                    if seq not in slots and queue:
                        slots[seq] = {"prompt": queue.pop(0), "fed": 0, "pos": 0}
                batch.n_tokens, wanted = 0, {}

                def add(token: int, pos: int, seq: int, logits: bool) -> None:
                    n = batch.n_tokens
                    batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, pos, 1, logits
                    batch.seq_id[n][0] = seq
                    batch.n_tokens = n + 1

                for seq, slot in slots.items():  # decoding sequences first: one token each
                    prompt = prompts[slot["prompt"]]
                    if slot["fed"] == len(prompt):
                        wanted[batch.n_tokens] = seq
                        add(outputs[slot["prompt"]][-1], slot["pos"], seq, True)
                        slot["pos"] += 1
                for seq, slot in slots.items():  # then prompt chunks, as far as the batch has room
                    prompt = prompts[slot["prompt"]]
                    while slot["fed"] < len(prompt) and batch.n_tokens < params.n_batch:
                        last = slot["fed"] == len(prompt) - 1
                        if last:
                            wanted[batch.n_tokens] = seq
                        add(prompt[slot["fed"]], slot["pos"], seq, last)
                        slot["fed"] += 1
                        slot["pos"] += 1
                if lc.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed during batched generation")
                for i, seq in wanted.items():
                    row = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
                    index = slots[seq]["prompt"]
                    outputs[index].append(int(row.argmax()))
                    if len(outputs[index]) >= max_new_tokens or (stop and stop(index, outputs[index])):
                        lc.llama_memory_seq_rm(memory, seq, -1, -1)
                        del slots[seq]
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)
        return outputs

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
