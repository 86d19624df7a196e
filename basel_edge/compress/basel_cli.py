"""Command-line glue for the trained methods: the `compress --method basel|bsi` options and `finetune`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..argtypes import positive_float
from ..errors import UserError
from ..jobs import DEFAULT_CHECKPOINT_EVERY, DEFAULT_TRAIN_BATCH, DEFAULT_TRAIN_SEQ_LEN


LOSS_HELP = ("what training minimises: ce (task cross-entropy), kl (distillation: KL from the dense model's "
             "next-token distribution) or kl+ce (their sum)")


def _add_loss_argument(p: argparse.ArgumentParser) -> None:
    from ..train import DEFAULT_LOSS, LOSSES

    p.add_argument("--loss", choices=LOSSES, default=DEFAULT_LOSS, help=LOSS_HELP + f" (default {DEFAULT_LOSS})")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the trained methods (ignored by the SVD-family ones)."""
    from .basel import PRUNE_MODES, BaselConfig as C  # its field defaults are the options' defaults

    g = p.add_argument_group("trained methods (--method basel / bsi)")
    g.add_argument("--steps", type=int, default=C.steps, help=f"part-1 optimisation steps (default {C.steps})")
    g.add_argument("--keep-steps", type=int, default=None, help="steps before the first pruning event (default steps/4)")
    g.add_argument("--prune-events", type=int, default=C.prune_events)
    g.add_argument("--prune-mode", choices=PRUNE_MODES, default=C.mode,
                   help="budget: reach --keep of decoder-linear parameters; mass: keep --mass of each matrix's "
                        "coefficient mass (the paper)")
    g.add_argument("--mass", type=positive_float, default=C.mass, help="coefficient mass K kept in --prune-mode mass")
    g.add_argument("--basis", default=C.basis,
                   help="SVD-family method supplying the frozen bases (svd = the paper's plain SVD)")
    g.add_argument("--r-add", type=int, default=C.r_add, help="new trainable bases per matrix")
    g.add_argument("--lr", type=positive_float, default=C.lr, help="learning rate of the basis coefficients")
    g.add_argument("--lr-add", type=positive_float, default=C.lr_add, help="learning rate of the new bases")
    g.add_argument("--train-seq-len", type=int, default=DEFAULT_TRAIN_SEQ_LEN, help="tokens per training row")
    g.add_argument("--train-batch-size", type=int, default=DEFAULT_TRAIN_BATCH, help="training rows per step")
    g.add_argument("--train-tokens", type=int, default=None,
                   help="tokens of task data to draw training rows from (default steps·batch·seq-len)")
    g.add_argument("--bsi-hessian", choices=("fisher", "hutchinson"), default=C.bsi_hessian,
                   help="bsi: diag(H) from the empirical Fisher of per-position gradients (default) or from "
                        "symmetric Hutchinson probes of all coefficients (noisy on real models, README)")
    g.add_argument("--bsi-probes", type=int, default=C.bsi_probes, help="bsi: batches (Fisher) or probes (Hutchinson) per event")
    g.add_argument("--bsi-first-order", action=argparse.BooleanOptionalAction, default=C.bsi_first_order,
                   help="bsi: include the gradient term -g_i c_i of the loss-increase estimate (off: measured "
                        "worse, README)")
    g.add_argument("--finetune-steps", type=int, default=C.finetune_steps, help="part 2: fine-tune both factors afterwards")
    g.add_argument("--finetune-lr", type=positive_float, default=C.finetune_lr)
    _add_loss_argument(g)
    g.add_argument("--train-dense", action="store_true",
                   help="part 1 also trains the norms and the embedding (the released Basel code trains all)")
    g.add_argument("--dense-lr", type=positive_float, default=C.dense_lr, help="learning rate of --train-dense")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    g.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY,
                   help="save training state every M steps (0: never)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its saved state")


