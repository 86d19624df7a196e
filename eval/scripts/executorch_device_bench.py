"""On-device benchmark of an executorch-target export on a real Android phone, over adb.

Pushes the `.pte` and `tokenizer.json` to the phone and runs ExecuTorch's llama runner (`llama_main`, built
for arm64-v8a with the XNNPACK, custom-ops and quantized kernels, as in ExecuTorch's llama example) with the
harness's prompt and token counts, `--temperature 0` (greedy, as the harness), a fixed thread count. The
runner prints `PyTorchObserver {json}` after each generation; this script parses it into the harness's row
format (`prefill_tps`/`decode_tps` as median/min/max over repetitions, `peak_rss_bytes` from the process's
VmHWM, `emulated: false`). Perplexity and fidelity stay with `basel-edge validate` on the host: the runner
does not expose logits. It cannot run on the build machine (no phone); `tests/test_device_bench.py` checks
the parsing on a recorded output.

    python -m basel_edge.eval.scripts.executorch_device_bench EXPORT_DIR --runner PATH/TO/llama_main [--serial ID]
        [--threads 4] [--new-tokens 32] [--prompt-tokens 64] [--reps 3] [-o device.json]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from basel_edge.errors import UserError

OBSERVER = "PyTorchObserver "
VMHWM = "BASEL_VMHWM_KB "
DEVICE_DIR = "/data/local/tmp/basel-edge"


@dataclass(frozen=True)
class RunStats:
    """One generation as the llama runner reports it (times in ms since an arbitrary epoch)."""

    prompt_tokens: int
    generated_tokens: int
    model_load_ms: float
    prefill_tps: float
    decode_tps: float
    first_token_s: float


def parse_observer(output: str) -> list[RunStats]:
    """Every `PyTorchObserver {json}` line of a runner's output, as RunStats."""
    runs = []
    for line in output.splitlines():
        at = line.find(OBSERVER)
        if at < 0:
            continue
        stats = json.loads(line[at + len(OBSERVER) :].strip())
        unit = stats.get("SCALING_FACTOR_UNITS_PER_SECOND", 1000)
        prefill_s = (stats["prompt_eval_end_ms"] - stats["inference_start_ms"]) / unit
        decode_s = (stats["inference_end_ms"] - stats["first_token_ms"]) / unit
        decoded = stats["generated_tokens"] - 1  # the first token comes out of the prefill, as in the harness
        if prefill_s <= 0 or decode_s <= 0 or decoded <= 0:
            raise UserError(f"runner stats have no measurable prefill/decode time: {stats}")
        runs.append(
            RunStats(
                prompt_tokens=stats["prompt_tokens"],
                generated_tokens=stats["generated_tokens"],
                model_load_ms=stats["model_load_end_ms"] - stats["model_load_start_ms"],
                prefill_tps=stats["prompt_tokens"] / prefill_s,
                decode_tps=decoded / decode_s,
                first_token_s=(stats["first_token_ms"] - stats["inference_start_ms"]) / unit,
            )
        )
    if not runs:
        raise UserError("no 'PyTorchObserver {...}' line in the runner's output; is it ExecuTorch's llama runner?")
    return runs


def parse_peak_rss(output: str) -> int | None:
    """The largest VmHWM the polling loop printed, in bytes."""
    values = [int(line.split(VMHWM, 1)[1].split()[0]) for line in output.splitlines() if VMHWM in line]
    return max(values) * 1024 if values else None


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def to_row(export_dir: Path, runs: list[RunStats], peak_rss: int | None, threads: int, device: str, version: str | None) -> dict:
    """A row in the harness's report format (rows[] of report.json), marked as a real device."""
    pte = next(export_dir.glob("*.pte"))
    row = {
        "artifact": export_dir.name,
        "path": str(export_dir),
        "kind": "pte",
        "engine": "executorch",
        "backend": "mobile",
        "baseline": False,
        "emulated": False,
        "threads": threads,
        "bytes": pte.stat().st_size,
        "status": "ok",
        "info": {"engine": "executorch", "version": version, "device": device, "runner": "llama_main", "threads": threads},
        "prefill_tps": spread([r.prefill_tps for r in runs]),
        "decode_tps": spread([r.decode_tps for r in runs]),
        "prompt_tokens": runs[0].prompt_tokens,
        "new_tokens": runs[0].generated_tokens,
        "model_load_s": statistics.median(r.model_load_ms for r in runs) / 1000,
        "time_to_first_token_s": spread([r.first_token_s for r in runs]),
    }
    if peak_rss is not None:
        row["peak_rss_bytes"] = peak_rss
    return row


