"""How well do BSI's loss-increase estimates rank bases? Measured against single-basis ablation on SmolLM2-135M.

At the start of a BSI run (SVD-LLM bases at full rank, coefficients c = σ), for a few decoder linears, removes
one basis at a time and measures the loss increase on one training batch; then ranks the same bases by the
coefficient (Basel), by the Fisher estimate and by Hutchinson estimates with a growing number of probes of all
coefficients at once (what the pruner does), and reports the Spearman correlation of each with the measured
increase. Writes eval/results/bsi-estimates.{json,md}.

    python -m basel_edge.eval.bsi_estimates [--probes 2 8 32]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from basel_edge.compress import METHODS
from basel_edge.compress.basel import (
    BaselConfig,
    basel_layers,
    bsi_importance,
    fisher_importance,
    to_basel,
)
from basel_edge.compress.calibration import collect
from basel_edge.data import load_task, pack
from basel_edge.models import DEFAULT_MODEL, load_dense, load_tokenizer, resolve_model
from basel_edge.train import batch_loss

RESULTS = Path(__file__).parent / "results"
LAYERS = ("model.layers.10.mlp.down_proj", "model.layers.10.self_attn.q_proj", "model.layers.3.mlp.up_proj")
# bases by descending σ: the top ones densely, then spread to the tail
BASES = (0, 1, 2, 3, 5, 8, 12, 20, 32, 50, 80, 128, 200, 300, 400, 500)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, nargs="+", default=[2, 8, 32], help="Hutchinson probe counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ref = resolve_model(DEFAULT_MODEL)
    tok = load_tokenizer(ref.path)
    task = load_task("python-code")
    blocks = pack(task.train, tok, 256, max_tokens=4096)
    calibration = pack(task.train, tok, 512, max_tokens=16384)
    model = load_dense(ref.path)
    stats = collect(model, calibration, METHODS["svd-llm"].needs, progress=False)
    to_basel(model, BaselConfig(keep=0.4, r_add=0), stats, torch.device("cpu"), progress=False)
    layers = basel_layers(model)
    rows = torch.tensor([0, 1])
    ids, labels = blocks.input_ids[rows], blocks.labels[rows]
    idx = torch.tensor(BASES)

    def loss() -> float:
        with torch.no_grad():
            return float(batch_loss(model, ids, labels, False))

    base_loss = loss()
    measured = {}
    for name in LAYERS:
        m, out = layers[name], []
        for i in BASES:
            m.mask[i] = 0.0
            out.append(loss() - base_loss)
            m.mask[i] = 1.0
        measured[name] = torch.tensor(out)

    estimates: dict[str, dict[str, torch.Tensor]] = {
        "coefficient c": {n: layers[n].w.detach().square() for n in LAYERS}}
    seconds = {"coefficient c": 0.0}
    start = time.perf_counter()
    fisher = fisher_importance(model, layers, blocks, [rows], amp=False)
    seconds["Fisher, 1 batch"] = time.perf_counter() - start
    estimates["Fisher, 1 batch"] = fisher
    for p in args.probes:
        label = f"Hutchinson, {p} probes"
        start = time.perf_counter()
        estimates[label] = bsi_importance(model, layers, blocks, rows, p, 1e-2, torch.Generator().manual_seed(p),
                                          amp=False)
        seconds[label] = time.perf_counter() - start

    rows_out = []
    for label, est in estimates.items():
        row = {"estimate": label, "seconds": round(seconds[label], 1), "spearman": {}, "negative_fraction": {},
               "top_basis": {}}
        for name in LAYERS:
            e = est[name].float()
            row["spearman"][name] = spearman(e[idx], measured[name])
            row["negative_fraction"][name] = float((e < 0).float().mean())
            row["top_basis"][name] = float(e[0])
        rows_out.append(row)
    report = {
        "model": "SmolLM2-135M-Instruct, SVD-LLM bases at full rank (c = σ), python-code",
        "batch": "2 rows x 256 tokens (training rows 0 and 1); the same batch for ablation and estimates",
        "bases": list(BASES),
        "measured_loss_increase": {n: measured[n].tolist() for n in LAYERS},
        "rows": rows_out,
    }
    head = "| ranking by | " + " | ".join(f"Spearman, {n.removeprefix('model.')}" for n in LAYERS) + \
           " | negative estimates | top basis: estimate / measured (" + LAYERS[1].removeprefix("model.") + ") | s |"
    lines = [head, "|---|" + "---:|" * (len(LAYERS) + 3)]
    for r in rows_out:
        neg = sum(r["negative_fraction"].values()) / len(LAYERS)
        top = "–" if r["estimate"] == "coefficient c" else \
            f"{r['top_basis'][LAYERS[1]]:.3g} / {float(measured[LAYERS[1]][0]):.3g}"
        lines.append(f"| {r['estimate']} | " + " | ".join(f"{r['spearman'][n]:+.2f}" for n in LAYERS) +
                     f" | {neg:.0%} | {top} | {r['seconds']:.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bsi-estimates.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "bsi-estimates.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
