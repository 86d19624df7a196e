"""Benchmark: SmolLM2-135M as GGUF in the low-rank llama.cpp — dense Q8_0, dense Q4_0, factorized Q8_0.

For each file: size, weight bytes read per decoded token, `llama-bench` pp64/tg64 at 1 and 2 threads, and
`llama-perplexity` on held-out python-code text. For factorized files the decode speed-up over dense Q8_0 is
compared with the ideal one (dense weight bytes / factorized weight bytes per token), as the median of ratios
measured in paired rounds (every file once per round), because a shared VM drifts by 10-15% between minutes.
Factorized checkpoints
(svd-llm, python-code) are made with `basel-edge compress` when missing. Writes eval/results/gguf.{json,md}.

    python -m basel_edge.eval.bench_gguf [--keeps 0.6 0.4] [--eval-tokens 16384] [--repetitions 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from basel_edge.cache import cache_dir
from basel_edge.data import load_task
from basel_edge.models import DEFAULT_MODEL, load_tokenizer, resolve_model
from basel_edge.eval.harness import cpu_model
from basel_edge.exporters.gguf import export_gguf
from basel_edge.runtimes.llama_cpp.build import PIN, build_key
from basel_edge.runtimes.llama_cpp.tools import llama_bench, llama_perplexity, llama_quantize

RESULTS = Path(__file__).parent / "results"
THREADS = (1, 2)
TARGET_FRACTION_OF_IDEAL = 0.85


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of tensor data one decoded token reads: every tensor, except an untied embedding (one row read)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def heldout_text(path: Path, max_tokens: int, ctx: int, model: str | Path = DEFAULT_MODEL) -> int:
    """Write held-out python-code documents to `path` up to `max_tokens` tokens; return the token count.

    Documents are chosen as the harness's `pack` chooses them (each contributes at most its first
    max(ctx, max_tokens // 32) tokens), so the score spans many files rather than one long, repetitive one.
    Tokens are counted with `model`'s tokenizer.
    """
    from basel_edge.data import DOCUMENTS_PER_BUDGET, tokenize_examples

    tok = load_tokenizer(resolve_model(model).path)
    per_document = max(ctx, max_tokens // DOCUMENTS_PER_BUDGET)
    pairs = tokenize_examples(load_task("python-code").validation, tok, max_tokens, per_example=per_document)
    parts = [tok.decode(ids, skip_special_tokens=True) for ids, _ in pairs]
    path.write_text("\n\n".join(parts), encoding="utf-8")
    return sum(len(ids) for ids, _ in pairs)


def factorized_checkpoint(keep: float, work: Path) -> Path:
    out = work / f"svd-llm-{keep}"
    if not (out / "basel.json").is_file():
        subprocess.run([sys.executable, "-m", "basel_edge", "compress", "--task", "python-code", "--method", "svd-llm",
                        "--keep", str(keep), "--threads", "1", "-o", str(out), "--overwrite", "--quiet"], check=True)
    return out


def markdown(rows: list[dict]) -> str:
    head = ("| model | MiB | weight MiB/token | ppl | pp64 t/s 1T | tg64 t/s 1T | pp64 t/s 2T | tg64 t/s 2T "
            "| tg speed-up 1T / 2T | ideal | of ideal 1T / 2T [min–max of rounds] |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["speed"]
        rel = r.get("vs_dense_q8_0")
        extra = (f"{rel['speedup']['1']:.2f}× / {rel['speedup']['2']:.2f}× | {rel['ideal']:.2f}× | "
                 + " / ".join(f"{rel['of_ideal'][t]:.2f} [{lo:.2f}–{hi:.2f}]"
                              for t, (lo, hi) in rel['of_ideal_range'].items())) if rel else "– | – | –"
        lines.append(
            f"| {r['name']} | {r['bytes'] / 2**20:.1f} | {r['weight_bytes_per_token'] / 2**20:.1f} | {r['ppl']:.3f} "
            f"| {s['1']['pp64']:.0f} | {s['1']['tg64']:.1f} | {s['2']['pp64']:.0f} | {s['2']['tg64']:.1f} | {extra} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.6, 0.4])
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--repetitions", type=int, default=7, help="paired rounds per thread count")
    parser.add_argument("--work", type=Path, default=cache_dir() / "bench-gguf")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    text_file = args.work / "heldout-python-code.txt"
    eval_tokens = heldout_text(text_file, args.eval_tokens, args.ctx)
    files: list[tuple[str, Path, float | None]] = []
    dense_q8 = args.work / "dense-q8_0.gguf"
    export_gguf(DEFAULT_MODEL, dense_q8, weights="q8_0", overwrite=True, progress=False)
    files.append(("dense Q8_0", dense_q8, None))
    dense_f16 = args.work / "dense-f16.gguf"
    export_gguf(DEFAULT_MODEL, dense_f16, weights="f16", overwrite=True, progress=False)
    files.append(("dense Q4_0 (llama-quantize)", llama_quantize(dense_f16, args.work / "dense-q4_0.gguf", "Q4_0"), None))
    for keep in args.keeps:
        out = args.work / f"svd-llm-{keep}-q8_0.gguf"
        export_gguf(factorized_checkpoint(keep, args.work), out, weights="q8_0", overwrite=True, progress=False)
        files.append((f"factorized Q8_0 keep {keep}", out, keep))

    # Paired rounds: every file is benchmarked once per round, back to back, and speed-ups are the median of
    # per-round ratios, so drift of a shared machine between files cancels out.
    rows = [{"name": name, "file": path.name, "keep": keep, "bytes": path.stat().st_size,
             "weight_bytes_per_token": weight_bytes_per_token(path), "speed": {}, "rounds": {}} for name, path, keep in files]
    for threads in THREADS:
        t = str(threads)
        for row in rows:
            row["rounds"][t] = {"pp64": [], "tg64": []}
        for _ in range(args.repetitions):
            for row, (_, path, _) in zip(rows, files):
                for r in llama_bench(path, threads, repetitions=1):
                    row["rounds"][t][r.test].append(r.tokens_per_second)
        for row in rows:
            row["speed"][t] = {test: statistics.median(v) for test, v in row["rounds"][t].items()}
    for row, (_, path, _) in zip(rows, files):
        t0 = time.perf_counter()
        row["ppl"], row["ppl_error"] = llama_perplexity(path, text_file, threads=2, ctx=args.ctx)
        row["seconds_perplexity"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)

    base = rows[0]
    for row in rows[1:]:
        ideal = base["weight_bytes_per_token"] / row["weight_bytes_per_token"]
        ratios = {t: [f / d for f, d in zip(row["rounds"][t]["tg64"], base["rounds"][t]["tg64"])]
                  for t in map(str, THREADS)}
        speedup = {t: statistics.median(r) for t, r in ratios.items()}
        row["vs_dense_q8_0"] = {"ideal": ideal, "speedup": speedup,
                                "of_ideal": {t: s / ideal for t, s in speedup.items()},
                                "of_ideal_range": {t: (min(r) / ideal, max(r) / ideal) for t, r in ratios.items()}}
    report = {
        "model": "SmolLM2-135M-Instruct (embedded), factorized with svd-llm on python-code (no fine-tuning)",
        "engine": f"llama.cpp vendored in llama-cpp-python {PIN} + runtimes/llama_cpp/lowrank.patch ({build_key(False)})",
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "llama_bench": {"tests": ["pp64", "tg64"], "threads": list(THREADS), "rounds": args.repetitions,
                        "method": "each round runs every file once (llama-bench -r 1, after its warm-up); speeds "
                                  "are medians over rounds, speed-ups medians of per-round ratios"},
        "perplexity": {"text": "python-code validation split, at most max(ctx, tokens/32) tokens per document", "tokens": eval_tokens, "ctx": args.ctx, "threads": 2},
        "target_fraction_of_ideal": TARGET_FRACTION_OF_IDEAL,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (args.out / "gguf.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gguf.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
