"""The `calibrated` estimator: a cheap estimator's table, rescaled per module to measured end-to-end KL.

HIGGS's "linearity theorem" says the loss increase of a quantized model is close to a weighted sum
of per-layer terms, `Δloss ≈ Σ_l α_l · t_l²` with `t_l` the relative weight error of layer `l` and
`α_l` a per-layer constant.  A cheap estimator (`fisher`, `hessian`) gets the *shape* of each row
right (how a module's error grows as bits drop: `t²` up to the grid) but not its *scale*: `hessian`
stops at the layer output, and even `fisher`'s second-order term misjudges how much the network
amplifies or absorbs a module's error.  So each module's row is rescaled by one factor fitted to the
truth at a few points:

    α_m = geometric mean over the measured options o of  KL_m(o) / cheap_m(o)
    calibrated[m, o] = KL_m(o)              where measured
                       α_m · cheap[m, o]    elsewhere

`KL_m(o)` is the mean per-token KL(base ‖ model with only module m quantized at o) (profiler/kl.py),
one forward pass of the blocks from m's layer on per module and measured option: by default the two
lowest bit widths, where the error is far above the measurement's noise.  That is 2 passes per module
instead of `kl`'s one per option, and the additive model now sums end-to-end loss terms, not
layer-output ones.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from bitplan.db.types import Module, Option
from bitplan.executor.quantize import GPTQCache
from bitplan.profiler.kl import kl_table

log = logging.getLogger(__name__)

DEFAULT_POINTS = 2  # measured options per module: the lowest bit widths


def calibration_points(options: list[Option], points: int = DEFAULT_POINTS) -> list[int]:
    """Indices of the `points` quantized options of fewest bits (ties: the first listed)."""
    quantized = [i for i, o in enumerate(options) if o.quantized]
    return sorted(sorted(quantized, key=lambda i: (options[i].bits, i))[:points])


def rescale(cheap: np.ndarray, measured: np.ndarray, points: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """`(calibrated [M, O], alpha [M])` from a cheap table and KL measured at option columns `points`.

    A module whose cheap error is zero at every measured point (nothing to scale) takes the median
    factor of the others, so its unmeasured options are neither zeroed nor inflated.
    """
    cheap = np.asarray(cheap, float)
    measured = np.asarray(measured, float)
    c = cheap[:, points]
    ok = (c > 0) & (measured > 0)
    logs = np.where(ok, np.log(np.where(ok, measured, 1.0) / np.where(ok, c, 1.0)), 0.0)
    n = ok.sum(axis=1)
    alpha = np.exp(np.divide(logs.sum(axis=1), n, out=np.zeros(len(n)), where=n > 0))
    fitted = n > 0
    if fitted.any() and not fitted.all():
        alpha[~fitted] = np.median(alpha[fitted])
    elif not fitted.any():
        alpha[:] = 1.0
    out = alpha[:, None] * cheap
    out[:, points] = np.maximum(measured, 0.0)
    return out, alpha


@torch.no_grad()
def calibrate(model: nn.Module, planned: list[tuple[Module, nn.Linear]], options: list[Option],
              cheap: np.ndarray, batches: torch.Tensor, *, points: int = DEFAULT_POINTS, quantizer: str = "rtn",
              device: str = "cpu", progress: bool = True,
              hessian_batches: torch.Tensor | None = None,
              cache: GPTQCache | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Measure KL at the calibration points of every planned module and rescale `cheap` (module docstring).

    `hessian_batches`: the calibration text GPTQ's `H` comes from (default `batches`); pass the text the
    cheap table was made on, so that the measured points use the same ΔW as the rest of the row.
    """
    cols = calibration_points(options, points)
    if not cols:
        return np.asarray(cheap, float), np.ones(len(planned))
    measured = kl_table(model, planned, [options[i] for i in cols], batches, quantizer=quantizer, device=device,
                        progress=progress, hessian_batches=hessian_batches, cache=cache)
    out, alpha = rescale(cheap, measured, cols)
    log.info("calibrated %d modules at %s: alpha median %.3g, range %.3g..%.3g", len(planned),
             [options[i].label for i in cols], np.median(alpha), alpha.min(), alpha.max())
    return out, alpha
