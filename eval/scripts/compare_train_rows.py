"""Issue 18: does the way a fine-tuning budget becomes rows matter? One factorized checkpoint, the same
steps (2 x 256 tokens each, cosine, lr 1e-4, two threads), three row samplings: `packed` (the heads of ~32
documents, `data.pack`), `windows` (`data.sample_windows`: one row per document at a random offset) and
`heads` (the first 256 tokens of as many documents as rows, to show what the held-out metric reads).

    python -m basel_edge.eval.scripts.compare_train_rows CHECKPOINT [packed,windows,heads] [STEPS]

Prints one JSON line per sampling: held-out python-code and HumanEval-solution perplexity (bench_compress's
scoring) and the fine-tuning seconds. Results: eval/results/train-rows-120.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from basel_edge.checkpoint import load_factorized
from basel_edge.compress.basel import finetune
from basel_edge.data import TokenBlocks, _encode, load_task, pack, sample_windows
from basel_edge.eval.bench_compress import score, scoring_sets
from basel_edge.models import DEFAULT_MODEL, load_tokenizer, resolve_model
from basel_edge.train import LoopConfig

SEQ_LEN, BATCH = 256, 2


def heads(examples, tokenizer, rows: int) -> TokenBlocks:
    out = []
    for ex in examples:
        ids = _encode(tokenizer, ex.text) + [tokenizer.eos_token_id]
        if len(ids) >= SEQ_LEN:
            out.append(ids[:SEQ_LEN])
        if len(out) == rows:
            break
    ids = torch.tensor(out)
    return TokenBlocks(ids, ids.clone())


def main() -> None:
    checkpoint = Path(sys.argv[1])
    samplings = (sys.argv[2] if len(sys.argv) > 2 else "packed,windows,heads").split(",")
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 120
    torch.set_num_threads(2)
    tok = load_tokenizer(resolve_model(DEFAULT_MODEL).path)
    task = load_task("python-code")
    sets = scoring_sets(tok)
    tokens = steps * BATCH * SEQ_LEN
    build = {"packed": lambda: pack(task.train, tok, SEQ_LEN, max_tokens=tokens),
             "windows": lambda: sample_windows(task.train, tok, SEQ_LEN, tokens // SEQ_LEN),
             "heads": lambda: heads(task.train, tok, tokens // SEQ_LEN)}
    for name in samplings:
        blocks = build[name]()
        model = load_factorized(checkpoint)
        start = time.perf_counter()
        finetune(model, blocks, LoopConfig(steps=steps, batch_size=BATCH, schedule="cosine"), 1e-4, progress=False)
        seconds = time.perf_counter() - start
        python_ppl, humaneval_ppl = score(model, sets)
        print(json.dumps({"rows": name, "n_rows": len(blocks), "steps": steps, "python_ppl": python_ppl,
                          "humaneval_ppl": humaneval_ppl, "finetune_s": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
