"""`basel-edge` command line: compress, finetune, merge, info, eval-ppl, export, validate, demo.

User mistakes (missing path, wrong format, out-of-range option, unsupported model) print one line and exit
with status 2; no half-written output directory is left behind.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .argtypes import keep_fraction, non_negative_int, positive_float, positive_int, unit_float
from .errors import UserError, read_json

DEFAULT_EVAL_TOKENS = 32768


class _Parser(argparse.ArgumentParser):
    """argparse with one error line and a pointer to --help instead of the whole usage block (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _given(**options) -> dict:
    """The options the user gave (not None), so a config's own defaults apply to the rest: a default lives in
    the config, not again in the parser."""
    return {k: v for k, v in options.items() if v is not None}


def add_model_args(p: argparse.ArgumentParser, help: str, default: str | None = None) -> None:
    """The model of every command, named the same way everywhere: `MODEL` or `--model MODEL`."""
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help=help + (f" (default {default})" if default else ""))
    p.add_argument("--model", dest="model_option", metavar="MODEL", help="the same as the positional MODEL")
    p.set_defaults(model_default=default)


def _settle_model(args: argparse.Namespace) -> None:
    """Fold `--model` into `args.model` (once parsed, commands read only `args.model`)."""
    if not hasattr(args, "model_option"):
        return
    if args.model is not None and args.model_option is not None and args.model != args.model_option:
        raise UserError(f"two models given ({args.model} and --model {args.model_option}); give one")
    args.model = args.model or args.model_option or args.model_default
    if args.model is None:
        raise UserError(f"`basel-edge {args.command}` needs a model: give MODEL or --model MODEL")


def _add_data_args(p: argparse.ArgumentParser, required: bool = True, seq_len: int | None = None) -> None:
    """--task/--data, --seq-len (rows of `seq_len` tokens, the calibration and evaluation default unless the
    command trains on its rows), and --seed."""
    from .data import BUILTIN_TASKS

    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--task", help=f"built-in task: {', '.join(BUILTIN_TASKS)}")
    src.add_argument("--data", type=Path, help="text file/folder, .jsonl, or a datasets save_to_disk folder")
    from .jobs import DEFAULT_SEQ_LEN

    p.add_argument("--seq-len", type=positive_int, default=seq_len or DEFAULT_SEQ_LEN, help="tokens per packed row")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")


def _read_ranks_file(path: Path) -> dict:
    data = read_json(path, f"ranks file {path} does not exist")
    if isinstance(data, dict) and "linears" in data and isinstance(data["linears"], dict):
        data = {k: v["rank"] for k, v in data["linears"].items()}  # a basel.json from another run
    if not isinstance(data, dict):
        raise UserError(f"ranks file {path} must map linear names or patterns to ranks")
    return data


