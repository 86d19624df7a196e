"""Error-aware truncation: factor each linear against the error the already-compressed layers make.

SVD-LLM truncates every matrix on its dense inputs X. After the earlier layers are compressed, a linear sees
shifted inputs X' instead. Here the decoder layers are processed in order on the calibration rows, a dense
stream (inputs X) and a compressed stream (inputs X') side by side, and each linear's factors are fitted to
the dense layer's outputs from the compressed model's inputs:

    min over rank-r W'  ‖X Wᵀ − X' W'ᵀ‖²   =   ‖X Wᵀ − X' W*ᵀ‖² + ‖X' (W* − W')ᵀ‖²,   W* = W (XᵀX') (X'ᵀX')⁻¹

so W' is the method's weighted truncation of the least-squares target W*, its statistics taken on X'. The
`correction` blends the target, (1 − c)·W + c·W*: 0 only re-weights the truncation with the shifted inputs, 1 is
the full least-squares fit, which can over-fit the calibration rows (measured in README "Error-aware").
Inside a layer the projections are refitted in the order their inputs depend on each other (q/k/v, o,
gate/up, down), so o_proj already sees the compressed q/k/v. Only one decoder layer's inputs are in memory.

With `local_steps`, each layer's factors are then trained for that many Adam steps to reproduce the dense
layer's output from the compressed model's inputs (block-wise local distillation, as Lillama does from SVD
initialisation): one block in memory at a time, before the next layer is fitted.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..data import TokenBlocks
from ..errors import UserError
from ..families import family_of
from ..lowrank import LowRankLinear, low_rank_from_factors, set_module
from .base import Method, decompose
from .calibration import DEFAULT_CALIB_BATCH, CalibrationStats

RIDGE = 1e-6  # × mean diagonal of X'ᵀX', added before solving for W*


@dataclass
class ErrorAwareConfig:
    """How the sequential refit runs: the least-squares `correction` in [0, 1] (0, re-weighting only, measured
    better than the full least-squares fit 1 on SmolLM2: README "Compression quality") and the batch of rows."""

    correction: float = 0.0
    batch_size: int = DEFAULT_CALIB_BATCH
    local_steps: int = 0
    local_lr: float = 1e-4

    def __post_init__(self) -> None:
        if not (0.0 <= self.correction <= 1.0) or math.isnan(self.correction):
            raise UserError(f"the least-squares correction must be in [0, 1], got {self.correction}")
        if self.batch_size < 1:
            raise UserError(f"the batch size must be positive, got {self.batch_size}")
        if self.local_steps < 0:
            raise UserError(f"local distillation steps must be non-negative, got {self.local_steps}")
        if not 0.0 < self.local_lr < math.inf:
            raise UserError(f"the local distillation learning rate must be positive and finite, got {self.local_lr}")


class _LayerInputs(Exception):
    """Raised by the capture hook to stop a forward once every layer's call arguments are recorded."""


def _stop(module, args):
    raise _LayerInputs


def _capture(model: nn.Module, layers: nn.ModuleList, blocks: TokenBlocks, batch_size: int):
    """For each calibration batch: the first layer's hidden states and every layer's keyword arguments
    (position embeddings, masks: per layer, as families like Gemma mix attention types). The forward stops at
    the final norm, so no logits are computed."""
    hidden, kwargs = [], [[] for _ in layers]
    hooks = [model.model.norm.register_forward_pre_hook(_stop)]
    for i, layer in enumerate(layers):
        def hook(module, args, kw, _i=i):
            if _i == 0:
                hidden.append(args[0].detach() if args else kw.pop("hidden_states").detach())
            kwargs[_i].append({k: v for k, v in kw.items() if k != "hidden_states"})
        hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(blocks), batch_size):
                try:
                    model(input_ids=blocks.input_ids[start:start + batch_size].to(device), use_cache=False)
                except _LayerInputs:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return hidden, kwargs


