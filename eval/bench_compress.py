"""Benchmark: trained compression (Basel, BSI) vs SVD-LLM with and without the same fine-tuning, SmolLM2-135M.

Every compression runs as its own `basel-edge` process (so wall time and peak RSS are per method, read with
wait4); every trained method gets the same training-token budget (`--steps` x 2 rows x `--train-seq-len`).
Each result is scored in this process on held-out python-code text (packed) and on the HumanEval canonical
solutions (one row per problem, prompt masked). Writes eval/results/NAME.{json,md} after every model.

    flock /tmp/basel-heavy.lock python -m basel_edge.eval.bench_compress [--keeps 0.4 0.6] [--steps 40]

The ablation of issue 18 (eval/results/compress-ablation.*): training-free variants, some of them then fine-tuned
with the same budget, and the dense model with the same fine-tuning; --append adds rows to an earlier run:

    python -m basel_edge.eval.bench_compress --name compress-ablation --append --steps 120 --keeps 0.5 \
      --methods svd-llm svd-llm+ft --dense-finetune \
      --variant "loss=svd-llm --allocation loss" --variant "ea=svd-llm --error-aware --ls-correction 0" \
      --variant "loss+ea=svd-llm --allocation loss --error-aware --ls-correction 0" \
      --finetune-variant "loss+ft=loss" --finetune-variant "loss+ft-kl=loss --loss kl" \
      --finetune-variant "loss+ea+ft=loss+ea"
    python -m basel_edge.eval.bench_compress --name compress-ablation --append --steps 120 --keeps 0.5 0.4 --methods \
      --variant "loss+ea+local=svd-llm --allocation loss --error-aware --ls-correction 0 --local-steps 32 --local-lr 3e-4" \
      --finetune-variant "loss+ea+local+ft=loss+ea+local"

Rows carry the CPU that timed them, since --append may run on another machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from basel_edge.checkpoint import load_model
from basel_edge.compress import get_method
from basel_edge.data import TokenBlocks, load_task, pack
from basel_edge.cli import build_parser
from basel_edge.models import DEFAULT_MODEL, load_tokenizer, resolve_model
from basel_edge.eval.harness import cpu_model
from basel_edge.perplexity import perplexity

RESULTS = Path(__file__).parent / "results"
BATCH = 2
# the `svd-llm` rows are the plain baseline: uniform ranks, whatever the CLI's default allocation is now
PLAIN_SVD_LLM = ["--method", "svd-llm", "--allocation", "uniform"]


def run_cli(argv: list[str]) -> dict:
    """Run `basel-edge ARGV`; return its wall seconds and peak RSS (MiB) from wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "basel_edge", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"basel-edge {' '.join(argv)} failed:\n{err[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "stdout": out.strip()}


def dense_finetune(steps: int, seq_len: int, lr: float, threads: int) -> dict:
    """The dense model with the fine-tuning every trained row gets (every decoder linear trainable, CE on
    python-code, the same rows as `basel-edge finetune` draws): task fine-tuning also moves the dense model, so
    a compressed row is compared with this as well as with the untouched dense model."""
    from basel_edge.jobs import train_blocks
    from basel_edge.lowrank import decoder_linears
    from basel_edge.models import load_dense
    from basel_edge.train import DEFAULT_FINETUNE_SCHEDULE, LoopConfig, fingerprint, peak_rss_mib, train_loop

    torch.set_num_threads(threads)  # as every timed `basel-edge` run of this benchmark
    start = time.perf_counter()
    ref = resolve_model(DEFAULT_MODEL)
    blocks = train_blocks(load_task("python-code"), load_tokenizer(ref.path), seq_len, steps * BATCH * seq_len)
    model = load_dense(ref.path)
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [lin.weight for lin in decoder_linears(model).values()]
    for w in weights:
        w.requires_grad_(True)
    loop = LoopConfig(steps=steps, batch_size=BATCH, schedule=DEFAULT_FINETUNE_SCHEDULE)
    train_loop(model, [{"params": weights, "lr": lr}], blocks, loop, fingerprint({"dense-ft": lr}), progress=False)
    model.eval()
    for w in weights:
        w.requires_grad_(False)
    return {"model": model, "seconds": round(time.perf_counter() - start, 1), "peak_rss_mib": round(peak_rss_mib(), 1)}