def cmd_compress(args: argparse.Namespace) -> int:
    from .compress import ErrorAwareConfig, get_method
    from .jobs import CompressJob, DataSource, compress_checkpoint
    from .ranks import DEFAULT_ALLOCATION, Budget

    ranks = _read_ranks_file(args.ranks) if args.ranks else None
    budget = Budget(
        keep=None if ranks is not None else args.keep,
        ranks=ranks,
        rank_multiple=args.rank_multiple,
        allocation=args.allocation or DEFAULT_ALLOCATION,
        force=args.force_rank,
    )
    method = get_method(args.method)
    if getattr(method, "trainable", False):
        from .compress.basel_cli import run_compress

        return run_compress(args, method)
    error_aware = ErrorAwareConfig(args.ls_correction, args.batch_size, args.local_steps, args.local_lr) \
        if args.error_aware else None
    summary = compress_checkpoint(CompressJob(
        output=args.output, data=DataSource(args.task, args.data, args.seq_len, args.seed), model=args.model,
        method=method.name, budget=budget, calib_tokens=args.calib_tokens, error_aware=error_aware,
        batch_size=args.batch_size, threads=args.threads, overwrite=args.overwrite, progress=not args.quiet))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"basel-edge: wrote {args.output} ({summary['method']}, {summary['factorized_linears']} factorized "
            f"linears, {summary['kept_fraction']:.3f} of decoder-linear parameters kept, {summary['seconds']} s)"
        )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .checkpoint import merge_checkpoint
    from .models import resolve_model

    ref = resolve_model(args.model)
    if not ref.factorized:
        raise UserError(f"{ref.path} is not a factorized checkpoint (no basel.json); nothing to merge")
    merge_checkpoint(ref.path, args.output, overwrite=args.overwrite)
    print(f"basel-edge: wrote dense checkpoint {args.output}")
    return 0


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import describe

    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    params = info["params"]
    print(f"{info['path']}: {'factorized' if info['factorized'] else 'dense'} ({info['method']})")
    print(f"  bytes on disk: {info['bytes_on_disk']} ({_human_bytes(info['bytes_on_disk'])})")
    print(
        f"  decoder-linear params: {params.get('factorized', 0):,} of {params.get('dense', 0):,} dense "
        f"({params.get('factorized', 0) / max(params.get('dense', 1), 1):.3f})"
    )
    if "model_total" in params:
        print(f"  model params: {params['model_total']:,}")
    if info["linears"]:
        print(f"  {'linear':<42} {'out x in':>12} {'rank':>6}")
        for name, d in info["linears"].items():
            print(f"  {name:<42} {d['out_features']:>5} x {d['in_features']:<5} {d['rank']:>6}")
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_model
    from .data import load_task, pack
    from .models import load_tokenizer, resolve_model
    from .perplexity import perplexity

    if args.threads:
        torch.set_num_threads(args.threads)
    ref = resolve_model(args.model)
    task = load_task(args.task, args.data, seed=args.seed)
    examples = task.validation if args.split == "validation" else task.train
    if not examples:
        raise UserError(f"task '{task.name}' has no {args.split} split")
    tokenizer = load_tokenizer(ref.path)
    blocks = pack(examples, tokenizer, args.seq_len, max_tokens=args.max_tokens, packing=not task.has_prompt)
    model = load_model(ref.path)
    result = perplexity(model, blocks, batch_size=args.batch_size, progress=not args.quiet)
    out = {"model": str(args.model), "task": task.name, "split": args.split, **vars(result)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.model}: {task.name} {args.split} perplexity {result.perplexity:.4f} over {result.tokens} tokens")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from basel_edge.exporters import ExportJob, export, get_exporter, parse_keep_8bit

    exporter = get_exporter(args.target)
    misplaced = [f"--{d.replace('_', '-')} (--target {name})" for name, dests in args.target_options.items()
                 if name != args.target for d, default in dests.items() if getattr(args, d) != default]
    if misplaced:
        raise UserError(f"{', '.join(misplaced)}: not {'an option' if len(misplaced) == 1 else 'options'} of "
                        f"--target {args.target}")
    job = ExportJob(
        model=args.model, output=args.output, weights=args.weights, keep_8bit=parse_keep_8bit(args.keep_8bit),
        validate=not args.no_validate, overwrite=args.overwrite, progress=not args.quiet,
        options=exporter.options_from({d: getattr(args, d) for d in args.target_options[args.target]}))
    summary = export(args.target, job, log=(lambda *a: None) if args.json or args.quiet else print)
    print(json.dumps(summary, indent=2) if args.json else exporter.describe(summary))
    return 0


def _add_export_parser(sub) -> None:
    from basel_edge import exporters

    p = sub.add_parser("export", help="lower a dense or factorized checkpoint to an edge runtime format")
    p.add_argument("--target", required=True, help="export target (see `--target` list below)")
    add_model_args(p, "dense HF directory or factorized checkpoint")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--weights", help="weight format; each target lists its own (default: the target's default)")
    p.add_argument("--keep-8bit", metavar="LIST",
                   help="4-bit formats: keep these at 8 bits, comma-separated: embedding, output (the lm_head), "
                        "a projection in every layer (q_proj … down_proj) and/or layer numbers, "
                        "e.g. embedding,output,down_proj,0,1")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the checks a target runs after export (" + ", ".join(
                       n for n, t in exporters.targets().items() if t.validates_after_export) + ")")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    options = {}  # target -> {dest: default} of its own options, refused with another --target
    for name in exporters.targets():
        cls = exporters.get_exporter(name)
        group = p.add_argument_group(f"--target {name}: {cls.description}")
        cls.add_arguments(group)
        options[name] = {a.dest: a.default for a in group._group_actions}
    p.set_defaults(func=cmd_export, target_options=options)


