"""Benchmark: SVD-family baselines on SmolLM2-135M for the python-code task, no fine-tuning.

For each method the calibration statistics and weighted SVDs are computed once, then ranks are allocated at
every keep fraction; each compressed model is scored on the same held-out python-code tokens as the dense
model. Writes eval/results/baselines.{json,md} and prints the markdown table.

    python -m basel_edge.eval.bench_baselines [--keeps 0.8 0.6 0.4] [--eval-tokens 16384] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import time
from pathlib import Path

import torch

from basel_edge.compress import METHODS, apply_ranks, decompose_model
from basel_edge.compress.calibration import collect
from basel_edge.data import load_task, pack
from basel_edge.lowrank import decoder_linears
from basel_edge.models import DEFAULT_MODEL, load_dense, load_tokenizer, resolve_model
from basel_edge.perplexity import perplexity
from basel_edge.ranks import Budget, MatrixScores, allocate, params_for

RESULTS = Path(__file__).parent / "results"
VARIANTS = [("svd", "global"), ("asvd", "global"), ("fwsvd", "global"), ("svd-llm", "global"), ("svd-llm", "uniform")]


def markdown(rows: list[dict], keeps: list[float], dense_ppl: float) -> str:
    head = "| method | allocation | " + " | ".join(f"ppl @ keep {k}" for k in keeps) + " | stats + SVD (s) |"
    sep = "|---|---|" + "---:|" * len(keeps) + "---:|"
    lines = [head, sep, "| dense | – | " + " | ".join(f"{dense_ppl:.3f}" for _ in keeps) + " | – |"]
    for r in rows:
        cells = " | ".join(f"{r['ppl'][str(k)]:.3f}" for k in keeps)
        lines.append(f"| {r['method']} | {r['allocation']} | {cells} | {r['seconds_decompose']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ref = resolve_model(DEFAULT_MODEL)
    tok = load_tokenizer(ref.path)
    task = load_task("python-code")
    calib = pack(task.train, tok, args.seq_len, max_tokens=args.calib_tokens)
    heldout = pack(task.validation, tok, args.seq_len, max_tokens=args.eval_tokens)
    dense = load_dense(ref.path)
    t0 = time.perf_counter()
    dense_ppl = perplexity(dense, heldout, desc="dense").perplexity
    eval_seconds = time.perf_counter() - t0
    print(f"dense: ppl {dense_ppl:.3f} ({eval_seconds:.0f} s per evaluation)", flush=True)

    rows, cache = [], {}
    for method, allocation in VARIANTS:
        m = METHODS[method]()
        if method not in cache:
            t0 = time.perf_counter()
            stats = collect(dense, calib, m.needs)
            decomps = decompose_model(dense, m, stats)
            cache = {method: (decomps, time.perf_counter() - t0)}
        decomps, seconds = cache[method]
        matrices = {
            n: MatrixScores(x.in_features, x.out_features, decomps[n].scores) for n, x in decoder_linears(dense).items()
        }
        row = {"method": method, "allocation": allocation, "seconds_decompose": round(seconds, 1), "ppl": {}, "kept": {}}
        for keep in args.keeps:
            ranks = allocate(Budget(keep=keep, allocation=allocation), matrices)
            model = copy.deepcopy(dense)
            apply_ranks(model, decomps, ranks)
            ppl = perplexity(model, heldout, desc=f"{method} {keep}").perplexity
            kept = params_for(ranks, matrices) / sum(x.dense_params for x in matrices.values())
            row["ppl"][str(keep)], row["kept"][str(keep)] = ppl, round(kept, 4)
            print(f"{method} ({allocation}) keep {keep}: ppl {ppl:.3f}, kept {kept:.3f}", flush=True)
            del model
        rows.append(row)

    report = {
        "model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized to fp32)",
        "task": "python-code",
        "calibration_tokens": int(calib.input_ids.numel()),
        "eval_tokens": heldout.scored_tokens,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "dense_ppl": dense_ppl,
        "seconds_per_eval": round(eval_seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, args.keeps, dense_ppl)
    (args.out / "baselines.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "baselines.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