def by_length(blocks: TokenBlocks) -> TokenBlocks:
    """Rows sorted by length so batches carry little padding (padding is never scored either way)."""
    width = blocks.labels.shape[1]
    lengths = ((blocks.labels != -100) * torch.arange(1, width + 1)).max(1).values
    order = torch.argsort(lengths)
    return TokenBlocks(blocks.input_ids[order], blocks.labels[order])


@dataclass(frozen=True)
class ScoringSets:
    """What every row is scored on: held-out python-code text packed into rows, and the HumanEval canonical
    solutions one row per problem (prompt masked, sorted by length)."""

    heldout: TokenBlocks
    humaneval: TokenBlocks


def scoring_sets(tokenizer, seq_len: int = 512, eval_tokens: int = 8192) -> ScoringSets:
    """The benchmark's two scoring sets for `tokenizer` (rows of `seq_len`, `eval_tokens` held-out tokens)."""
    heldout = pack(load_task("python-code").validation, tokenizer, seq_len, max_tokens=eval_tokens)
    humaneval = by_length(pack(load_task("humaneval").validation, tokenizer, seq_len, packing=False))
    return ScoringSets(heldout, humaneval)


def score(model: torch.nn.Module, sets: ScoringSets) -> tuple[float, float]:
    """Held-out python-code and HumanEval-solution perplexity of `model`."""
    model.eval()
    return (perplexity(model, sets.heldout, batch_size=4, progress=False).perplexity,
            perplexity(model, sets.humaneval, batch_size=4, progress=False).perplexity)


def local_tokens(variant: list[str]) -> int:
    """Tokens each decoder layer's factors see in `--local-steps` (block-wise local distillation), 0 without it:
    one calibration batch (`--batch-size` rows of `--seq-len`) per step, read by `compress`'s own parser."""
    method, *options = variant or ["svd-llm"]
    argv = ["compress", "--method", method, *options, "--task", "python-code", "-o", "unused"]
    args = build_parser().parse_args(argv)
    return args.local_steps * args.batch_size * args.seq_len


def local_note(row: dict) -> str:
    local = row.get("local_tokens_per_layer")
    return f" (+{local}/layer local)" if local else ""


