"""Benchmark: the CUDA paths, on a machine with an NVIDIA GPU. Basel compression with `--device cuda` against the
same run with `--device cpu`, and the torch engine's `cuda` backend in `validate` against its `cpu` backend
(the same factorized checkpoint: logits, perplexity, decode tokens/s).

    python -m basel_edge.eval.bench_cuda [--model DIR] [--random-weights] [--steps 40] [--devices cuda cpu]

One run takes about 8 minutes on an H200 machine with 16 CPU cores at SmolLM2-135M's shapes (the CUDA compress
alone 170 s); `--devices cuda` leaves out the CPU compress when a lease is short.

`--random-weights` keeps the model's config and tokenizer and draws its weights (seeded), for a lent GPU machine
that cannot hold the real weights: times still measure the real shapes, and the quality columns then only say
whether CUDA and the CPU agree. Writes eval/results/cuda.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from basel_edge.models import DEFAULT_MODEL, copy_tokenizer_files, resolve_model
from basel_edge.eval.harness import ValidateConfig, cpu_model, run_validation

RESULTS = Path(__file__).parent / "results"


def random_copy(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """`model_dir`'s config and tokenizer with weights drawn from the model's own initializer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    model.save_pretrained(out)
    copy_tokenizer_files(model_dir, out, include_config=False)
    return out


def compress_on(device: str, model: Path, out: Path, args: argparse.Namespace) -> dict:
    """One `basel-edge compress --method basel` run in its own process; its wall time and exit status."""
    argv = [sys.executable, "-m", "basel_edge", "compress", "--model", str(model), "--task", "python-code",
            "--method", "basel", "--keep", str(args.keep), "--steps", str(args.steps), "--device", device,
            "--quiet", "-o", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return {"device": device, "exit": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "error": proc.stderr.strip().splitlines()[-1] if proc.returncode else None}


def markdown(results: dict) -> str:
    lines = [f"GPU: {results['gpu']}; CPU: {results['cpu']} ({results['cpu_threads']} threads); torch "
             f"{results['torch']}; weights: {results['weights']}", "",
             "| Basel compress (keep, steps) | device | exit | wall (s) |", "|---|---|---:|---:|"]
    for run in results["compress"]:
        lines.append(f"| {results['keep']}, {results['steps']} | {run['device']} | {run['exit']} | {run['seconds']} |")
    lines += ["", "| validate, torch engine | status | perplexity | top-1 vs torch CPU reference | max abs diff | "
              "decode tok/s |", "|---|---|---:|---:|---:|---:|"]
    for row in results["validate"]:
        fid = row.get("fidelity") or {}
        lines.append(f"| {row['artifact']} on {row['backend']} | {row['status']} | {row.get('perplexity') or '–'} | "
                     f"{fid.get('top1_agreement', '–')} | {fid.get('max_abs_diff', '–')} | "
                     f"{(row.get('decode_tps') or {}).get('median', '–')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--keep", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--devices", nargs="+", choices=["cuda", "cpu"], default=["cuda", "cpu"],
                        help="where to run the Basel compress; validate always uses the CUDA one's output")
    parser.add_argument("--work", type=Path, default=Path("/tmp/basel-bench-cuda"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda: error: torch sees no CUDA GPU on this machine", file=sys.stderr)
        return 2
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    model = resolve_model(args.model).path
    if args.random_weights:
        model = random_copy(model, args.work / "model")
    results = {"gpu": torch.cuda.get_device_name(0), "cpu": cpu_model(), "cpu_threads": torch.get_num_threads(),
               "torch": torch.__version__, "weights": "random (real config and tokenizer)" if args.random_weights
               else "real", "model": str(args.model), "keep": args.keep, "steps": args.steps,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    results["compress"] = [compress_on(d, model, args.work / f"basel-{d}", args) for d in dict.fromkeys(["cuda", *args.devices])]
    report = run_validation(ValidateConfig(baseline=str(model), artifacts=[str(args.work / "basel-cuda")],
                                           out=args.work / "validate", backends=["cpu", "cuda"],
                                           threads=os.cpu_count() or 1, eval_tokens=4096), progress=False)
    results["validate"] = [{k: r.get(k) for k in ("artifact", "backend", "status", "reason", "error", "perplexity",
                                                  "fidelity", "decode_tps", "load_seconds")} for r in report["rows"]]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "cuda.md").write_text(markdown(results))
    print(markdown(results))
    ok = all(r["exit"] == 0 for r in results["compress"]) and all(r["status"] == "ok" for r in results["validate"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