def run_compress(args: argparse.Namespace, method) -> int:
    """`basel-edge compress --method basel|bsi`: parse the options into a TrainedCompressJob and run it."""
    from ..jobs import DataSource, TrainedCompressJob, compress_checkpoint
    from ..train import LoopConfig
    from .basel import BaselConfig, default_checkpoint_dir

    if args.ranks:
        raise UserError(f"--ranks is not supported by '{method.name}'; give --keep (or --prune-mode mass)")
    if args.error_aware:
        raise UserError(f"--error-aware refits the SVD-family methods' factors; '{method.name}' starts from the plain "
                        "--basis bases (at full rank the error-aware bases are these, README \"Compression quality\")")
    steps = args.steps
    cfg = BaselConfig(
        keep=args.keep, mode=args.prune_mode, mass=args.mass, importance=method.importance, basis=args.basis,
        **({"allocation": args.allocation} if args.allocation else {}),
        r_add=args.r_add, rank_multiple=args.rank_multiple, steps=steps, keep_steps=args.keep_steps,
        prune_events=args.prune_events, lr=args.lr, lr_add=args.lr_add, finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
        bsi_hessian=args.bsi_hessian, bsi_probes=args.bsi_probes, bsi_first_order=args.bsi_first_order,
        loss=args.loss, train_dense=args.train_dense, dense_lr=args.dense_lr,
    )
    loop = LoopConfig(steps=steps, batch_size=args.train_batch_size, seed=args.seed, device=args.device,
                      grad_checkpointing=args.grad_checkpointing, checkpoint_every=args.checkpoint_every,
                      checkpoint_dir=default_checkpoint_dir(args.output), resume=args.resume)
    job = TrainedCompressJob(
        output=args.output, data=DataSource(args.task, args.data, args.seq_len, args.seed), basel=cfg, loop=loop,
        model=args.model, train_seq_len=args.train_seq_len, train_tokens=args.train_tokens,
        calib_tokens=args.calib_tokens, threads=args.threads, overwrite=args.overwrite, progress=not args.quiet)
    summary = compress_checkpoint(job)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"basel-edge: wrote {args.output} ({summary['method']}, {summary['factorized_linears']} factorized "
              f"linears, {summary['kept_fraction']:.3f} of decoder-linear parameters kept, {summary['train_tokens']} "
              f"training tokens, {summary['seconds']} s, peak RSS {summary['peak_rss_mib']:.0f} MiB)")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """`basel-edge finetune CKPT`: part 2, fine-tune both factors of every factorized linear."""
    from ..jobs import DataSource, FinetuneJob, finetune_checkpoint

    summary = finetune_checkpoint(FinetuneJob(
        model=args.model, output=args.output, data=DataSource(args.task, args.data, args.seq_len, args.seed),
        steps=args.steps, lr=args.lr, schedule=args.schedule, batch_size=args.batch_size,
        train_tokens=args.train_tokens, loss=args.loss, teacher=args.teacher, train_rows=args.train_rows,
        dense_lr=args.dense_lr if args.train_dense else None, device=args.device,
        grad_checkpointing=args.grad_checkpointing, compile=args.compile, threads=args.threads,
        overwrite=args.overwrite, progress=not args.quiet))
    print(f"basel-edge: wrote {args.output} ({summary['method']}, {summary['train_tokens']} fine-tuning tokens, "
          f"final loss {summary['final_loss']:.4f})")
    return 0


def add_finetune_parser(sub, add_data_args, add_model_args) -> None:
    from ..data import DEFAULT_TRAIN_ROWS, TRAIN_ROWS
    from ..train import DEFAULT_DENSE_LR, DEFAULT_FINETUNE_SCHEDULE, SCHEDULES

    p = sub.add_parser("finetune", help="part 2: fine-tune both factors of a factorized checkpoint on a task")
    add_model_args(p, "factorized checkpoint directory")
    add_data_args(p, seq_len=DEFAULT_TRAIN_SEQ_LEN)  # part 2's rows are part 1's and the demo's
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--schedule", choices=SCHEDULES, default=DEFAULT_FINETUNE_SCHEDULE,
                   help=f"learning rate over the run: held at --lr, or cosine decay from it (default "
                        f"{DEFAULT_FINETUNE_SCHEDULE})")
    p.add_argument("--batch-size", type=int, default=DEFAULT_TRAIN_BATCH)
    p.add_argument("--train-tokens", type=int, default=None)
    p.add_argument("--train-rows", choices=TRAIN_ROWS, default=DEFAULT_TRAIN_ROWS,
                   help="packed: the token budget packed from the heads of ~32 documents; windows: one row from "
                        f"each of as many documents, at a random offset (plain text only; default {DEFAULT_TRAIN_ROWS})")
    _add_loss_argument(p)
    p.add_argument("--train-dense", action="store_true",
                   help="also train every parameter outside the factorized linears (the decoder linears the rank "
                        "allocation kept dense, norms, embedding) at --dense-lr")
    p.add_argument("--dense-lr", type=positive_float, default=DEFAULT_DENSE_LR,
                   help=f"learning rate of --train-dense (default {DEFAULT_DENSE_LR:g})")
    p.add_argument("--teacher", help="the dense model that --loss kl distils from (default: the one the checkpoint "
                                     "was compressed from)")
    p.add_argument("--device", default="auto")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step: faster steps after a compilation of a minute or two "
                        "(cached for later runs); trains without it if compilation fails")
    p.add_argument("--threads", type=int)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_finetune)
