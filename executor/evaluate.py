"""Measurements on a model: perplexity over fixed windows of held-out text."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: str = "cpu", progress: bool = True) -> float:
    """exp(mean next-token NLL) over `windows: [n, window]`, each scored on its own (stride = window)."""
    model.to(device)
    nll, count = 0.0, 0
    for row in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        ids = row.unsqueeze(0).to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        nll += float(nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / count)
