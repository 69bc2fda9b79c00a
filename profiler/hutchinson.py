"""HAWQ-V2's Hutchinson trace: `tr(∇²_W L)` of every planned weight, from Hessian-vector products.

For a Rademacher vector `v` (entries ±1), `E[vᵀ H v] = tr(H)`.  One probe spans every planned weight
at once: the double backward gives `H v`, and module `m`'s slice `v_mᵀ (H v)_m` has expectation
`tr(H_mm)`, its own block's trace (the cross terms `v_mᵀ H_mj v_j` vanish in expectation, the probes
of different modules being independent).  `L` is one calibration sequence's mean cross entropy (nats
per token, as for `fisher`); `samples` probes per sequence; the estimate is the mean over sequences
and probes, the trace of the Hessian of the mean loss over the calibration tokens.  The error is then
`½ · (tr / numel) · ||ΔW||²` (profiler/estimators.py): the quadratic loss increase with the Hessian's
mean diagonal in place of the Hessian.

**Never negative.**  The loss at a trained model is not at an exact minimum and the estimate is noisy,
so a module's mean can come out at or below zero, which would tell the planner it can take 2 bits for
free.  The probes are averaged first (clamping each probe would bias every module upwards), then each
module's `tr / numel` is clamped at a floor, `FLOOR_FRACTION` of the median positive value over the
modules, and a warning names the modules clamped.

**Double backward.**  transformers' `sdpa` attention dispatches to fused kernels (flash on CPU, flash
or memory-efficient on CUDA) whose backward has no derivative; the pass runs under
`sdpa_kernel(SDPBackend.MATH)`, which composes differentiable ops (`eager` attention needs nothing).
Cost: per sequence one forward, one backward with its graph kept, and `samples` double backwards;
like `fisher`, the whole model takes part, so it is not streamed block by block.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from bitplan.db.types import Module
from bitplan.profiler.fisher import gradients_of

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 4  # probes per calibration sequence
FLOOR_FRACTION = 1e-3


def trace_estimates(model: nn.Module, batches: torch.Tensor, planned: list[tuple[Module, nn.Linear]],
                    device: str = "cpu", progress: bool = True, samples: int = DEFAULT_SAMPLES,
                    seed: int = 0) -> dict[str, float]:
    """`tr(∇²_W L)` of every planned weight: the mean over sequences x `samples` Rademacher probes (unclamped)."""
    weights = [lin.weight for _, lin in planned]
    tr = np.zeros(len(weights))
    gen = torch.Generator(device=device).manual_seed(seed)
    with gradients_of(model, weights, device), sdpa_kernel(SDPBackend.MATH):
        for row in tqdm(batches, desc=f"hutchinson ({samples} probes/seq)", unit="seq", disable=not progress):
            ids = row.unsqueeze(0).to(device)
            logits = model(ids, use_cache=False).logits[0, :-1].float()
            loss = nn.functional.cross_entropy(logits, ids[0, 1:])
            grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
            # a routed expert no token of this sequence reaches has a zero Hessian block here
            used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            for s in range(samples):
                v = [torch.randint(0, 2, weights[i].shape, generator=gen, device=device,
                                   dtype=weights[i].dtype).mul_(2).sub_(1) for i in used]
                Hv = torch.autograd.grad([grads[i] for i in used], [weights[i] for i in used], grad_outputs=v,
                                         retain_graph=s < samples - 1, allow_unused=True)
                for i, vi, hvi in zip(used, v, Hv):
                    if hvi is not None:
                        tr[i] += float((vi.double() * hvi.double()).sum())
            del grads, loss, logits
    tr /= len(batches) * samples
    return {m.name: float(t) for (m, _), t in zip(planned, tr)}


def hutchinson_traces(model: nn.Module, batches: torch.Tensor, planned: list[tuple[Module, nn.Linear]],
                      device: str = "cpu", progress: bool = True, samples: int = DEFAULT_SAMPLES,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """`t[name]`: 0-d float64, `tr(∇²_W L) / numel` clamped at the floor (module docstring), the statistic
    of `estimators.hutchinson`."""
    tr = trace_estimates(model, batches, planned, device, progress, samples, seed)
    numel = {m.name: lin.weight.numel() for m, lin in planned}
    t = {name: v / numel[name] for name, v in tr.items()}
    return {name: torch.tensor(v, dtype=torch.float64) for name, v in clamp(t).items()}


def clamp(t: dict[str, float]) -> dict[str, float]:
    """Each value at least `FLOOR_FRACTION` x the median positive value; a warning names those raised."""
    positive = [v for v in t.values() if v > 0]
    floor = FLOOR_FRACTION * float(np.median(positive)) if positive else 1e-12
    low = sorted(name for name, v in t.items() if v < floor)
    if low:
        log.warning("hutchinson: %d modules' trace estimate is below the floor %.3g per weight (%s%s); they get the "
                    "floor: more tokens or probes would measure them", len(low), floor, ", ".join(low[:5]),
                    f" and {len(low) - 5} more" if len(low) > 5 else "")
    return {name: max(v, floor) for name, v in t.items()}