def _run(layer: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
    out = layer(h, **kw)
    return out[0] if isinstance(out, tuple) else out


def _stage_inputs(dense: nn.Module, comp: nn.Module, names: list[str], hs: list, hcs: list, kwargs: list):
    """X'ᵀX', XᵀX' and Σ|X'| per channel of the linears `names` (relative to the layer; they read one input)
    over all batches."""
    gram = cross = absolute = None
    got: dict[str, torch.Tensor] = {}

    def grab(key):
        def hook(module, args):
            got[key] = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        return hook

    hooks = [dense.get_submodule(names[0]).register_forward_pre_hook(grab("x")),
             comp.get_submodule(names[0]).register_forward_pre_hook(grab("x'"))]
    try:
        with torch.no_grad():
            for h, hc, kw in zip(hs, hcs, kwargs):
                _run(dense, h, kw)
                _run(comp, hc, kw)
                x, xc = got["x"], got["x'"]
                gram = xc.T @ xc if gram is None else gram + xc.T @ xc
                cross = x.T @ xc if cross is None else cross + x.T @ xc
                absolute = xc.abs().sum(0) if absolute is None else absolute + xc.abs().sum(0)
    finally:
        for hook in hooks:
            hook.remove()
    return gram, cross, absolute


def distil_layer(layer: nn.Module, inputs: list, targets: list, kwargs: list, steps: int, lr: float) -> float | None:
    """Train the factors of `layer`'s LowRankLinears for `steps` Adam steps (one calibration batch each, in turn)
    so its output from `inputs` matches `targets`; the loss is the squared error relative to the targets'
    mean square. Returns the last loss (None when the layer has no factors)."""
    factors = [p for m in layer.modules() if isinstance(m, LowRankLinear) for p in (m.a.weight, m.b.weight)]
    if not factors or not steps:
        return None
    flags = {p: p.requires_grad for p in layer.parameters()}
    for p in layer.parameters():
        p.requires_grad_(False)
    for p in factors:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(factors, lr=lr)
    scales = [float(t.float().square().mean()) or 1.0 for t in targets]
    loss = None
    try:
        for step in range(steps):
            j = step % len(inputs)
            loss = (_run(layer, inputs[j], kwargs[j]).float() - targets[j].float()).square().mean() / scales[j]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return float(loss.detach())


def refit_sequential(
    model: nn.Module,
    method: Method,
    ranks: dict[str, int | None],
    blocks: TokenBlocks,
    dense_stats: CalibrationStats,
    cfg: ErrorAwareConfig,
    progress: bool = True,
) -> None:
    """Replace every linear with a rank in `ranks` by its error-aware factors (in place), layer by layer.
    `dense_stats` supplies what the shifted inputs cannot (FWSVD's gradients)."""
    family = family_of(model.config)
    layers = model.model.layers
    hidden, kwargs = _capture(model, layers, blocks, cfg.batch_size)
    hs, hcs = hidden, [h.clone() for h in hidden]
    a, m = family.attention, family.mlp
    q, k, v, o = family.attention_projections
    gate, up, down = family.mlp_projections
    stages = [[f"{a}.{q}", f"{a}.{k}", f"{a}.{v}"], [f"{a}.{o}"], [f"{m}.{gate}", f"{m}.{up}"], [f"{m}.{down}"]]
    threads = torch.get_num_threads()
    for i in tqdm(range(len(layers)), desc=f"error-aware {method.name}", unit="layer", disable=not progress):
        comp = layers[i]
        dense = copy.deepcopy(comp)
        for stage in stages:
            todo = [n for n in stage if ranks.get(f"model.layers.{i}.{n}") is not None]
            if not todo:
                continue
            gram, cross, absolute = _stage_inputs(dense, comp, stage, hs, hcs, kwargs[i])
            eye = torch.eye(gram.shape[0], dtype=gram.dtype)
            ridge = RIDGE * float(torch.diagonal(gram).mean() or 1.0)
            tokens = int(sum(h.shape[0] * h.shape[1] for h in hcs))
            shifted = CalibrationStats(family, tokens=tokens)
            torch.set_num_threads(1)
            try:
                for name in todo:
                    full = f"model.layers.{i}.{name}"
                    for key in (full, family.input_key(full)):
                        shifted.xtx[key], shifted.absmean[key] = gram, absolute / tokens
                    if full in dense_stats.fisher:
                        shifted.fisher[full] = dense_stats.fisher[full]
                    module = dense.get_submodule(name)
                    w = module.weight.detach().double()
                    target = w
                    if cfg.correction:
                        least_squares = torch.linalg.solve(gram + ridge * eye, (w @ cross).T).T
                        target = (1 - cfg.correction) * w + cfg.correction * least_squares
                    decomposition = decompose(target, method.weighting(full, target.float(), shifted),
                                              dtype=module.weight.dtype)
                    fa, fb = decomposition.factors(ranks[full])
                    bias = module.bias.detach() if module.bias is not None else None
                    set_module(comp, name, low_rank_from_factors(fa, fb, bias))
            finally:
                torch.set_num_threads(threads)
        with torch.no_grad():
            hs = [_run(dense, h, kw) for h, kw in zip(hs, kwargs[i])]
        distil_layer(comp, hcs, hs, kwargs[i], cfg.local_steps, cfg.local_lr)
        with torch.no_grad():
            hcs = [_run(comp, h, kw) for h, kw in zip(hcs, kwargs[i])]
        del dense