def _humaneval_config(args: argparse.Namespace):
    if not args.humaneval:
        if args.limit is not None:
            raise UserError("--limit selects HumanEval problems; add --humaneval")
        return None
    from basel_edge.eval.humaneval import HumanEvalConfig

    try:
        return HumanEvalConfig(**_given(limit=args.limit, batch_size=args.batch))
    except ValueError as exc:
        raise UserError(str(exc)) from None


def cmd_validate(args: argparse.Namespace) -> int:
    from basel_edge.eval.harness import ValidateConfig, run_validation

    cfg = ValidateConfig(
        baseline=args.baseline,
        artifacts=args.artifacts,
        out=args.output,
        backends=[b.strip() for b in args.backends.split(",") if b.strip()],
        **_given(threads=args.threads, seq_len=args.seq_len, eval_tokens=args.eval_tokens, new_tokens=args.new_tokens,
                 reps=args.reps),
        **({"task": args.task, "data": str(args.data) if args.data else None} if args.task or args.data else {}),
        compare_to=args.compare_to,
        overwrite=args.overwrite,
        humaneval=_humaneval_config(args),
        timeout_s=args.timeout,
    )
    report = run_validation(cfg, progress=not args.quiet)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print((Path(args.output) / "report.md").read_text())
        failed = sum(r["status"] == "failed" for r in report["rows"])
        print(f"basel-edge: report in {args.output} (report.json, report.md, PNG plots); {failed} failed row(s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from basel_edge.eval.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=args.output, quick=args.quick, method=args.method, overwrite=args.overwrite,
                        **_given(keep=args.keep, threads=args.threads)))
    return 0


def _add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="compress, export and validate the embedded SmolLM2 end to end")
    p.add_argument("--quick", action="store_true", help="small budgets: a first look in a few minutes")
    p.add_argument("--keep", type=keep_fraction, help="fraction of decoder-linear parameters kept (default 0.5)")
    p.add_argument("--method", help="compression method (default: svd-llm, then fine-tuned; basel or bsi train instead)")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default 2)")
    p.add_argument("-o", "--output", type=Path, default=Path("out/demo"))
    p.add_argument("--overwrite", action="store_true",
                   help="run in a non-empty folder the demo did not make (a folder it made is reused anyway)")
    p.set_defaults(func=cmd_demo)


