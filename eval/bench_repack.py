"""Benchmark: llama.cpp weight repacking (extra buffer types) on and off, on this CPU, for the build's choice.

The build (runtimes/llama_cpp/build.py) keeps repacking on and leaves AMX out. This measures what repacking
buys: SmolLM2-135M dense Q8_0, Q4_0 and Q4_K_M, and factorized (SVD-LLM keep 0.5) Q8_0 and Q4_0, with
`llama-bench --repack 1` and `--repack 0` in paired rounds (both settings of every file once per round),
pp64 / tg64 at 2 threads. Speed-ups are medians of per-round ratios. Writes eval/results/llama-cpp-repack.*.

    python -m basel_edge.eval.bench_repack [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from basel_edge.cache import cache_dir
from basel_edge.models import DEFAULT_MODEL
from basel_edge.eval.bench_gguf import factorized_checkpoint
from basel_edge.eval.harness import cpu_model
from basel_edge.exporters.gguf import export_gguf
from basel_edge.runtimes.llama_cpp.build import PIN, build_key, selected_profile
from basel_edge.runtimes.llama_cpp.tools import llama_bench, llama_quantize

RESULTS = Path(__file__).parent / "results"
KEEP = 0.5


def files(work: Path) -> list[tuple[str, Path]]:
    """The GGUFs to time: dense and factorized, 8-bit and 4-bit (4-bit by llama-quantize from F16)."""
    dense_f16 = work / "dense-f16.gguf"
    export_gguf(DEFAULT_MODEL, dense_f16, weights="f16", overwrite=True, progress=False)
    dense_q8 = work / "dense-q8_0.gguf"
    export_gguf(DEFAULT_MODEL, dense_q8, weights="q8_0", overwrite=True, progress=False)
    factorized = factorized_checkpoint(KEEP, work)
    fact_f16 = work / f"svd-llm-{KEEP}-f16.gguf"
    export_gguf(factorized, fact_f16, weights="f16", overwrite=True, progress=False)
    fact_q8 = work / f"svd-llm-{KEEP}-q8_0.gguf"
    export_gguf(factorized, fact_q8, weights="q8_0", overwrite=True, progress=False)
    return [
        ("dense Q8_0", dense_q8),
        ("dense Q4_0", llama_quantize(dense_f16, work / "dense-q4_0.gguf", "Q4_0")),
        ("dense Q4_K_M", llama_quantize(dense_f16, work / "dense-q4_k_m.gguf", "Q4_K_M")),
        (f"factorized Q8_0 keep {KEEP}", fact_q8),
        (f"factorized Q4_0 keep {KEEP}", llama_quantize(fact_f16, work / f"svd-llm-{KEEP}-q4_0.gguf", "Q4_0")),
    ]


def markdown(rows: list[dict]) -> str:
    lines = ["| model | MiB | pp64 t/s repack on | pp64 t/s off | pp speed-up [min–max] | tg64 t/s on | tg64 t/s off "
             "| tg speed-up [min–max] |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = []
        for test in ("pp64", "tg64"):
            s = r[test]
            cells.append(f"{s['on']:.1f} | {s['off']:.1f} | {s['speedup']:.2f}× [{s['min']:.2f}–{s['max']:.2f}]")
        lines.append(f"| {r['name']} | {r['bytes'] / 2**20:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=cache_dir() / "bench-gguf")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    models = files(args.work)
    rounds = {name: {test: {"on": [], "off": []} for test in ("pp64", "tg64")} for name, _ in models}
    for index in range(args.rounds):
        for name, path in models:
            for repack in (True, False):
                for result in llama_bench(path, args.threads, repetitions=1, repack=repack):
                    rounds[name][result.test]["on" if repack else "off"].append(result.tokens_per_second)
        print(f"round {index + 1}/{args.rounds} done", flush=True)
    rows = []
    for name, path in models:
        row = {"name": name, "file": path.name, "bytes": path.stat().st_size, "rounds": rounds[name]}
        for test, runs in rounds[name].items():
            ratios = [on / off for on, off in zip(runs["on"], runs["off"])]
            row[test] = {"on": statistics.median(runs["on"]), "off": statistics.median(runs["off"]),
                         "speedup": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        rows.append(row)
    report = {
        "engine": f"llama.cpp vendored in llama-cpp-python {PIN} + lowrank.patch ({build_key(False)})",
        "build_profile": (selected_profile() or {}).get("profile"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "rounds": args.rounds,
        "method": "llama-bench -r 1 --repack 1 and --repack 0 back to back per file and round; medians over "
                  "rounds, speed-ups medians of per-round ratios",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (args.out / "llama-cpp-repack.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "llama-cpp-repack.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