def runner_command(runner: str, pte: str, tokenizer: str, prompt: str, seq_len: int, threads: int) -> str:
    """The shell line run on the phone: the runner in the background, its VmHWM polled until it exits."""
    run = shlex.join([runner, f"--model_path={pte}", f"--tokenizer_path={tokenizer}", f"--prompt={prompt}",
                      f"--seq_len={seq_len}", "--temperature=0", f"--cpu_threads={threads}"])
    return (
        f"{run} & pid=$!; while kill -0 $pid 2>/dev/null; do "
        f"v=$(grep VmHWM /proc/$pid/status 2>/dev/null | tr -s ' ' | cut -d' ' -f2); "
        f"[ -n \"$v\" ] && echo {VMHWM}$v; sleep 0.2; done; wait $pid"
    )


def adb(serial: str | None, *args: str, capture: bool = False) -> str:
    cmd = ["adb", *(["-s", serial] if serial else []), *args]
    done = subprocess.run(cmd, check=True, capture_output=capture, text=True)
    return done.stdout if capture else ""


def harness_prompt(export_dir: Path, prompt_tokens: int) -> str:
    """The harness's prompt (first tokens of the task's agreement text), as text for the runner."""
    from basel_edge.data import load_task, pack
    from basel_edge.models import load_tokenizer

    tok = load_tokenizer(export_dir)
    ids = pack(load_task("python-code").validation, tok, 256, max_tokens=256).input_ids[0].tolist()[:prompt_tokens]
    return tok.decode(ids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--runner", required=True, help="llama_main built for the phone (pushed with the model)")
    parser.add_argument("--serial")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("-o", "--output", type=Path, default=Path("device-executorch.json"))
    args = parser.parse_args(argv)

    pte = next(args.export_dir.glob("*.pte"), None)
    if pte is None or not (args.export_dir / "tokenizer.json").is_file():
        raise SystemExit(f"{args.export_dir} needs a .pte and tokenizer.json (an executorch-target export)")
    prompt = harness_prompt(args.export_dir, args.prompt_tokens)
    adb(args.serial, "shell", "mkdir", "-p", DEVICE_DIR)
    for local in (pte, args.export_dir / "tokenizer.json", Path(args.runner)):
        adb(args.serial, "push", str(local), f"{DEVICE_DIR}/{local.name}")
    runner = f"{DEVICE_DIR}/{Path(args.runner).name}"
    adb(args.serial, "shell", "chmod", "755", runner)
    line = runner_command(runner, f"{DEVICE_DIR}/{pte.name}", f"{DEVICE_DIR}/tokenizer.json", prompt,
                          args.prompt_tokens + args.new_tokens + 8, args.threads)
    outputs = [adb(args.serial, "shell", line, capture=True) for _ in range(args.reps + 1)][1:]  # first is warm-up
    runs = [run for out in outputs for run in parse_observer(out)]
    peak = max((p for p in map(parse_peak_rss, outputs) if p), default=None)
    device = adb(args.serial, "shell", "getprop", "ro.product.model", capture=True).strip()
    info_file = args.export_dir / "basel-export.json"
    version = json.loads(info_file.read_text()).get("executorch_version") if info_file.is_file() else None
    row = to_row(args.export_dir, runs, peak, args.threads, device, version)
    args.output.write_text(json.dumps({"version": 1, "source": "device", "rows": [row]}, indent=2) + "\n")
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
