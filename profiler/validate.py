"""Estimator validation: how well each cheap estimator ranks (module, option) pairs against measured KL."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr

from bitplan.db.types import InvalidInput, Option, Quantizer
from bitplan.profiler.calibration import CALIB, token_batches
from bitplan.profiler.kl import DEFAULT_KL_TOKENS, kl_table
from bitplan.profiler.model import LoadedModel, decoder_layers, planned_linears
from bitplan.profiler.profile import DEFAULT_SEQ_LEN, DEFAULT_TOKENS, get_estimator, profile_model

log = logging.getLogger(__name__)


def spearman(predicted: np.ndarray, measured: np.ndarray) -> float:
    """Spearman rank correlation over all `(module, option)` pairs of two `[M, O]` tables."""
    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    if predicted.shape != measured.shape:
        raise ValueError(f"tables differ in shape: {predicted.shape} vs {measured.shape}")
    return float(spearmanr(predicted.ravel(), measured.ravel()).statistic)


def validate(loaded: LoadedModel, options: list[Option], estimators=("hessian", "fisher"), *,
             quantizer: Quantizer = Quantizer(), n_tokens: int = DEFAULT_TOKENS, kl_tokens: int = DEFAULT_KL_TOKENS,
             calib: str = CALIB, seq_len: int = DEFAULT_SEQ_LEN, layers: Sequence[int] | None = None,
             device: str = "cpu", progress: bool = True, imatrix: str | None = None) -> dict:
    """Measure the `kl` table on `kl_tokens`, each estimator's on `n_tokens`, and rank-correlate them.

    `layers`: measure KL only for the modules of these decoder layers (KL costs one forward pass per
    module and option); the estimators run on the whole model and their rows are selected to match.
    Both use the start of the same text, so the KL tokens are a prefix of the estimators' tokens.
    `estimators`: names of `profile.ESTIMATORS`; `imatrix`: the llama.cpp importance matrix those that
    need one read.

    Returns `{"quantizer": its label, "spearman": {estimator: rho}, "per_option": {estimator: [rho per
    option]}, "tables": {name: [M, O]}, "seconds": {name: s}, "modules": [...], ...}`.  `per_option` ranks modules within one
    option (the ordering a planner trading bits between modules needs); the pooled number also counts
    the easy ordering across bit widths.
    """
    specs = [get_estimator(e) for e in estimators]  # an unknown name fails before any pass
    model = loaded.model
    n_layers = len(decoder_layers(model))
    missing = sorted(set(layers or ()) - set(range(n_layers)))
    if missing:
        raise InvalidInput(f"--validate-layers {','.join(map(str, missing))}: {loaded.ref.name} has layers "
                           f"0..{n_layers - 1}; pick layers in that range")
    planned = planned_linears(model)
    keep = [i for i, (m, _) in enumerate(planned) if layers is None or m.layer in set(layers)]
    tables, seconds = {}, {}
    t0 = time.perf_counter()
    kl_len = min(seq_len, kl_tokens)
    batches, _ = token_batches(loaded.tokenizer, calib, kl_tokens, kl_len)
    # GPTQ's ΔW from H of the estimators' (and `apply`'s) whole text, not fitted to the KL tokens it is scored on
    hessian_batches = (token_batches(loaded.tokenizer, calib, n_tokens, seq_len)[0]
                       if quantizer.method == "gptq" else None)
    tables["kl"] = kl_table(model, [planned[i] for i in keep], options, batches, quantizer=quantizer,
                            device=device, progress=progress, hessian_batches=hessian_batches)
    seconds["kl"] = time.perf_counter() - t0
    log.info("kl (%s) on %d modules x %d options: %.0f s", quantizer.label, len(keep), len(options), seconds["kl"])
    for e, spec in zip(estimators, specs):
        t0 = time.perf_counter()
        p = profile_model(loaded, options, estimator=e, quantizer=quantizer, calib=calib, n_tokens=n_tokens,
                          seq_len=seq_len, device=device, progress=progress,
                          imatrix=imatrix if spec.needs_imatrix else None)
        tables[e], seconds[e] = p.error[keep], time.perf_counter() - t0
        log.info("%s (%s): %.0f s", e, quantizer.label, seconds[e])
    kl = tables["kl"]
    return {
        "quantizer": quantizer.label,
        "spearman": {e: spearman(tables[e], kl) for e in estimators},
        "per_option": {e: [spearman(tables[e][:, o], kl[:, o]) for o in range(len(options))]
                       for e in estimators},
        "tables": tables,
        "seconds": seconds,
        "modules": [planned[i][0].name for i in keep],
        "options": [o.label for o in options],
        "tokens": {"kl": int(batches.numel()), "estimators": n_tokens},
    }
