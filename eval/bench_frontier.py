"""Benchmark: the accuracy-vs-bytes frontier of one model on llama.cpp, the dense quantization ladder against
compressed (SVD-LLM) models with 8-bit and 4-bit factors.

Every point is a GGUF the tool makes (`export --target gguf --weights ...`: the dense ladder Q8_0 ... Q2_K, and
each compressed keep with Q8_0 and Q4_0 factors) and is measured on the same engine and thread count: bytes on
disk, held-out python-code perplexity (`llama-perplexity`, ctx 512), decode tokens/s (`llama-bench` tg64) and
HumanEval pass@1 (greedy, continuous batching in llama.cpp, tests in eval.sandbox; `--humaneval-limit N` takes
the first N problems). Measured points are kept in the work folder, so an interrupted run resumes. Writes
eval/results/frontier-<model>.{json,md} and two plots (accuracy vs bytes, accuracy vs decode tok/s) with the
Pareto frontier.

    python -m basel_edge.eval.bench_frontier --model qwen2.5-coder-0.5b --keeps 0.8 0.6 --humaneval-limit 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from basel_edge.cache import cache_dir
from basel_edge.models import load_tokenizer, resolve_model
from basel_edge.eval.bench_gguf import heldout_text
from basel_edge.eval.harness import cpu_model
from basel_edge.exporters.gguf import QUANTIZE_TYPES, export_gguf, requantize, tensor_types
from basel_edge.runtimes.isolation import run_isolated
from basel_edge.runtimes.llama_cpp.build import PIN, build_key
from basel_edge.runtimes.llama_cpp.tools import llama_bench, llama_perplexity

from . import humaneval

RESULTS = Path(__file__).parent / "results"
LADDER = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k")
FACTOR_WEIGHTS = ("q8_0", "q4_0")
DENSE = "dense"
METHOD_LABELS = {"dense": "dense, quantization ladder", "svd-llm/q8_0": "SVD-LLM, Q8_0 factors",
                 "svd-llm/q4_0": "SVD-LLM, Q4_0 factors"}
MARKERS = {"dense": "s", "svd-llm/q8_0": "o", "svd-llm/q4_0": "^"}


def _generate_in_child(path: str, prompts: list[list[int]], max_new_tokens: int, tokenizer: str, threads: int,
                       batch: int) -> dict:
    from basel_edge.runtimes import open_runtime

    runtime = open_runtime("llama_cpp", path, "cpu", threads)
    try:
        return humaneval.generate(runtime, prompts, max_new_tokens, tokenizer, batch)
    finally:
        runtime.close()


def checkpoint(model: str, keep: float, calib_tokens: int, work: Path) -> Path:
    out = work / f"svd-llm-{keep}"
    if not (out / "basel.json").is_file():
        subprocess.run([sys.executable, "-m", "basel_edge", "compress", "--model", model, "--task", "python-code",
                        "--method", "svd-llm", "--keep", str(keep), "--calib-tokens", str(calib_tokens), "-o",
                        str(out), "--overwrite", "--quiet"], check=True)
    return out


def ggufs(args: argparse.Namespace, model_dir: Path) -> list[dict]:
    """The points: (name, method, keep, weights, file), each file made once into the work folder."""
    points = []
    f32 = args.work / "dense-f32.gguf"
    if not f32.is_file():
        export_gguf(model_dir, f32, weights="f32", progress=False)
    for weights in args.ladder:
        path = args.work / f"dense-{weights}.gguf"
        if not path.is_file():
            if weights in QUANTIZE_TYPES:
                requantize(f32, path, weights)
            else:
                export_gguf(model_dir, path, weights=weights, progress=False)
        points.append({"name": f"dense {weights.upper()}", "method": DENSE, "keep": 1.0, "weights": weights, "file": path})
    for keep in args.keeps:
        ckpt = checkpoint(args.model, keep, args.calib_tokens, args.work)
        for weights in args.factor_weights:
            path = args.work / f"svd-llm-{keep}-{weights}.gguf"
            if not path.is_file():
                export_gguf(ckpt, path, weights=weights, progress=False)
            points.append({"name": f"SVD-LLM keep {keep} {weights.upper()}", "method": f"svd-llm/{weights}",
                           "keep": keep, "weights": weights, "file": path, "checkpoint": ckpt})
    return points


def measure(point: dict, args: argparse.Namespace, text: Path, problems: list[dict], prompts: list[list[int]],
            tokenizer, tokenizer_dir: Path) -> dict:
    path = point["file"]
    row = {k: v for k, v in point.items() if k not in ("file", "checkpoint")}
    row.update(file=path.name, bytes=path.stat().st_size, tensor_types=tensor_types(path))
    if "checkpoint" in point:
        extra = json.loads((point["checkpoint"] / "basel.json").read_text()).get("extra", {})
        row["calibration_tokens"] = extra.get("calibration_tokens")
    start = time.perf_counter()
    row["perplexity"], row["perplexity_err"] = llama_perplexity(path, text, args.threads, ctx=512)
    speed = {r.test: r.tokens_per_second for r in llama_bench(path, args.threads, repetitions=3)}
    row["prefill_tps"], row["decode_tps"] = speed["pp64"], speed["tg64"]
    if problems:
        config = humaneval.HumanEvalConfig(batch_size=args.batch)
        generation = run_isolated(_generate_in_child, str(path), prompts, config.max_new_tokens, str(tokenizer_dir),
                                  args.threads, config.batch_size, timeout=3600)
        row["humaneval"] = humaneval.score_generation(generation, problems, tokenizer, config)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def pareto(rows: list[dict], x: str, better_y) -> set[str]:
    """Names of the points no other point beats on both `x` (smaller is better) and the accuracy `better_y`."""
    front = set()
    for r in rows:
        if not any((o[x] <= r[x] and better_y(o) >= better_y(r)) and (o[x] < r[x] or better_y(o) > better_y(r))
                   for o in rows):
            front.add(r["name"])
    return front


def _accuracies(rows: list[dict]) -> list[tuple[str, callable, str]]:
    """(label, value getter with higher = better, axis label) for the metrics the rows carry."""
    metrics = []
    if all(r.get("humaneval") for r in rows):
        metrics.append(("pass@1", lambda r: r["humaneval"]["pass@1"], "HumanEval pass@1"))
    metrics.append(("perplexity", lambda r: -r["perplexity"], "held-out python-code perplexity (lower is better)"))
    return metrics


def plot(rows: list[dict], model: str, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for x, xlabel, scale, suffix, smaller_better in (
        ("bytes", "size on disk (MiB)", 2**-20, "bytes", True),
        ("decode_tps", "decode tokens/s (llama-bench tg64)", 1.0, "decode", False),
    ):
        metrics = _accuracies(rows)
        fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.8), squeeze=False)
        for ax, (key, get, ylabel) in zip(axes[0], metrics):
            sign = 1 if key == "pass@1" else -1
            for method in METHOD_LABELS:
                sel = sorted((r for r in rows if r["method"] == method), key=lambda r: r[x])
                if not sel:
                    continue
                xs = [r[x] * scale for r in sel]
                ys = [sign * get(r) for r in sel]
                if key == "pass@1":  # with its 95% interval
                    err = [[y - r["humaneval"]["ci95"][0] for y, r in zip(ys, sel)],
                           [r["humaneval"]["ci95"][1] - y for y, r in zip(ys, sel)]]
                    ax.errorbar(xs, ys, yerr=err, marker=MARKERS[method], linestyle=":", capsize=3,
                                label=METHOD_LABELS[method])
                else:
                    ax.plot(xs, ys, marker=MARKERS[method], linestyle=":", label=METHOD_LABELS[method])
            cost = (lambda r: r[x]) if smaller_better else (lambda r: -r[x])
            front_names = pareto([{**r, "cost": cost(r)} for r in rows], "cost", get)
            front = sorted((r for r in rows if r["name"] in front_names), key=lambda r: r[x])
            ax.plot([r[x] * scale for r in front], [sign * get(r) for r in front], color="black", linewidth=1,
                    alpha=0.5, label="Pareto frontier")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if key == "perplexity":
                ax.set_yscale("log")
            else:
                ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{model}: accuracy vs {'bytes' if x == 'bytes' else 'decode speed'} (llama.cpp, "
                     f"{rows[0].get('threads', '?')} threads)")
        fig.tight_layout()
        files.append(out / f"frontier-{model}-{suffix}.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return files


def markdown(result: dict) -> str:
    rows = result["rows"]
    has_he = all(r.get("humaneval") for r in rows)
    front = pareto(rows, "bytes", (lambda r: r["humaneval"]["pass@1"]) if has_he else (lambda r: -r["perplexity"]))
    head = "| point | MiB | perplexity | " + ("HumanEval pass@1 [95% CI] | " if has_he else "") + \
        "decode tok/s | prefill tok/s | on the frontier | tensor types |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: -r["bytes"]):
        he = ""
        if has_he:
            h = r["humaneval"]
            he = f"{100 * h['pass@1']:.1f} [{100 * h['ci95'][0]:.1f}–{100 * h['ci95'][1]:.1f}] | "
        types = ", ".join(f"{k} {v}" for k, v in r["tensor_types"].items())
        lines.append(f"| {r['name']} | {r['bytes'] / 2**20:.1f} | {r['perplexity']:.3f} | {he}{r['decode_tps']:.1f} | "
                     f"{r['prefill_tps']:.1f} | {'yes' if r['name'] in front else ''} | {types} |")
    n = rows[0]["humaneval"]["n"] if has_he else 0
    known = sorted({r["calibration_tokens"] for r in rows if r.get("calibration_tokens")})
    calibration = " / ".join(map(str, known)) + (" (one checkpoint's count was not recorded)" if any(
        r["method"] != DENSE and not r.get("calibration_tokens") for r in rows) else "") if known else "unrecorded"
    lines += ["", f"{result['model']} on {result['machine']['cpu']} ({result['machine']['cores']} cores), llama.cpp "
              f"{result['engine']}, {result['threads']} threads; perplexity on {result['eval_tokens']} held-out "
              f"python-code tokens" + (f"; HumanEval over {n} problems (greedy, 95% Wilson interval)" if has_he else "")
              + f". SVD-LLM calibration: python-code, {calibration} tokens. Frontier: no other "
              "point is both smaller and more accurate" + (" (pass@1)." if has_he else " (perplexity).")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6])
    parser.add_argument("--ladder", nargs="+", default=list(LADDER), choices=["q8_0", *QUANTIZE_TYPES])
    parser.add_argument("--factor-weights", nargs="+", default=list(FACTOR_WEIGHTS), choices=["q8_0", *QUANTIZE_TYPES])
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--humaneval-limit", type=int, help="first N problems (default: all 164)")
    parser.add_argument("--no-humaneval", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.work = args.work or cache_dir() / "bench" / "frontier" / args.model
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(args.model).path
    tokenizer = load_tokenizer(model_dir)
    text = args.work / "heldout-python-code.txt"
    eval_tokens = heldout_text(text, args.eval_tokens, 512, model=model_dir)
    problems = [] if args.no_humaneval else humaneval.problems(args.humaneval_limit)
    prompts = [humaneval.prompt_ids(p, tokenizer) for p in problems]
    done_file = args.work / f"rows-{args.threads}t-{len(problems)}he-{eval_tokens}tok.json"
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    rows = []
    for point in ggufs(args, model_dir):
        if point["name"] not in done:
            done[point["name"]] = {**measure(point, args, text, problems, prompts, tokenizer, model_dir),
                                   "threads": args.threads}
            done_file.write_text(json.dumps(done, indent=1))
        row = done[point["name"]]
        rows.append(row)
        he = row.get("humaneval")
        print(f"{row['name']}: {row['bytes'] / 2**20:.1f} MiB, ppl {row['perplexity']:.3f}, tg {row['decode_tps']:.1f}"
              + (f", pass@1 {he['pass@1']:.3f} ({he['generate_seconds']} s)" if he else ""), flush=True)
    result = {
        "model": args.model, "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "engine": f"{PIN} + lowrank.patch ({build_key(False)})", "threads": args.threads, "eval_tokens": eval_tokens,
        "humaneval_problems": len(problems), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m basel_edge.eval.bench_frontier " + " ".join(sys.argv[1:]), "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"frontier-{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"frontier-{args.model}.md").write_text(markdown(result))
    plot(rows, args.model, args.out)
    print(markdown(result))
    write_index(args.out)


def write_index(out: Path) -> None:
    """eval/results/frontier.md: every model's frontier table, from the frontier-<model>.json files."""
    parts = ["# Accuracy vs bytes: compressed models against the dense quantization ladder (llama.cpp)", "",
             "Made by `python -m basel_edge.eval.bench_frontier`; plots: `frontier-<model>-bytes.png`, "
             "`frontier-<model>-decode.png`.", ""]
    for file in sorted(out.glob("frontier-*.json")):
        result = json.loads(file.read_text())
        parts += [f"## {result['model']}", "", f"`{result['command']}`", "", markdown(result)]
    (out / "frontier.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
