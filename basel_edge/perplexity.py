"""Perplexity of a dense or factorized torch model on held-out token blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from .data import IGNORE_INDEX, TokenBlocks


@dataclass
class PerplexityResult:
    """exp(mean negative log-likelihood) over every scored token."""

    perplexity: float
    nll: float
    tokens: int


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and count of scored tokens for one batch (labels are shifted by one, as in HF)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (shift_labels != IGNORE_INDEX).sum()


@torch.inference_mode()
def perplexity(
    model: nn.Module, blocks: TokenBlocks, batch_size: int = 4, progress: bool = True, desc: str = "perplexity"
) -> PerplexityResult:
    """Score `blocks` with `model` and return the perplexity (right padding is never scored)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    starts = range(0, len(blocks), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        ids = blocks.input_ids[start : start + batch_size].to(device)
        labels = blocks.labels[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        loss, n = token_nll(logits, labels)
        total += float(loss)
        count += int(n)
    if count == 0:
        raise ValueError("no scored tokens in the evaluation blocks")
    nll = total / count
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=count)
