"""Benchmark: ONNX on onnxruntime CPU for SmolLM2-135M — dense fp32, dense int8, factorized int8.

All three are exported (with validation) and timed in one run, at 1 and 2 threads: file bytes, bytes of
matmul weights read per token, prefill and decode tokens/s (median of repetitions after a warm-up).
The factorized model is SVD-LLM at keep 0.5 unless `--factorized DIR` names another checkpoint.
Writes eval/results/onnx.{json,md} and prints the markdown table.

    python -m basel_edge.eval.bench_onnx [--factorized DIR] [--threads 1 2] [--prompt-tokens 128] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import onnx

from basel_edge.cache import cache_dir
from basel_edge.models import DEFAULT_MODEL, resolve_model
from basel_edge.exporters.onnx import ONNX_FILE, OnnxExportConfig, export_onnx

RESULTS = Path(__file__).parent / "results"
WEIGHT_OPS = {"MatMul", "MatMulNBits"}


def matmul_weight_bytes(model_dir: Path) -> int:
    """Bytes of the constant inputs of (quantized) MatMuls: what decoding one token reads."""
    model = onnx.load(str(model_dir / ONNX_FILE), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    names = {name for n in model.graph.node if n.op_type in WEIGHT_OPS for name in n.input[1:] if name in inits}
    return sum(len(inits[n].raw_data) for n in names)


def ensure_factorized(path: Path | None) -> Path:
    if path is not None:
        return path
    out = cache_dir() / "bench" / "smollm2-svd-llm-0.5"
    if not (out / "basel.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "basel_edge", "compress", "--task", "python-code", "--method", "svd-llm",
             "--keep", "0.5", "-o", str(out), "--overwrite", "--quiet"],
            check=True,
        )
    return out


def time_runtime(model_dir: Path, threads: int, prompt: list[int], new_tokens: int, reps: int) -> dict:
    """Run in a fresh process so the thread count and peak RSS belong to this artifact alone."""
    code = f"""
import json, statistics
from basel_edge.runtimes.onnxruntime import OrtRuntime
from basel_edge.runtimes import peak_rss_bytes
rt = OrtRuntime.open({str(model_dir)!r}, "cpu", threads={threads})
prompt = {prompt!r}
rt.generate(prompt, 8)
runs = [rt.generate(prompt, {new_tokens}) for _ in range({reps})]
print(json.dumps({{
    "prefill_tps": statistics.median(len(prompt) / g.prefill_seconds for g in runs),
    "decode_tps": statistics.median(g.decode_tokens_per_second for g in runs),
    "decode_tps_min": min(g.decode_tokens_per_second for g in runs),
    "decode_tps_max": max(g.decode_tokens_per_second for g in runs),
    "new_tokens": len(runs[0].token_ids),
    "peak_rss_mib": peak_rss_bytes() / 2**20,
}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factorized", type=Path)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--work", type=Path, default=cache_dir() / "bench" / "onnx")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    dense = resolve_model(DEFAULT_MODEL).path
    factorized = ensure_factorized(args.factorized)
    artifacts = {
        "dense fp32": (dense, "fp32"),
        "dense int8": (dense, "int8"),
        "factorized int8": (factorized, "int8"),
    }
    rows = {}
    for label, (src, weights) in artifacts.items():
        out = args.work / label.replace(" ", "-")
        info = export_onnx(src, out, OnnxExportConfig(weights=weights), overwrite=True)
        rows[label] = {
            "source": str(src),
            "weights": weights,
            "file_bytes": info["bytes"],
            "matmul_weight_bytes": matmul_weight_bytes(out),
            "export_seconds": info["export_seconds"],
            "validation": info["validation"]["metrics"] | {"ok": info["validation"]["ok"]},
            "dir": out,
        }
    from transformers import AutoTokenizer

    from basel_edge.data import load_task

    tok = AutoTokenizer.from_pretrained(dense)
    text = load_task("python-code").validation[0].text
    prompt = tok(text, add_special_tokens=False)["input_ids"][: args.prompt_tokens]
    for threads in args.threads:
        for label, row in rows.items():
            row[f"t{threads}"] = time_runtime(row["dir"], threads, prompt, args.new_tokens, args.reps)
            print(f"{label} @ {threads} thread(s): {row[f't{threads}']}", flush=True)

    base = rows["dense int8"]
    fact = rows["factorized int8"]
    ideal = base["matmul_weight_bytes"] / fact["matmul_weight_bytes"]
    lines = [
        "| model | file MiB | matmul weights MiB | top-1 vs torch | "
        + " | ".join(f"prefill tok/s ({t}T) | decode tok/s ({t}T)" for t in args.threads)
        + " |",
        "|---|---:|---:|---:|" + "---:|---:|" * len(args.threads),
    ]
    for label, row in rows.items():
        cells = " | ".join(f"{row[f't{t}']['prefill_tps']:.0f} | {row[f't{t}']['decode_tps']:.1f}" for t in args.threads)
        lines.append(
            f"| {label} | {row['file_bytes'] / 2**20:.1f} | {row['matmul_weight_bytes'] / 2**20:.1f} | "
            f"{row['validation']['top1_agreement']:.3f} | {cells} |"
        )
    ratios = {t: fact[f"t{t}"]["decode_tps"] / base[f"t{t}"]["decode_tps"] for t in args.threads}
    summary = "; ".join(f"{t} thread(s): {r:.2f}x ({r / ideal:.2f} of ideal)" for t, r in ratios.items())
    lines.append("")
    lines.append(f"Factorized int8 vs dense int8 decode: {summary}; ideal (matmul weight bytes ratio) {ideal:.2f}x.")
    table = "\n".join(lines)
    report = {
        "model": "SmolLM2-135M-Instruct",
        "cpu": platform.processor() or platform.machine(),
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "ideal_decode_ratio": ideal,
        "decode_ratio": {str(t): r for t, r in ratios.items()},
        "rows": {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items()} for k, v in rows.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onnx.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "onnx.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
