"""Runtime engines behind one interface (ARCHITECTURE.md section 8), registered by name.

An engine module defines a `Runtime` subclass and decorates it with `@register`. `open_runtime(engine, path,
device)` imports the module on first use; an engine that cannot run here raises `Unavailable` with the reason,
so callers report it as skipped instead of faking a result.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

DEVICES = ("cpu", "mobile", "cuda")
ENGINE_MODULES: dict[str, str] = {}
ENGINES: dict[str, type["Runtime"]] = {}


def peak_rss_bytes() -> int:
    """High-water RSS of this process's own address space (VmHWM). getrusage's ru_maxrss is the fallback only:
    Linux carries it over fork+exec, so a worker started by a larger process would report that process's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Unavailable(RuntimeError):
    """This engine or device cannot run here; the message says why."""


@dataclass
class Generation:
    """A greedy generation: new token ids and where the time and memory went."""

    token_ids: list[int]
    prefill_seconds: float
    decode_seconds: float
    peak_rss_bytes: int
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        n = max(len(self.token_ids) - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")


class Runtime:
    """An opened model on one engine and device."""

    engine: ClassVar[str]

    @classmethod
    def open(cls, artifact_path: str | Path, device: str = "cpu", threads: int | None = None) -> "Runtime":
        raise NotImplementedError

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Logits [T, vocab] for a whole sequence (perplexity and agreement)."""
        raise NotImplementedError

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        """Greedy generation with timings."""
        raise NotImplementedError

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int,
                       stop: Callable[[int, list[int]], bool] | None = None, batch: int = 8) -> list[list[int]]:
        """Greedy continuations of several prompts; `stop(i, new_ids)` ends prompt i's early (it is asked after
        every token). Engines that batch override this and run up to `batch` sequences at once; the default runs
        the prompts one by one through `generate` to `max_new_tokens` and cuts each at its first stop."""
        return [cut_at_stop(self.generate(prompt, max_new_tokens).token_ids, i, stop)
                for i, prompt in enumerate(prompts)]

    def info(self) -> dict:
        """Engine, version, threads, file size."""
        raise NotImplementedError


def cut_at_stop(tokens: list[int], index: int, stop: Callable[[int, list[int]], bool] | None) -> list[int]:
    """`tokens` up to and including the first one after which `stop(index, prefix)` holds."""
    end = next((n for n in range(1, len(tokens) + 1) if stop and stop(index, tokens[:n])), len(tokens))
    return tokens[:end]


def register(cls: type[Runtime]) -> type[Runtime]:
    ENGINES[cls.engine] = cls
    return cls


def declare(engine: str, module: str) -> None:
    ENGINE_MODULES[engine] = module


def get_engine(engine: str, module: str | None = None) -> type[Runtime]:
    """The runtime class of `engine`, importing `module` (or the declared module) on first use; an export
    target names its engine's module, so an engine outside this package needs no declaration here."""
    if engine not in ENGINES:
        module = module or ENGINE_MODULES.get(engine)
        if module is None:
            raise Unavailable(f"unknown engine '{engine}'; known: {', '.join(sorted(ENGINE_MODULES))}")
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise Unavailable(f"engine '{engine}' is not installed ({exc})") from None
        if engine not in ENGINES:
            raise Unavailable(f"module {module} registers no engine '{engine}'")
    return ENGINES[engine]


def open_runtime(engine: str, artifact_path: str | Path, device: str = "cpu", threads: int | None = None,
                 module: str | None = None) -> Runtime:
    if device not in DEVICES:
        raise Unavailable(f"unknown device '{device}'; devices: {', '.join(DEVICES)}")
    return get_engine(engine, module).open(artifact_path, device, threads)


declare("torch", "basel_edge.runtimes.torch_eager")
declare("onnxruntime", "basel_edge.runtimes.onnxruntime")
declare("llama_cpp", "basel_edge.runtimes.llama_cpp")
declare("executorch", "basel_edge.runtimes.executorch")
