"""Empirical Fisher diagonal of every planned weight, from per-sequence gradients of the LM loss."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from bitplan.db.types import Module


def fisher_diagonal(model: nn.Module, batches: torch.Tensor, planned: list[tuple[Module, nn.Linear]],
                    device: str = "cpu", progress: bool = True) -> dict[str, torch.Tensor]:
    """`F[name]: [N, K]`, the per-token empirical Fisher estimated from per-sequence gradients.

    The whole model takes part in the backward pass, so unlike the Hessian statistics this is not
    streamed block by block.
    """
    weights = [lin.weight for _, lin in planned]
    was = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    F = [torch.zeros_like(w, dtype=torch.float32, device=device) for w in weights]
    model.to(device)
    try:
        for row in tqdm(batches, desc="fisher (fwd+bwd)", unit="seq", disable=not progress):
            ids = row.unsqueeze(0).to(device)
            logits = model(ids, use_cache=False).logits[0, :-1].float()
            loss = nn.functional.cross_entropy(logits, ids[0, 1:])
            # a routed expert that no token of this sequence reaches takes no part in the graph
            for f, g in zip(F, torch.autograd.grad(loss, weights, allow_unused=True)):
                if g is not None:
                    f.addcmul_(g.float(), g.float())
    finally:
        model.to("cpu")
        for p, r in was.items():
            p.requires_grad_(r)
    # A sequence's mean gradient averages T token gradients, shrinking their squares by ~T; scale back
    # so that ½ Σ F ⊙ ΔW² reads as nats per token.
    scale = batches.shape[1] / len(batches)
    return {m.name: f.mul_(scale) for (m, _), f in zip(planned, F)}
