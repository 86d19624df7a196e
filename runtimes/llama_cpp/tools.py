"""Run the patched llama.cpp command-line tools (llama-bench, llama-perplexity, llama-quantize) and parse them."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .. import Unavailable
from ..isolation import NO_BACKTRACE_ENV, engine_error_line
from .build import tools_built, tools_dir

_PPL_FINAL = re.compile(r"Final estimate:\s*PPL\s*=\s*([0-9.]+)\s*\+/-\s*([0-9.]+)")


def tool(name: str, cuda: bool = False) -> Path:
    """Path of a built tool; Unavailable with the build command when it is not built."""
    if not tools_built(cuda):
        raise Unavailable(
            f"the low-rank llama.cpp tools are not built in {tools_dir(cuda)}; run `python -m basel_edge.runtimes.llama_cpp.build`"
        )
    return tools_dir(cuda) / name


def _run(cmd: list[str], timeout: float | None) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout, check=False,
                            env={**os.environ, **NO_BACKTRACE_ENV})
    if result.returncode != 0:
        why = engine_error_line(result.stderr or result.stdout, result.returncode)
        raise RuntimeError(f"{Path(cmd[0]).name} failed: {why}")
    return result.stdout + result.stderr


@dataclass
class BenchResult:
    """One llama-bench test: prompt processing (pp) or text generation (tg), tokens/s over its repetitions."""

    test: str
    threads: int
    tokens_per_second: float
    stddev: float


def parse_bench_json(text: str) -> list[BenchResult]:
    """Parse `llama-bench -o json` output (a JSON array, one object per test)."""
    start = text.index("[")
    rows = json.loads(text[start: text.rindex("]") + 1])
    results = []
    for row in rows:
        kind = "pp" if row["n_prompt"] and not row["n_gen"] else "tg"
        n = row["n_prompt"] if kind == "pp" else row["n_gen"]
        results.append(BenchResult(f"{kind}{n}", int(row["n_threads"]), float(row["avg_ts"]), float(row["stddev_ts"])))
    return results


def llama_bench(model: str | Path, threads: int, n_prompt: int = 64, n_gen: int = 64, repetitions: int = 3,
                timeout: float | None = 900, repack: bool = True) -> list[BenchResult]:
    """Prompt-processing and generation speed of `model` at a fixed thread count (`repack`: llama.cpp's extra
    buffer types, i.e. weight repacking, on as by default or off)."""
    out = _run([str(tool("llama-bench")), "-m", str(model), "-t", str(threads), "-p", str(n_prompt),
                "-n", str(n_gen), "-r", str(repetitions), "--repack", "1" if repack else "0", "-o", "json"], timeout)
    return parse_bench_json(out)


def parse_perplexity(text: str) -> tuple[float, float]:
    """(perplexity, its +/- estimate) from llama-perplexity's final line."""
    match = _PPL_FINAL.search(text)
    if match is None:
        raise RuntimeError("llama-perplexity printed no 'Final estimate' line")
    return float(match.group(1)), float(match.group(2))


def llama_perplexity(model: str | Path, text_file: str | Path, threads: int, ctx: int = 512,
                     timeout: float | None = 1800) -> tuple[float, float]:
    """Perplexity of `model` on a text file, in windows of `ctx` tokens (llama.cpp scores each window's 2nd half)."""
    out = _run([str(tool("llama-perplexity")), "-m", str(model), "-f", str(text_file), "-t", str(threads),
                "-c", str(ctx)], timeout)
    return parse_perplexity(out)


def llama_quantize(src: str | Path, dst: str | Path, qtype: str, threads: int = 1, timeout: float | None = 900,
                   options: list[str] | None = None) -> Path:
    """Requantize a GGUF (e.g. a dense Q8_0/F16 file to Q4_0); factor tensors may fall back to other types.
    `options`: more llama-quantize flags (--token-embedding-type, --tensor-type, ...)."""
    _run([str(tool("llama-quantize")), "--allow-requantize", *(options or []), str(src), str(dst), qtype,
          str(threads)], timeout)
    return Path(dst)
