"""Measure one artifact on one engine and device, in its own process (peak RSS and crashes stay isolated).

    python -m basel_edge.eval.worker SPEC.json RESULT.json

SPEC holds the engine, artifact, device, threads, the held-out rows (ids + labels), the agreement sequence and
the speed settings, and optionally HumanEval prompts. RESULT gets perplexity, speed (median/min/max over repetitions
after a warm-up), peak RSS, the engine's info, the HumanEval completions (token ids; scored by the harness, outside
the engine's process), and the logits of the agreement sequence saved to SPEC["logits_file"].
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def nll_of_row(logits: np.ndarray, labels: list[int]) -> tuple[float, int]:
    """Summed next-token NLL over scored positions (labels shifted by one; -100 is not scored)."""
    lab = np.asarray(labels[1:])
    keep = lab != -100
    if not keep.any():
        return 0.0, 0
    x = logits[:-1][keep].astype(np.float64)
    m = x.max(-1, keepdims=True)
    logz = (m[:, 0] + np.log(np.exp(x - m).sum(-1)))
    return float((logz - x[np.arange(len(x)), lab[keep]]).sum()), int(keep.sum())


def measure(spec: dict) -> dict:
    from basel_edge.runtimes import open_runtime, peak_rss_bytes

    start = time.perf_counter()
    runtime = open_runtime(spec["engine"], spec["artifact"], spec["device"], spec["threads"],
                           module=spec.get("engine_module"))
    load_seconds = time.perf_counter() - start
    total, count = 0.0, 0
    for ids, labels in zip(spec["rows"], spec["labels"]):
        nll, n = nll_of_row(runtime.logits(ids), labels)
        total, count = total + nll, count + n
    np.save(spec["logits_file"], runtime.logits(spec["agreement_ids"]).astype(np.float32))
    prompt, new = spec["prompt_ids"], spec["new_tokens"]
    runtime.generate(prompt, min(8, new))
    runs = [runtime.generate(prompt, new) for _ in range(spec["reps"])]
    prefill = [len(prompt) / g.prefill_seconds for g in runs]
    decode = [g.decode_tokens_per_second for g in runs]
    result = {}
    if spec.get("humaneval"):
        from .humaneval import generate

        he = spec["humaneval"]
        result["humaneval_generation"] = generate(runtime, he["prompts"], he["max_new_tokens"], he["tokenizer"],
                                                  he["batch"])
    info = runtime.info()
    return {
        **result,
        "info": info,
        "threads": info.get("threads", spec["threads"]),  # what ran: the mobile profile sets its own count
        "load_seconds": load_seconds,
        "perplexity": math.exp(total / count) if count else None,
        "nll": total / count if count else None,
        "scored_tokens": count,
        "prefill_tps": {"median": statistics.median(prefill), "min": min(prefill), "max": max(prefill)},
        "decode_tps": {"median": statistics.median(decode), "min": min(decode), "max": max(decode)},
        "new_tokens": len(runs[0].token_ids),
        "prompt_tokens": len(prompt),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    from basel_edge.errors import UserError
    from basel_edge.runtimes import Unavailable

    try:
        result = {"status": "ok", **measure(spec)}
    except Unavailable as exc:
        result = {"status": "skipped", "reason": str(exc)}
    except UserError as exc:  # a bad artifact the engine refused in words: its line, not a traceback
        result = {"status": "failed", "error": str(exc)}
    Path(sys.argv[2]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
