"""`profile_model`: error and size of every planned module at every option, from calibration text."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from bitplan.db.types import InvalidInput, Option, Profile, content_id
from bitplan.executor.quantize import quantize_dequantize
from bitplan.profiler import estimators
from bitplan.profiler.calibration import CALIB, token_batches
from bitplan.profiler.fisher import fisher_diagonal
from bitplan.profiler.model import LoadedModel, fixed_bits, planned_linears
from bitplan.profiler.stream import stream_blocks

log = logging.getLogger(__name__)

DEFAULT_ESTIMATOR = "fisher"  # measured on the embedded model: README, "Choosing the estimator"
DEFAULT_OPTIONS = "2,3,4,8"
DEFAULT_TOKENS = 4096
DEFAULT_SEQ_LEN = 512


def profile_id(loaded: LoadedModel, calib_fp: str, estimator: str, options: list[Option], seq_len: int,
               device: str) -> str:
    """Same model, text, estimator and options -> same profile (reused from the store, not recomputed)."""
    return content_id(loaded.ref.fingerprint, calib_fp, estimator, [o.model_dump() for o in options], seq_len,
                      device, prefix="prof-")


def profile_model(
    loaded: LoadedModel,
    options: list[Option],
    *,
    estimator: str = DEFAULT_ESTIMATOR,
    calib: str = CALIB,
    n_tokens: int = DEFAULT_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    device: str = "cpu",
    progress: bool = True,
) -> Profile:
    """Measure `error[module, option]` with `estimator` on `n_tokens` of `calib`; sizes are exact."""
    if estimator not in estimators.ESTIMATORS:
        raise InvalidInput(f"unknown estimator {estimator!r}; choose one of {sorted(estimators.ESTIMATORS)}")
    t0 = time.perf_counter()
    model = loaded.model
    batches, calib_ref = token_batches(loaded.tokenizer, calib, n_tokens, seq_len)
    planned = planned_linears(model)
    index = {m.name: i for i, (m, _) in enumerate(planned)}
    error = np.zeros((len(planned), len(options)))
    estimate = estimators.ESTIMATORS[estimator]

    def fill(mods, stats, n):
        for m, lin in mods:
            W = lin.weight.detach()
            for j, opt in enumerate(options):
                error[index[m.name], j] = estimate(quantize_dequantize(W, opt) - W, stats[m.name].cpu(), n)

    log.info("profiling %d modules x %d options with %s on %d tokens", len(planned), len(options), estimator,
             batches.numel())
    if estimator == "hessian":
        stream_blocks(model, batches, planned, lambda i, mods, H, n: fill(mods, H, n), device, progress)
    else:
        F = fisher_diagonal(model, batches, planned, device, progress)
        for m, lin in tqdm(planned, desc="error tables", unit="module", disable=not progress):
            fill([(m, lin)], F, batches.numel())
    size = np.array([[o.size_bits(*m.shape) for o in options] for m, _ in planned], dtype=np.int64)
    return Profile(
        id=profile_id(loaded, calib_ref.fingerprint, estimator, options, seq_len, device),
        model=loaded.ref,
        calibration=calib_ref,
        estimator=estimator,
        device=device,
        options=options,
        modules=[m for m, _ in planned],
        error=error,
        size_bits=size,
        fixed_bits=fixed_bits(model, planned),
        seconds=time.perf_counter() - t0,
    )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
