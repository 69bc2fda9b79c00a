"""Empirical Fisher diagonal of every planned weight, from per-sequence gradients of the LM loss."""

from __future__ import annotations

import logging
import time
from functools import partial
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from bitplan.db.types import Module
from bitplan.db.files import atomic_write

log = logging.getLogger(__name__)


@contextmanager
def gradients_of(model: nn.Module, weights: list[torch.Tensor], device: str):
    """The model on `device` with gradients for `weights` only; on the CPU, each parameter's
    `requires_grad` as before, when done (also on error)."""
    was = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")
        for p, r in was.items():
            p.requires_grad_(r)

# F is as large as the planned weights (float32), so it is saved only this often, not every sequence
CHECKPOINT_SECONDS = 300.0


def fisher_diagonal(model: nn.Module, batches: torch.Tensor, planned: list[tuple[Module, nn.Linear]],
                    device: str = "cpu", progress: bool = True, checkpoint: str | Path | None = None,
                    every_s: float | None = None) -> dict[str, torch.Tensor]:
    """`F[name]: [N, K]`, the per-token empirical Fisher estimated from per-sequence gradients.

    The whole model takes part in the backward pass, so unlike the Hessian statistics this is not
    streamed block by block: the device holds every weight, and the backward pass its activations.

    With `checkpoint` (a file) the accumulators and the number of sequences done are saved there
    after a sequence, at most every `every_s` seconds (default `CHECKPOINT_SECONDS`), and a pass that
    finds one continues after its last saved sequence: the same sums in the same order, so the same
    `F` to the bit.
    """
    weights = [lin.weight for _, lin in planned]
    F = [torch.zeros_like(w, dtype=torch.float32, device=device) for w in weights]
    names = [m.name for m, _ in planned]
    start = 0
    checkpoint = None if checkpoint is None else Path(checkpoint)
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
        if saved["n"] == len(batches) and list(saved["F"]) == names and all(
                saved["F"][k].shape == f.shape for k, f in zip(names, F)):
            F, start = [saved["F"][k] for k in names], int(saved["done"])
            log.info("fisher: resuming after sequence %d of %d from %s", start, len(batches), checkpoint)
    every_s = CHECKPOINT_SECONDS if every_s is None else every_s
    saved_at = time.monotonic()
    with gradients_of(model, weights, device):
        for s in tqdm(range(start, len(batches)), desc="fisher (fwd+bwd)", unit="seq", initial=start,
                      total=len(batches), disable=not progress):
            ids = batches[s].unsqueeze(0).to(device)
            logits = model(ids, use_cache=False).logits[0, :-1].float()
            loss = nn.functional.cross_entropy(logits, ids[0, 1:])
            # a routed expert that no token of this sequence reaches takes no part in the graph
            for f, g in zip(F, torch.autograd.grad(loss, weights, allow_unused=True)):
                if g is not None:
                    f.addcmul_(g.float(), g.float())
            if checkpoint is not None and time.monotonic() - saved_at >= every_s:
                state = {"n": len(batches), "done": s + 1, "F": dict(zip(names, F))}
                atomic_write(checkpoint, partial(torch.save, state))
                saved_at = time.monotonic()
    # A sequence's mean gradient averages T token gradients, shrinking their squares by ~T; scale back
    # so that ½ Σ F ⊙ ΔW² reads as nats per token.
    scale = batches.shape[1] / len(batches)
    return {m.name: f.mul_(scale) for (m, _), f in zip(planned, F)}
