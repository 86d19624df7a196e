"""Post-build smoke check of the low-rank llama.cpp: does what was just built run on this CPU?

A build can compile and still crash at the first matmul on some CPUs (llama.cpp's AMX path did, on Intel Xeons
with AMX: see the README, "GGUF / llama.cpp"). The check writes tiny GGUFs with basel-edge's own exporter, a
dense and a factorized one (fused first factors, whose second factors read slices of one output) in Q8_0, plus Q4_0
copies made with the built `llama-quantize` (the types that llama.cpp repacks on x86), then:

- runs the built `llama-completion` on each file (greedy, a few tokens) and checks that it exits cleanly;
- loads each file in the installed llama-cpp-python with llama.cpp's extra buffer types (weight repacking) on
  (the prompt in one batch, and one token at a time) and off, each in its own process, and checks that the
  logits are finite and agree. This caught ggml's repacked Q4_0 matmul computing garbage from the strided
  inputs of fused factors (lowrank.patch now makes them contiguous).

Every problem is returned as one line with llama.cpp's own error message; nothing here can kill the caller.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from basel_edge.runtimes.isolation import NO_BACKTRACE_ENV, NativeCrash, engine_error_line, run_isolated

PROMPT = "def f(x):"
NEW_TOKENS = 8
SMOKE_TOKENS = 48
RANK = 32
Q4_TYPE = "Q4_0"
# logits with extra buffer types on vs off: same top-1 (near-ties aside) and close values
MIN_TOP1_AGREEMENT = 0.95
MAX_REL_DIFF = 0.05
TIMEOUT_S = 180


@dataclass
class SmokeResult:
    """What the smoke check ran and what failed (empty `problems`: everything ran)."""

    files: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def make_files(work: Path, quantize: Path | None) -> dict[str, Path]:
    """Tiny dense and factorized GGUFs (Q8_0, and Q4_0 when `quantize` is a llama-quantize binary)."""
    import torch

    from basel_edge.checkpoint import load_model, save_factorized
    from basel_edge.compress import compress
    from basel_edge.ranks import Budget
    from basel_edge.tiny import make_tiny_llama
    from basel_edge.exporters.gguf import export_gguf

    torch.manual_seed(0)
    dense_dir = make_tiny_llama(work / "tiny", hidden=64, intermediate=128)
    model = load_model(dense_dir)
    compress(model, "svd", Budget(ranks={"*": RANK}, rank_multiple=RANK, force=True), progress=False)
    save_factorized(model, work / "factorized", dense_dir, method="svd")
    files = {}
    for name, source in (("dense-q8_0", dense_dir), ("factorized-q8_0", work / "factorized")):
        files[name] = Path(export_gguf(source, work / f"{name}.gguf", progress=False)["output"])
    if quantize is not None:
        for name in ("dense", "factorized"):
            target = work / f"{name}-{Q4_TYPE.lower()}.gguf"
            proc = subprocess.run(
                [str(quantize), "--allow-requantize", str(files[f"{name}-q8_0"]), str(target), Q4_TYPE, "1"],
                capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S,
                env={**os.environ, **NO_BACKTRACE_ENV}, check=False,
            )
            if proc.returncode != 0:
                why = engine_error_line(proc.stderr, proc.returncode)
                raise RuntimeError(f"llama-quantize {Q4_TYPE} failed: {why}")
            files[f"{name}-{Q4_TYPE.lower()}"] = target
    return files


def check_completion(completion: Path, gguf_file: Path, threads: int) -> str | None:
    """Greedy generation with the built llama-completion; None if it ran, else the problem in one line."""
    try:
        proc = subprocess.run(
            [str(completion), "-m", str(gguf_file), "-p", PROMPT, "-n", str(NEW_TOKENS), "--temp", "0",
             "-t", str(threads), "-no-cnv", "--simple-io"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S,
            env={**os.environ, **NO_BACKTRACE_ENV}, check=False,
        )
    except subprocess.TimeoutExpired:
        return f"llama-completion on {gguf_file.name} timed out after {TIMEOUT_S} s"
    if proc.returncode != 0:
        return f"llama-completion on {gguf_file.name}: {engine_error_line(proc.stderr, proc.returncode)}"
    return None  # what a random model prints is not checked (it may stop at once); the binding checks the logits


def binding_logits(path: str, token_ids: list[int], extra_buffer_types: bool, threads: int,
                   n_batch: int = 128) -> np.ndarray:
    """Logits of `token_ids` from the installed llama-cpp-python (run this in a child process); `n_batch` 1
    feeds one token at a time, as decoding does.

    The binding is loaded directly, not through LlamaCppRuntime, which trusts it only once this check passed.
    """
    import llama_cpp

    from basel_edge.runtimes.llama_cpp import model_params

    with model_params(use_extra_bufts=extra_buffer_types):
        llm = llama_cpp.Llama(model_path=path, n_ctx=128, n_batch=n_batch, logits_all=True, n_threads=threads,
                              n_threads_batch=threads, verbose=False)
    try:
        llm.eval(list(token_ids))
        return np.array(llm.scores[: len(token_ids)], dtype=np.float32)
    finally:
        llm.close()


def compare_extra_buffer_types(on: np.ndarray, off: np.ndarray) -> str | None:
    """None when logits with extra buffer types agree with plain CPU buffers, else what differs."""
    if not (np.isfinite(on).all() and np.isfinite(off).all()):
        return "non-finite logits"
    agreement = float((on.argmax(-1) == off.argmax(-1)).mean())
    rel = float(np.abs(on - off).max() / max(np.abs(off).max(), 1e-6))
    if agreement < MIN_TOP1_AGREEMENT or rel > MAX_REL_DIFF:
        return f"extra buffer types on vs off: top-1 agreement {agreement:.3f}, max relative difference {rel:.3g}"
    return None


def check_binding(gguf_file: Path, token_ids: list[int], threads: int) -> str | None:
    """Logits with extra buffer types on (all tokens in one batch, and one token at a time) against off, each
    run in its own child process; None if all ran and agree."""
    runs = {"off": (False, 128), "on": (True, 128), "on, one token at a time": (True, 1)}
    logits = {}
    for name, (extra, n_batch) in runs.items():
        try:
            logits[name] = run_isolated(binding_logits, str(gguf_file), token_ids, extra, threads, n_batch,
                                        timeout=TIMEOUT_S)
        except NativeCrash as exc:
            return f"llama-cpp-python on {gguf_file.name} (extra buffer types {name}): {exc}"
        except Exception as exc:
            return f"llama-cpp-python on {gguf_file.name}: {type(exc).__name__}: {exc}"
    for name in ("on", "on, one token at a time"):
        problem = compare_extra_buffer_types(logits[name], logits["off"])
        if problem:
            return f"llama-cpp-python on {gguf_file.name} ({name}): {problem}"
    return None


def run_smoke(completion: Path | None, quantize: Path | None, binding: bool, threads: int | None = None) -> SmokeResult:
    """Run the checks that apply (tools when their paths are given, the binding when `binding`)."""
    from basel_edge.models import load_tokenizer

    threads = threads or min(2, os.cpu_count() or 1)
    result = SmokeResult()
    with tempfile.TemporaryDirectory(prefix="basel-llama-smoke-") as tmp:
        work = Path(tmp)
        try:
            files = make_files(work, quantize)
        except Exception as exc:
            result.problems.append(f"could not make the smoke-check files: {exc}")
            return result
        result.files = sorted(files)
        token_ids = load_tokenizer(work / "tiny")(PROMPT * 8)["input_ids"][:SMOKE_TOKENS]
        for name, gguf_file in files.items():
            if completion is not None:
                result.checks.append(f"llama-completion {name}")
                problem = check_completion(completion, gguf_file, threads)
                if problem:
                    result.problems.append(problem)
            if binding:
                result.checks.append(f"llama-cpp-python {name}, extra buffer types on/off")
                problem = check_binding(gguf_file, token_ids, threads)
                if problem:
                    result.problems.append(problem)
    return result
