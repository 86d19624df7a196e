"""ExecuTorch engine: a `.pte` from the executorch target on the XNNPACK delegate, `cpu` or emulated `mobile`.

The program takes `(tokens [1, T], input_pos [1])` and keeps its KV cache in mutable buffers, so prefill is
one call with the prompt and decode one call per token. The `mobile` profile emulates a mid-range phone on
this host: 4 threads (the big cores; the host's count if lower) and a memory budget. The budget is checked
before loading (file bytes + KV cache vs budget) and enforced while loading and running the first step, by
capping the process's address space (RLIMIT_AS) at what it already uses plus the budget. Its figures are
labelled "emulated": they are host figures, not a phone's.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from basel_edge.errors import UserError
from basel_edge.checkpoint import EXPORT_INFO_FILE
from basel_edge.families import family_of

from . import Generation, Runtime, Unavailable, peak_rss_bytes, register

MiB = 1 << 20


@dataclass(frozen=True)
class MobileProfile:
    """An emulated mid-range phone: big-core count and the memory an app may use."""

    threads: int = 4
    memory_budget_bytes: int = 2048 * MiB

    def __post_init__(self) -> None:
        if self.threads <= 0 or self.memory_budget_bytes <= 0:
            raise UserError("a mobile profile needs a positive thread count and memory budget")


MOBILE = MobileProfile()


class MemoryBudgetExceeded(Unavailable):
    """The model does not fit the emulated phone's memory budget."""


def _vm_size() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def address_space_limit(budget: int | None):
    """Cap the address space at current use + `budget` for the body (soft limit only, restored after)."""
    if budget is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + budget
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def find_pte(path: Path) -> Path:
    """The .pte file itself, or the single .pte inside an export folder."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pte":
        return path
    if path.is_dir():
        files = sorted(path.glob("*.pte"))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise UserError(f"{path} holds several .pte files ({', '.join(f.name for f in files)}); give one")
    raise UserError(f"{path} is not a .pte or a folder with one; export one with `basel-edge export --target executorch`")


def load_kernels() -> None:
    """Register the non-delegated kernels the executorch target's programs use (custom SDPA/KV cache, int8 embedding)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401


def set_threads(threads: int) -> None:
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


def kv_cache_bytes(config: dict, max_seq_len: int) -> int:
    head_dim = family_of(config).head_dim(config)
    return 2 * config["num_hidden_layers"] * max_seq_len * config["num_key_value_heads"] * head_dim * 4


@register
class ExecutorchRuntime(Runtime):
    engine = "executorch"

    def __init__(self, file: Path, program, method, device: str, threads: int, max_seq_len: int, budget: int | None) -> None:
        self.file, self.program, self.method = file, program, method
        self.device, self.threads, self.max_seq_len, self.budget = device, threads, max_seq_len, budget

    @classmethod
    def open(cls, artifact_path, device="cpu", threads=None, profile: MobileProfile = MOBILE):
        if device not in ("cpu", "mobile"):
            raise Unavailable(f"executorch runs here on the XNNPACK CPU delegate only ('cpu' or emulated 'mobile'), not '{device}'")
        try:
            load_kernels()
            from executorch.runtime import Runtime as EtRuntime
        except ImportError as exc:
            raise Unavailable(f"executorch is not installed ({exc}); install the 'executorch' extra") from None
        file = find_pte(Path(artifact_path))
        config_file = file.parent / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else None
        cores = os.cpu_count() or 1
        budget = None
        if device == "mobile":
            threads = min(profile.threads, cores)
            budget = profile.memory_budget_bytes
        else:
            threads = threads or cores
        set_threads(threads)
        try:
            with address_space_limit(budget):
                program = EtRuntime.get().load_program(file)
                max_seq_len = int(program.load_method("get_max_seq_len").execute([])[0]) if "get_max_seq_len" in program.method_names else 0
                if budget is not None and config is not None:
                    need = file.stat().st_size + kv_cache_bytes(config, max_seq_len)
                    if need > budget:
                        raise MemoryBudgetExceeded(
                            f"{file.name} needs about {need / MiB:.0f} MiB ({file.stat().st_size / MiB:.0f} MiB program + "
                            f"{kv_cache_bytes(config, max_seq_len) / MiB:.0f} MiB KV cache for {max_seq_len} tokens), over the "
                            f"emulated phone's {budget / MiB:.0f} MiB budget"
                        )
                method = program.load_method("forward")
                runtime = cls(file, program, method, device, threads, max_seq_len, budget)
                runtime._run([0], 0)
        except (MemoryError, RuntimeError) as exc:
            if budget is not None:
                raise MemoryBudgetExceeded(
                    f"{file.name} did not load within the emulated phone's {budget / MiB:.0f} MiB memory budget "
                    f"({type(exc).__name__}: {str(exc)[:200]})"
                ) from None
            raise UserError(f"{file} is not a loadable ExecuTorch program ({str(exc)[:300]})") from None
        return runtime

    def _run(self, ids: list[int], start: int) -> np.ndarray:
        import torch

        if start + len(ids) > self.max_seq_len:
            raise UserError(f"{start + len(ids)} tokens exceed the program's static KV cache of {self.max_seq_len}; re-export with a larger --max-seq-len")
        set_threads(self.threads)
        out = self.method.execute([torch.tensor([ids], dtype=torch.long), torch.tensor([start], dtype=torch.long)])[0]
        return out[0].float().numpy()

    def logits(self, token_ids):
        return self._run(list(token_ids), 0)

    def generate(self, prompt_ids, max_new_tokens):
        start = time.perf_counter()
        logits = self._run(list(prompt_ids), 0)
        tokens = [int(logits[-1].argmax())]
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        while len(tokens) < max_new_tokens:
            logits = self._run([tokens[-1]], len(prompt_ids) + len(tokens) - 1)
            tokens.append(int(logits[-1].argmax()))
        return Generation(tokens, prefill, time.perf_counter() - start, peak_rss_bytes())

    def info(self):
        import executorch.version

        export_info = self.file.parent / EXPORT_INFO_FILE
        scheme = json.loads(export_info.read_text()).get("scheme", {}) if export_info.is_file() else {}
        info = {
            "engine": "executorch",
            "version": executorch.version.__version__,
            "device": self.device,
            "delegate": "XNNPACK",
            "threads": self.threads,
            "bytes": self.file.stat().st_size,
            "max_seq_len": self.max_seq_len,
            "weights": scheme,
            "emulated": self.device == "mobile",
        }
        if self.budget is not None:
            info["memory_budget_bytes"] = self.budget
        return info
