"""Statistics of the calibration data that the SVD-family methods weight their decompositions with.

- `xtx`: XᵀX of each linear's input (SVD-LLM whitening), accumulated in float64;
- `absmean`: mean |x| per input channel (ASVD activation scaling);
- `fisher`: per output row, the sum of squared loss gradients of the weight (FWSVD);
- `outgrad`: the mean squared loss gradient of each linear's output, over tokens and channels: how much an
  output error there costs (`--allocation loss` scales each matrix's truncation errors by it).
Projections that read the same tensor (q/k/v, gate/up) share one input statistic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ..data import TokenBlocks
from ..families import ModelFamily, family_of
from ..lowrank import decoder_linears

STATISTICS = ("xtx", "absmean", "fisher", "outgrad")


@dataclass
class CalibrationStats:
    """Per-linear statistics; look them up with the linear's own name (linears that read one input, as the
    model family says, share its statistic)."""

    family: ModelFamily
    xtx: dict[str, torch.Tensor] = field(default_factory=dict)
    absmean: dict[str, torch.Tensor] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    outgrad: dict[str, float] = field(default_factory=dict)
    tokens: int = 0

    def input_xtx(self, name: str) -> torch.Tensor:
        return self.xtx[self.family.input_key(name)]

    def input_absmean(self, name: str) -> torch.Tensor:
        return self.absmean[self.family.input_key(name)]


DEFAULT_CALIB_BATCH = 4  # calibration rows per forward (and backward) pass: a memory bound, not a result


def collect(
    model: nn.Module,
    blocks: TokenBlocks | None,
    needs: frozenset[str],
    batch_size: int = DEFAULT_CALIB_BATCH,
    progress: bool = True,
) -> CalibrationStats:
    """Run the calibration blocks through the model once and gather the statistics in `needs`."""
    stats = CalibrationStats(family_of(model.config))
    unknown = set(needs) - set(STATISTICS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}")
    if not needs:
        return stats
    if blocks is None or len(blocks) == 0:
        raise ValueError(f"calibration data is required for statistics {sorted(needs)}")
    linears = decoder_linears(model)
    hooks = []
    input_stats = {"xtx", "absmean"} & needs
    if input_stats:
        for name, module in linears.items():
            if stats.family.input_key(name) != name:
                continue

            def hook(mod, args, _name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                if "xtx" in needs:
                    g = (x.T @ x).double()
                    stats.xtx[_name] = stats.xtx[_name] + g if _name in stats.xtx else g
                if "absmean" in needs:
                    a = x.abs().sum(0).double()
                    stats.absmean[_name] = stats.absmean[_name] + a if _name in stats.absmean else a

            hooks.append(module.register_forward_pre_hook(hook))
    want_grad = bool({"fisher", "outgrad"} & needs)
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    if "fisher" in needs:
        for module in linears.values():
            module.weight.requires_grad_(True)
    elif want_grad:
        model.get_input_embeddings().weight.requires_grad_(True)  # so every linear's output has a gradient
    if "outgrad" in needs:
        for name, module in linears.items():
            def out_hook(mod, args, output, _name=name):
                def grad_hook(grad):
                    g = float(grad.detach().double().square().sum())
                    stats.outgrad[_name] = stats.outgrad.get(_name, 0.0) + g / grad.shape[-1]
                output.register_hook(grad_hook)

            hooks.append(module.register_forward_hook(out_hook))
    device = next(model.parameters()).device
    try:
        starts = range(0, len(blocks), batch_size)
        for start in tqdm(starts, desc="calibration", unit="batch", disable=not progress, leave=False):
            ids = blocks.input_ids[start : start + batch_size].to(device)
            labels = blocks.labels[start : start + batch_size].to(device)
            stats.tokens += ids.numel()
            if want_grad:
                out = model(input_ids=ids, labels=labels, use_cache=False)
                out.loss.backward()
                for name, module in linears.items() if "fisher" in needs else ():
                    g = module.weight.grad.detach().double().pow(2).sum(1)
                    stats.fisher[name] = stats.fisher[name] + g if name in stats.fisher else g
                    module.weight.grad = None
            else:
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
    for key in stats.absmean:
        stats.absmean[key] = stats.absmean[key] / max(stats.tokens, 1)
    for key in stats.outgrad:
        stats.outgrad[key] = stats.outgrad[key] / max(stats.tokens, 1)
    return stats