def markdown(report: dict) -> str:
    keeps = report["keeps"]
    head = ("| method | options | keep | decoder params kept | python-code ppl | humaneval ppl | train tokens | "
            "wall (s) | peak RSS (MiB) | CPU (threads) |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    d = report["dense"]
    lines.append(f"| dense | – | 1.0 | 1.000 | {d['python_ppl']:.3f} | {d['humaneval_ppl']:.3f} | 0 | – | – | – |")
    if "dense_finetuned" in report:
        t = report["dense_finetuned"]
        lines.append(f"| dense+ft | finetune every decoder linear, {report['steps']} steps | 1.0 | 1.000 | "
                     f"{t['python_ppl']:.3f} | {t['humaneval_ppl']:.3f} | {t['train_tokens']} | {t['seconds']:.0f} | "
                     f"{t['peak_rss_mib']:.0f} | {t['cpu']} ({t.get('threads', report['threads'])}) |")
    for keep in keeps:
        for r in report["rows"]:
            if r["keep"] != keep:
                continue
            lines.append(
                f"| {r['method']} | {r.get('options') or '–'} | {keep} | {r['kept']:.3f} | {r['python_ppl']:.3f} | {r['humaneval_ppl']:.3f} | "
                f"{r['train_tokens']}{local_note(r)} | {r['seconds']:.0f} | {r['peak_rss_mib']:.0f} | "
                f"{r['cpu']} ({r.get('threads', report['threads'])}) |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.4, 0.6])
    parser.add_argument("--methods", nargs="*", default=["svd-llm", "svd-llm+ft", "basel", "bsi"])
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=METHOD [OPTIONS]",
                        help="a trained method with its own compress options, run after --methods")
    parser.add_argument("--finetune-variant", action="append", default=[], metavar="LABEL=BASE [OPTIONS]",
                        help="`basel-edge finetune` of the row BASE at the same keep, with its own finetune options "
                             "(--loss kl, --lr ...); wall time and RSS include BASE's compression")
    parser.add_argument("--dense-finetune", action="store_true",
                        help="add a row: the dense model with the same fine-tuning (CE, --steps, lr 1e-4)")
    parser.add_argument("--name", default="compress", help="results file stem under --out")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows (and dense rows) of an earlier NAME.json of the same settings and run "
                             "only the missing ones")
    parser.add_argument("--steps", type=int, default=40, help="training steps of every trained method")
    parser.add_argument("--train-seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of every timed command (each row records its count)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("/tmp/basel-bench"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--dense-from", type=Path, default=None,
                        help="take the dense row from an earlier compress.json of the same settings (saves scoring)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    ref = resolve_model(DEFAULT_MODEL)
    tok = load_tokenizer(ref.path)
    sets = scoring_sets(tok, args.seq_len, args.eval_tokens)
    tokens = args.steps * BATCH * args.train_seq_len
    report = {
        "model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized to fp32)",
        "task": "python-code",
        "train_tokens_per_trained_method": tokens,
        "steps": args.steps,
        "train_batch": BATCH,
        "train_seq_len": args.train_seq_len,
        "python_eval_tokens": sets.heldout.scored_tokens,
        "humaneval_eval_tokens": sets.humaneval.scored_tokens,
        "threads": args.threads,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "keeps": args.keeps,
        "rows": [],
    }

    def score_path(path) -> tuple[float, float]:
        torch.set_num_threads(os.cpu_count() or 1)  # scoring is not timed; the timed work runs in its own process
        return score(load_model(path), sets)

    def write() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / f"{args.name}.md").write_text(markdown(report) + "\n")

    earlier_report = args.out / f"{args.name}.json"
    if args.append and earlier_report.is_file():
        earlier = json.loads(earlier_report.read_text())
        same = ("python_eval_tokens", "humaneval_eval_tokens", "train_tokens_per_trained_method")
        if any(earlier.get(k) != report[k] for k in same):
            parser.error(f"{earlier_report} was measured with other settings; drop --append or change --name")
        # wall times are per machine and thread count
        report["rows"] = [{"cpu": earlier["cpu"], "threads": earlier["threads"], **r} for r in earlier["rows"]]
        report["keeps"] = sorted(set(earlier["keeps"]) | set(args.keeps), reverse=True)
        report["dense"] = earlier["dense"]
        if "note" in earlier:  # how earlier rows were run, written by hand
            report["note"] = earlier["note"]
        if "dense_finetuned" in earlier:
            report["dense_finetuned"] = {"cpu": earlier["cpu"], "threads": earlier["threads"],
                                         **earlier["dense_finetuned"]}
    if "dense" in report:
        py, he = report["dense"]["python_ppl"], report["dense"]["humaneval_ppl"]
    elif args.dense_from is not None:
        earlier = json.loads(args.dense_from.read_text())
        scored = (sets.heldout.scored_tokens, sets.humaneval.scored_tokens)
        if (earlier["python_eval_tokens"], earlier["humaneval_eval_tokens"]) != scored:
            parser.error(f"{args.dense_from} scored other data; drop --dense-from")
        py, he = earlier["dense"]["python_ppl"], earlier["dense"]["humaneval_ppl"]
    else:
        py, he = score_path(DEFAULT_MODEL)
    report["dense"] = {"python_ppl": py, "humaneval_ppl": he}
    print(f"dense: python {py:.3f} humaneval {he:.3f}", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    common = ["--task", "python-code", "--threads", str(args.threads), "--overwrite", "--quiet"]
    trained = ["--steps", str(args.steps), "--train-seq-len", str(args.train_seq_len), "--train-batch-size", str(BATCH)]
    variants = {m: m.split(":", 1)[0:1] + (["--basis", m.split(":", 1)[1]] if ":" in m else [])
                for m in args.methods if m not in ("svd-llm", "svd-llm+ft")}
    for spec in args.variant:
        label, sep, rest = spec.partition("=")
        if not sep or not rest.split():
            parser.error(f"--variant {spec!r}: expected LABEL=METHOD [OPTIONS]")
        variants[label] = shlex.split(rest)
    finetunes = {}
    for spec in args.finetune_variant:
        label, sep, rest = spec.partition("=")
        base, *extra = shlex.split(rest) if sep else [""]
        if not base or base not in (*args.methods, *variants):
            parser.error(f"--finetune-variant {spec!r}: expected LABEL=BASE [OPTIONS], BASE a label run before it")
        finetunes[label] = (base, extra)
    labels = [m for m in args.methods if m in ("svd-llm", "svd-llm+ft")] + list(variants) + list(finetunes)
    if args.dense_finetune and "dense_finetuned" not in report:
        tuned = dense_finetune(args.steps, args.train_seq_len, 1e-4, args.threads)
        model = tuned.pop("model")
        py_ft, he_ft = score(model, sets)
        report["dense_finetuned"] = {
            "python_ppl": py_ft, "humaneval_ppl": he_ft, "train_tokens": tokens, "cpu": report["cpu"],
            "threads": args.threads, **tuned}
        del model
        print(f"dense+ft: {json.dumps(report['dense_finetuned'])}", flush=True)
        write()
    for keep in args.keeps:
        for method in labels:
            out = args.work / f"{method}-{keep}"
            if any(r["method"] == method and r["keep"] == keep for r in report["rows"]):
                continue  # measured by an earlier --append run
            options = ""
            if method == "svd-llm":
                run = run_cli(["compress", *PLAIN_SVD_LLM, "--keep", str(keep), "-o", str(out), *common])
                train_tokens = 0
                options = " ".join(PLAIN_SVD_LLM[1:])
            elif method == "svd-llm+ft":
                base = args.work / f"svd-llm-{keep}"
                if not (base / "basel.json").is_file():
                    run_cli(["compress", *PLAIN_SVD_LLM, "--keep", str(keep), "-o", str(base), *common])
                prior = next((r for r in report["rows"] if r["method"] == "svd-llm" and r["keep"] == keep), None)
                run = run_cli(["finetune", str(base), "--steps", str(args.steps), "--seq-len", str(args.train_seq_len),
                               "--batch-size", str(BATCH), "-o", str(out), *common])
                if prior is not None:
                    run["seconds"] = round(run["seconds"] + prior["seconds"], 1)
                    run["peak_rss_mib"] = max(run["peak_rss_mib"], prior["peak_rss_mib"])
                train_tokens = tokens
                options = f"{' '.join(PLAIN_SVD_LLM[1:])}, then finetune {args.steps} steps"
            elif method in finetunes:
                base_label, extra = finetunes[method]
                base = args.work / f"{base_label}-{keep}"
                prior = next(r for r in report["rows"] if r["method"] == base_label and r["keep"] == keep)
                run = run_cli(["finetune", str(base), "--steps", str(args.steps), "--seq-len", str(args.train_seq_len),
                               "--batch-size", str(BATCH), "-o", str(out), *extra, *common])
                run["seconds"] = round(run["seconds"] + prior["seconds"], 1)
                run["peak_rss_mib"] = max(run["peak_rss_mib"], prior["peak_rss_mib"])
                train_tokens = prior["train_tokens"] + tokens
                options = " ".join([prior["options"] or base_label, f"+ finetune {args.steps} steps", *extra])
            else:
                name, *extra = variants[method]
                options = " ".join([name, *extra])
                part1 = trained
                if "--finetune-steps" in extra:
                    ft = int(extra[extra.index("--finetune-steps") + 1])
                    part1 = ["--steps", str(args.steps - ft), "--train-tokens", str(tokens), *trained[2:]]
                if not getattr(get_method(name), "trainable", False):
                    part1 = []  # a training-free variant (--allocation loss, --error-aware, ...)
                run = run_cli(["compress", "--method", name, "--keep", str(keep), "-o", str(out), *part1, *extra,
                               *common])
                train_tokens = tokens if part1 else 0
            local = local_tokens(variants.get(finetunes[method][0] if method in finetunes else method, []))
            dims = json.loads((out / "basel.json").read_text())
            py, he = score_path(out)
            row = {
                "method": method, "keep": keep, "kept": dims["params"]["factorized"] / dims["params"]["dense"],
                "options": options, "python_ppl": py, "humaneval_ppl": he, "train_tokens": train_tokens,
                "cpu": report["cpu"], "threads": args.threads, **run,
                **({"local_tokens_per_layer": local} if local else {}),
            }
            row.pop("stdout")
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            write()
    print(markdown(report))


if __name__ == "__main__":
    main()
