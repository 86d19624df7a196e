"""Compression methods on one code path: statistics → weighted SVD → rank allocation → LowRankLinear."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..data import TokenBlocks
from ..errors import UserError
from ..lowrank import decoder_linears, low_rank_from_factors, set_module
from ..ranks import Budget, MatrixScores, allocate, params_for
from . import asvd, basel, fwsvd, svd, svd_llm  # noqa: F401  (register the methods)
from .base import Decomposition, Method, Weighting, decompose
from .calibration import DEFAULT_CALIB_BATCH, CalibrationStats, collect
from .error_aware import ErrorAwareConfig, refit_sequential
from .registry import METHODS, get_method, register

__all__ = [
    "METHODS",
    "Budget",
    "CalibrationStats",
    "CompressionResult",
    "Decomposition",
    "ErrorAwareConfig",
    "Method",
    "Weighting",
    "apply_ranks",
    "compress",
    "decompose_model",
    "get_method",
    "register",
]


@dataclass
class CompressionResult:
    """What `compress` did: the rank per linear (None = dense) and parameter counts."""

    ranks: dict[str, int | None]
    params: dict[str, int]
    method: str


def decompose_model(
    model: nn.Module, method: Method, stats: CalibrationStats, progress: bool = True
) -> dict[str, Decomposition]:
    """Weighted SVD of every decoder linear (single-threaded: many small SVDs run faster that way)."""
    linears = decoder_linears(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for name, module in tqdm(linears.items(), desc=f"{method.name} SVD", unit="matrix", disable=not progress):
            w = module.weight.detach()
            out[name] = decompose(w, method.weighting(name, w, stats), dtype=w.dtype)
        return out
    finally:
        torch.set_num_threads(threads)


def apply_ranks(model: nn.Module, decomps: dict[str, Decomposition], ranks: dict[str, int | None]) -> None:
    """Swap each linear with an assigned rank for its LowRankLinear (in place)."""
    linears = decoder_linears(model)
    for name, rank in ranks.items():
        if rank is None:
            continue
        module = linears[name]
        a, b = decomps[name].factors(rank)
        bias = module.bias.detach() if module.bias is not None else None
        set_module(model, name, low_rank_from_factors(a.to(module.weight.device), b.to(module.weight.device), bias))


def compress(
    model: nn.Module,
    method: str | Method,
    budget: Budget,
    calibration: TokenBlocks | None = None,
    progress: bool = True,
    batch_size: int = DEFAULT_CALIB_BATCH,
    error_aware: ErrorAwareConfig | None = None,
) -> CompressionResult:
    """Factorize the decoder linears of `model` in place with an SVD-family method under `budget`; with
    `error_aware`, the ranks are allocated as without it and the factors refitted layer by layer
    (error_aware.py)."""
    m = get_method(method) if isinstance(method, str) else method
    if getattr(m, "trainable", False):
        raise UserError(f"'{m.name}' trains on the task; use basel_edge.compress.basel.run_basel")
    if error_aware is not None and (calibration is None or len(calibration) == 0):
        raise UserError("error-aware truncation runs the calibration data through the model; give calibration data")
    linears = decoder_linears(model)
    loss_aware = budget.keep is not None and budget.allocation == "loss"
    if loss_aware and (calibration is None or len(calibration) == 0):
        raise UserError("--allocation loss weighs each matrix by the loss gradient on calibration data; give some")
    stats = collect(model, calibration, m.needs | ({"outgrad"} if loss_aware else set()), batch_size=batch_size,
                    progress=progress)
    decomps = decompose_model(model, m, stats, progress=progress)
    # loss: a basis's σ² is the squared output error it carries (exact for svd-llm's whitening), and the mean
    # squared loss gradient of that output turns it into an estimated loss increase (diagonal, isotropic model)
    matrices = {
        name: MatrixScores(mod.in_features, mod.out_features,
                           decomps[name].scores * stats.outgrad[name] if loss_aware else decomps[name].scores)
        for name, mod in linears.items()
    }
    ranks = allocate(budget, matrices)
    if error_aware is None:
        apply_ranks(model, decomps, ranks)
    else:
        del decomps
        refit_sequential(model, m, ranks, calibration, stats, error_aware, progress=progress)
    dense = sum(x.dense_params for x in matrices.values())
    return CompressionResult(ranks=ranks, params={"dense": dense, "factorized": params_for(ranks, matrices)}, method=m.name)