def _add_validate_parser(sub) -> None:
    p = sub.add_parser("validate", help="measure artifacts on backends against the dense baseline")
    p.add_argument("artifacts", nargs="+", help="model folder, ONNX folder, .pte or .gguf (PATH@SOURCE names the same-weights torch checkpoint)")
    p.add_argument("--baseline", required=True, help="dense HF model folder")
    p.add_argument("--backends", default="cpu", help="comma-separated: cpu, mobile, cuda")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", help="built-in task (default python-code)")
    src.add_argument("--data", type=Path, help="text file/folder, .jsonl, or a datasets folder")
    # no defaults here: ValidateConfig and HumanEvalConfig hold them; only what the user gives is passed on
    p.add_argument("--seq-len", type=positive_int, help="tokens per packed row (default 512)")
    p.add_argument("--eval-tokens", type=positive_int, help="held-out tokens scored for perplexity (default 8192)")
    p.add_argument("--new-tokens", type=positive_int, help="tokens generated per timing run (default 32)")
    p.add_argument("--reps", type=positive_int, help="timing repetitions (default 3)")
    p.add_argument("--threads", type=positive_int, help="CPU threads of every engine (default 2)")
    p.add_argument("--compare-to", type=Path, help="an earlier report.json; flags regressions over 5%%")
    p.add_argument("--humaneval", action="store_true",
                   help="also HumanEval pass@1: greedy generation on each artifact's engine, tests run sandboxed")
    p.add_argument("--limit", type=positive_int, help="HumanEval: only the first N of the 164 problems")
    p.add_argument("--batch", type=positive_int, help="HumanEval: sequences generated at once (default 8)")
    p.add_argument("--timeout", type=positive_int,
                   help="seconds one artifact on one backend may take (default 1800; 14400 with --humaneval)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="report folder (an earlier report there is replaced; any other non-empty folder needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty report folder that holds other files")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_validate)


def build_parser() -> argparse.ArgumentParser:
    from .compress import DEFAULT_CALIB_BATCH, METHODS, ErrorAwareConfig
    from .compress.basel_cli import add_finetune_parser, add_train_arguments
    from .jobs import DEFAULT_CALIB_TOKENS, DEFAULT_METHOD
    from .lowrank import DEFAULT_RANK_MULTIPLE
    from .models import DEFAULT_MODEL
    from .ranks import ALLOCATIONS, DEFAULT_ALLOCATION, DEFAULT_KEEP

    parser = _Parser(prog="basel-edge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"basel-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="factorize a dense model for a task")
    add_model_args(p, "embedded name, HF directory or .gguf", default=DEFAULT_MODEL)
    _add_data_args(p)
    p.add_argument("--method", default=DEFAULT_METHOD, help=f"one of {', '.join(sorted(METHODS))}")
    p.add_argument("--keep", type=keep_fraction, default=DEFAULT_KEEP, help="fraction of decoder-linear parameters kept")
    p.add_argument("--ranks", type=Path, help="JSON of explicit ranks per linear name or pattern (instead of --keep)")
    p.add_argument("--rank-multiple", type=positive_int, default=DEFAULT_RANK_MULTIPLE)
    p.add_argument(
        "--allocation",
        choices=ALLOCATIONS,
        default=None,
        help=f"rank allocation: loss (SVD-family only and their default, {DEFAULT_ALLOCATION!r}: each basis's "
        "truncation error weighted by its output's loss gradient on the calibration data; measured best, README "
        "\"Compression quality\"), uniform (the same fraction everywhere; basel/bsi --prune-mode budget default) "
        "or global (each matrix's share of its own energy)",
    )
    p.add_argument("--force-rank", action="store_true", help="allow explicit ranks above break-even")
    p.add_argument("--calib-tokens", type=positive_int, default=DEFAULT_CALIB_TOKENS)
    p.add_argument("--error-aware", action=argparse.BooleanOptionalAction, default=False,
                   help="SVD-family methods: fit each layer's factors, in order, to the dense outputs from the "
                        "already-compressed model's inputs (README \"Error-aware truncation\")")
    p.add_argument("--ls-correction", type=unit_float, default=ErrorAwareConfig.correction,
                   help="--error-aware: blend of the least-squares target, 0 (re-weight only, the default: measured "
                        "better) .. 1 (full fit)")
    p.add_argument("--local-steps", type=non_negative_int, default=ErrorAwareConfig.local_steps,
                   help="--error-aware: Adam steps per layer training its factors to reproduce the dense layer's "
                        "output (block-wise local distillation; 0: closed form only)")
    p.add_argument("--local-lr", type=positive_float, default=ErrorAwareConfig.local_lr,
                   help="--error-aware: learning rate of --local-steps")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_CALIB_BATCH,
                   help="calibration rows per pass (and per --local-steps step)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_train_arguments(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("merge", help="multiply factors back into a dense HF checkpoint")
    add_model_args(p, "factorized checkpoint directory")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("info", help="ranks, parameter counts and bytes of a checkpoint")
    add_model_args(p, "checkpoint directory or .gguf")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval-ppl", help="held-out perplexity of a dense or factorized model")
    add_model_args(p, "embedded name, dense or factorized checkpoint, or .gguf", default=DEFAULT_MODEL)
    _add_data_args(p)
    p.add_argument("--split", choices=("validation", "train"), default="validation")
    p.add_argument("--max-tokens", type=positive_int, default=DEFAULT_EVAL_TOKENS)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval_ppl)

    add_finetune_parser(sub, _add_data_args, add_model_args)
    _add_export_parser(sub)
    _add_validate_parser(sub)
    _add_demo_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by `timeout`, CI and container runtimes) raised like Ctrl-C, so partial outputs are
    removed on the way out."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _settle_model(args)
    except UserError as exc:
        print(f"basel-edge: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return args.func(args)
    except UserError as exc:
        print(f"basel-edge: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("basel-edge: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("basel-edge: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
