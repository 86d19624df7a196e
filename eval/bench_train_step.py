"""Benchmark: a fine-tuning step of the demo's keep-0.5 SmolLM2 on 1 and 2 threads, fp32 and bf16 autocast, eager
and torch.compile'd.

What the demo's training settings rest on (eval/demo.py): the step time of `finetune` (both factors of every
factorized linear, AdamW, 2 rows of 256 python-code tokens) for every thread count × precision, in paired rounds
(each setting once per round, in turn), so the ratios to one fp32 thread are measured side by side on this
machine. The factors are plain SVD factors at uniform keep-0.5 ranks: the step time depends on the shapes, not
on the values. bf16 rows run only where the CPU has bf16 instructions (`train.bf16_native`); elsewhere the loop
stays fp32 and the rows say so. The fastest eager setting runs once more under `finetune --compile`
(`LoopConfig.compile`); its first step, which compiles, is reported apart: the first round compiles from an
empty inductor cache (the benchmark points TORCHINDUCTOR_CACHE_DIR at a new folder), later rounds hit that
cache, as a user's second run does. Writes eval/results/train-step.{json,md}.

    flock /tmp/basel-heavy.lock python -m basel_edge.eval.bench_train_step [--rounds 3] [--steps 6]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from basel_edge.compress.basel import finetune
from basel_edge.data import load_task
from basel_edge.eval.harness import cpu_model
from basel_edge.jobs import train_blocks
from basel_edge.lowrank import decoder_linears, low_rank_from_factors, round_rank, set_module, svd_factors
from basel_edge.models import DEFAULT_MODEL, load_dense, load_tokenizer, resolve_model
from basel_edge.train import LoopConfig, bf16_native

RESULTS = Path(__file__).parent / "results"
KEEP = 0.5
SEQ_LEN = 256
BATCH = 2


def factorized_model() -> torch.nn.Module:
    """SmolLM2-135M with every decoder linear replaced by SVD factors holding KEEP of its parameters."""
    model = load_dense(resolve_model(DEFAULT_MODEL).path)
    for name, lin in decoder_linears(model).items():
        out_f, in_f = lin.weight.shape
        a, b = svd_factors(lin.weight.detach(), round_rank(int(KEEP * out_f * in_f / (out_f + in_f))))
        set_module(model, name, low_rank_from_factors(a, b, lin.bias))
    return model


def step_seconds(model: torch.nn.Module, blocks, threads: int, amp: bool, compile: bool,
                 steps: int) -> tuple[float, float]:
    """Seconds of the first (warm-up, compiling) step and the median of the `steps` after it, on a copy of
    `model`."""
    torch.set_num_threads(threads)
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(step: int, loss: float) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    finetune(copy.deepcopy(model), blocks, LoopConfig(steps=steps + 1, batch_size=BATCH, amp=amp, compile=compile),
             lr=1e-4, progress=False, on_step=tick)
    return times[0], statistics.median(times[1:])


def markdown(report: dict) -> str:
    lines = ["| threads | precision | torch.compile | step (s) | steps/s vs 1 thread fp32 | first step (s) |",
             "|---:|---|---|---:|---:|---|"]
    for r in report["rows"]:
        first = " / ".join(f"{x:.1f}" for x in r["first_s"])
        lines.append(f"| {r['threads']} | {r['precision']} | {'yes' if r['compile'] else 'no'} | {r['step_s']:.3f} | "
                     f"{r['speedup']:.2f}× | {first} |")
    lines.append("")
    lines.append(f"{report['cpu']}, {report['cores']} cores, bf16 instructions: {report['bf16_native']}; torch "
                 f"{report['torch']}; median of {report['rounds']} paired rounds of {report['steps']} steps "
                 f"({BATCH} rows × {SEQ_LEN} tokens) after a warm-up step. First step: each round's; under "
                 "torch.compile it compiles, from an empty inductor cache in round 1 and from that cache later.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    ref = resolve_model(DEFAULT_MODEL)
    blocks = train_blocks(load_task("python-code"), load_tokenizer(ref.path), SEQ_LEN, 64 * BATCH * SEQ_LEN)
    model = factorized_model()
    native = bf16_native(torch.device("cpu"))
    precisions = (False, True) if native else (False,)
    settings = [(t, amp, False) for t in sorted({1, min(2, os.cpu_count() or 1)}) for amp in precisions]
    settings.append((*settings[-1][:2], True))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-train-step-inductor-")
    samples: dict[tuple, list[float]] = {s: [] for s in settings}
    firsts: dict[tuple, list[float]] = {s: [] for s in settings}
    for r in range(args.rounds):
        for setting in settings:
            first, step = step_seconds(model, blocks, *setting, args.steps)
            samples[setting].append(step)
            firsts[setting].append(first)
            threads, amp, compiled = setting
            print(f"round {r + 1}: {threads} thread(s) {'bf16' if amp else 'fp32'}{' compiled' if compiled else ''} "
                  f"{step:.3f} s/step, first step {first:.1f} s", flush=True)
    base = statistics.median(samples[(1, False, False)])
    rows = []
    for setting in settings:
        threads, amp, compiled = setting
        s = statistics.median(samples[setting])
        rows.append({"threads": threads, "precision": "bf16 autocast" if amp else "fp32", "compile": compiled,
                     "step_s": round(s, 4), "speedup": round(base / s, 3),
                     "samples": [round(x, 4) for x in samples[setting]],
                     "first_s": [round(x, 1) for x in firsts[setting]]})
    report = {"model": "SmolLM2-135M-Instruct, SVD factors at uniform keep-0.5 ranks", "cpu": cpu_model(),
              "cores": os.cpu_count(), "bf16_native": native, "torch": torch.__version__, "rounds": args.rounds,
              "steps": args.steps, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train-step.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "train-step.md").write_text(markdown(report) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
