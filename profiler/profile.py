"""`profile_model`: error and size of every planned module at every option, from calibration text."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bitplan.db.types import InvalidInput, Module, Option, Profile, content_id
from bitplan.executor.quantize import (QUANTIZERS, GPTQCache, quantize_dequantize, quantizer_for,
                                       quantizer_settings)
from bitplan.profiler import estimators, moe
from bitplan.profiler.calibrate import calibrate
from bitplan.profiler.calibration import CALIB, token_batches
from bitplan.profiler.fisher import fisher_diagonal
from bitplan.profiler.hutchinson import hutchinson_traces
from bitplan.profiler.imatrix import estimator_tag, imatrix_diagonals, read_imatrix
from bitplan.profiler.kl import DEFAULT_KL_TOKENS, kl_table
from bitplan.profiler.model import LoadedModel, fixed_bits, is_embedding, planned_linears, tied_head
from bitplan.profiler.stream import BlockCheckpoint, outside_hessians, stream_blocks

log = logging.getLogger(__name__)

# the best plans measured on the embedded model and on tiny-Mixtral: README, "Choosing the estimator"
DEFAULT_ESTIMATOR = "calibrated"
DEFAULT_QUANTIZER = "gptq"
DEFAULT_OPTIONS = "2,3,4,8"
DEFAULT_TOKENS = 4096
DEFAULT_SEQ_LEN = 512
# whether `bitplan profile` (and `run_profile`, `bitplan demo`) plans the input embedding, `--embeddings
# plan|keep`: on the embedded model a planned embedding halved perplexity at the same checkpoint size
# (docs/embeddings.md).  `profile_model` itself plans what it is told, by default what `planned_linears` lists.
EMBEDDINGS = ("plan", "keep")
DEFAULT_EMBEDDINGS = "plan"
# kl: measured, not estimated (profiler/kl.py); calibrated: fisher rescaled to measured KL (profiler/calibrate.py)
ESTIMATOR_NAMES = (*estimators.ESTIMATORS, "kl", "calibrated")


def profile_id(loaded: LoadedModel, calib_fp: str, estimator: str, options: list[Option], seq_len: int,
               device: str, embeddings: str = "keep") -> str:
    """Same model, text, estimator, quantizer settings, options and embedding setting -> same profile (reused
    from the store, not recomputed).  RTN adds nothing, so RTN profiles keep the ids they had before GPTQ
    existed; `embeddings="keep"` adds nothing either, so profiles that leave the embedding out keep theirs."""
    settings = quantizer_settings(parse_estimator_name(estimator)[1])
    return content_id(loaded.ref.fingerprint, calib_fp, estimator, [o.model_dump() for o in options], seq_len,
                      device, *([settings] if settings else []),
                      *([{"embeddings": embeddings}] if embeddings != "keep" else []), prefix="prof-")


def check_embeddings(embeddings: str | None, estimator: str = "") -> str:
    """`plan` or `keep` (None: the default, `keep` for imatrix); imatrix cannot plan the embedding (llama.cpp's
    importance matrix records matmul inputs, and a lookup is no matmul)."""
    if embeddings is None:
        return "keep" if estimator == "imatrix" else DEFAULT_EMBEDDINGS
    if embeddings not in EMBEDDINGS:
        raise InvalidInput(f"unknown --embeddings {embeddings!r}; choose one of {list(EMBEDDINGS)}")
    if embeddings == "plan" and estimator == "imatrix":
        raise InvalidInput("an imatrix holds no statistics for the embedding lookup: profile with --embeddings keep, "
                           "or with another --estimator")
    return embeddings


def estimator_name(estimator: str, quantizer: str = "rtn", imatrix: str | Path | None = None) -> str:
    """The profile's `estimator` field: `"fisher"` for RTN (the spine's ids stay), `"fisher/gptq"` for GPTQ.

    The quantizer that produced ΔW is part of what a profile means (and of its id), so it is recorded
    here until `Profile` gets a field of its own.
    """
    # TODO(db): a `quantizer: str = "rtn"` field on Profile would hold this instead of the suffix
    if estimator == "imatrix":  # the file read is part of what the profile means: `imatrix:<sha256 prefix>`
        estimator = estimator_tag(imatrix)
    return estimator if quantizer == "rtn" else f"{estimator}/{quantizer}"


def parse_estimator_name(name: str) -> tuple[str, str]:
    """`"fisher/gptq"` -> `("fisher", "gptq")`; `"fisher"` -> `("fisher", "rtn")`."""
    estimator, _, quantizer = name.partition("/")
    return estimator, quantizer or "rtn"


def profile_model(
    loaded: LoadedModel,
    options: list[Option],
    *,
    estimator: str = DEFAULT_ESTIMATOR,
    quantizer: str = DEFAULT_QUANTIZER,
    calib: str = CALIB,
    n_tokens: int | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    device: str = "cpu",
    progress: bool = True,
    work_dir: str | Path | None = None,
    imatrix: str | Path | None = None,
    cache: GPTQCache | None = None,
    embeddings: str = "keep",
) -> Profile:
    """Measure `error[module, option]` with `estimator` on `n_tokens` of `calib`; sizes are exact.

    `quantizer` is what ΔW comes from, the quantizer `apply` will use: `rtn`, or `gptq` (with each
    module's `H = Σ xxᵀ` from the calibration text, collected by streaming the blocks; for `fisher`
    that is one extra forward pass).  `n_tokens` defaults to DEFAULT_TOKENS, or DEFAULT_KL_TOKENS for
    `kl` (modules x options forward passes over them).

    An MoE model's expert matrices also get their routing statistics (one more streamed pass), and
    an expert no calibration token reaches gets the fallback error, never zero (profiler/moe.py).
    With `calibrated`, an expert with too few routed tokens in the KL sample gets its siblings' scale
    instead of its own measurement; the Profile's `estimated` names those (profiler/calibrate.py).

    `imatrix` (for `estimator="imatrix"`): a llama.cpp importance matrix, read into each module's
    `diag(H)` (profiler/imatrix.py); the calibration text then gives only ΔW's GPTQ `H` and MoE routing.

    `work_dir` keeps what is finished so that a rerun with the same folder resumes (`error_table`).
    `cache` keeps every GPTQ result for the applies of this profile's plans in the same process.

    `embeddings="plan"` makes the input embedding a module of the profile (with a tied head, the pair:
    `planned_linears`), quantized with RTN whatever `quantizer` is (`executor.quantize.quantizer_for`);
    `"keep"` leaves it at 16 bits in `fixed_bits`.
    """
    if estimator not in ESTIMATOR_NAMES:
        raise InvalidInput(f"unknown estimator {estimator!r}; choose one of {sorted(ESTIMATOR_NAMES)}")
    if quantizer not in QUANTIZERS:
        raise InvalidInput(f"unknown quantizer {quantizer!r}; choose one of {list(QUANTIZERS)}")
    check_embeddings(embeddings, estimator)
    if n_tokens is None:
        n_tokens = DEFAULT_KL_TOKENS if estimator == "kl" else DEFAULT_TOKENS
    t0 = time.perf_counter()
    model = loaded.model
    batches, calib_ref = token_batches(loaded.tokenizer, calib, n_tokens, seq_len)
    planned = planned_linears(model, embeddings == "plan")
    log.info("profiling %d modules x %d options with %s (%s) on %d tokens", len(planned), len(options),
             estimator, quantizer, batches.numel())
    stats, fallback = None, []  # what `imatrix` and `hutchinson` collect; error_table uses it as fisher's F
    estimated: dict[str, str] = {}  # `calibrated` rows not measured: module name -> why (profiler/calibrate.py)
    if estimator == "imatrix":
        stats, fallback = imatrix_diagonals(read_imatrix(imatrix), [m for m, _ in planned])
    elif estimator == "hutchinson":
        stats = hutchinson_traces(model, batches, planned, device, progress)
    if estimator == "kl":
        error = kl_table(model, planned, options, batches, quantizer=quantizer, device=device,
                         progress=progress, cache=cache)
    elif estimator == "calibrated":
        error = error_table(model, planned, options, batches, "fisher", quantizer, device, progress,
                            work_dir=work_dir, cache=cache)
        # the KL points on the first sequences of the same text, as many as `kl` would measure on
        rows = max(1, DEFAULT_KL_TOKENS // batches.shape[1])
        # GPTQ's ΔW at those points from H of the whole text, as the fisher rows and `apply` have it
        cal = calibrate(model, planned, options, error, batches[:rows], quantizer=quantizer, device=device,
                        progress=progress, hessian_batches=batches, cache=cache)
        error, estimated = cal.error, {planned[i][0].name: why for i, why in cal.estimated.items()}
    else:
        error = error_table(model, planned, options, batches, estimator, quantizer, device, progress,
                            work_dir=work_dir, stats=stats, cache=cache)
    modules = [m if m.name not in fallback else m.model_copy(update={"fallback": True}) for m, _ in planned]
    if any(m.expert is not None for m in modules):
        modules = moe.with_routing(modules, routing_stats(model, batches, device, progress))
        error, modules = moe.fill_unrouted(error, modules)
        # their rows are the fallback's now, and `fallback` says so
        estimated = {m.name: estimated[m.name] for m in modules if m.name in estimated and not m.fallback}
    size = np.array([[o.size_bits(*m.shape) for o in options] for m in modules], dtype=np.int64)
    name = estimator_name(estimator, quantizer, imatrix)
    return Profile(
        id=profile_id(loaded, calib_ref.fingerprint, name, options, seq_len, device, embeddings),
        model=loaded.ref,
        calibration=calib_ref,
        estimator=name,
        device=device,
        options=options,
        modules=modules,
        error=error,
        size_bits=size,
        fixed_bits=fixed_bits(model, planned),
        seconds=time.perf_counter() - t0,
        estimated=estimated,
    )


def routing_stats(model: nn.Module, batches: torch.Tensor, device: str = "cpu",
                  progress: bool = False) -> dict[str, moe.RoutingRecord]:
    """Per MoE block, tokens and routing weight per expert over `batches`: one streamed forward pass.

    A pass of its own, rather than counted inside an estimator's passes: those differ in number
    (`kl` runs the model once per module and option; GPTQ and an untied head add passes).
    """
    with moe.record_routing(model) as records:
        stream_blocks(model, batches, [], lambda *_: None, device, progress, desc="routing statistics")
    return records


def error_table(model, planned: list[tuple[Module, nn.Linear]], options: list[Option], batches: torch.Tensor,
                estimator: str, quantizer: str = "rtn", device: str = "cpu",
                progress: bool = True, work_dir: str | Path | None = None, stats: dict | None = None,
                cache: GPTQCache | None = None) -> np.ndarray:
    """`[modules, options]` error of a cheap estimator (`hessian`, `fisher`), ΔW from `quantizer`.

    With `work_dir` an interrupted table resumes: a streamed pass (`hessian`; the GPTQ `H` of any
    estimator) at the block after its last finished one, with the rows finished so far; the `fisher`
    pass after the last sequence whose accumulators it saved (`fisher.CHECKPOINT_SECONDS`).  The
    other passes (an untied head's `H`, RTN rows from `F`) are short and run again.

    `stats`: the per-module statistics of an estimator that collects its own (`imatrix`, `hutchinson`),
    used as `fisher`'s `F` is.

    A planned embedding is quantized with RTN (`quantizer_for`); under `hessian` its `H` is the lookup's,
    plus a tied head's (`embedding_statistics`).
    """
    index = {m.name: i for i, (m, _) in enumerate(planned)}
    error = np.zeros((len(planned), len(options)))
    ckpt = None if work_dir is None else BlockCheckpoint(Path(work_dir) / "blocks", {"error": error})
    estimate = estimators.ESTIMATORS[estimator]
    n = batches.numel()

    def fill(mods, stats, H=None):
        # a block's modules x options (an MoE block: hundreds of matrices), under the blocks' bar
        for m, lin in tqdm(mods, desc="error table", unit="module", leave=False,
                           disable=not progress or len(mods) < 2):
            W = lin.weight.detach()
            Hm = None if H is None or m.name not in H else H[m.name].cpu()
            for j, opt in enumerate(options):
                dW = quantize_dequantize(W, opt, quantizer_for(m, quantizer), Hm, cache=cache, name=m.name) - W
                error[index[m.name], j] = estimate(dW, stats[m.name].cpu(), n)

    # an untied lm_head: not in any block; the embedding has no linear's inputs to hook
    outside = [(m, lin) for m, lin in planned if m.layer is None and not is_embedding(m)]
    embedding = [(m, emb) for m, emb in planned if is_embedding(m)]
    if estimator == "hessian":
        stream_blocks(model, batches, planned, lambda i, mods, H, _: fill(mods, H, H), device, progress,
                      checkpoint=ckpt)
        if outside:
            H = outside_hessians(model, batches, outside, device, progress)
            fill(outside, H, H)
        for m, emb in embedding:
            counts, H = embedding_statistics(model, batches, m, device, progress)
            W = emb.weight.detach()
            for j, opt in enumerate(options):
                dW = quantize_dequantize(W, opt, "rtn") - W
                error[index[m.name], j] = estimators.embedding_hessian(dW, counts, H, n)
        return error
    F = stats if stats is not None else fisher_diagonal(model, batches, planned, device, progress,
                        checkpoint=None if work_dir is None else Path(work_dir) / "fisher.pt")
    if quantizer == "rtn":
        for m, lin in tqdm(planned, desc="error tables", unit="module", disable=not progress):
            fill([(m, lin)], F)
        return error
    stream_blocks(model, batches, planned, lambda i, mods, H, _: fill(mods, F, H), device, progress,
                  checkpoint=ckpt)
    if outside:
        fill(outside, F, outside_hessians(model, batches, outside, device, progress))
    fill(embedding, F)  # RTN: no H
    return error


def embedding_statistics(model: nn.Module, batches: torch.Tensor, m: Module, device: str = "cpu",
                         progress: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(counts [V], H [d, d] or None)`: the `hessian` statistics of the embedding module `m`.

    A lookup's input is one-hot, so its `Σ xxᵀ` over the vocabulary is diagonal: how often each row
    was read, and a row's error reaches the residual stream once per read.  A tied head reads the same
    weight as a linear, so the pair adds the head's `H` of its inputs (a streamed pass, as for an untied
    head).
    """
    counts = torch.bincount(batches.reshape(-1), minlength=m.shape[0]).to(torch.float64)
    head = tied_head(model)
    if head is None:
        return counts, None
    return counts, outside_hessians(model, batches, [(m, head)], device, progress)[m.name].cpu()


def gptq_hessians(loaded: LoadedModel, profile: Profile, planned: list[tuple[Module, nn.Linear]], *,
                  device: str | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """`H` of every planned module on the profile's own calibration tokens, for GPTQ after profiling
    (`apply`, `compare --evaluate`, the evolutionary search's variants).

    A profile made before its sequence length was recorded gets sequences of the default length (H
    sums over tokens; only attention context differs).
    """
    from bitplan.profiler.stream import collect_hessians

    planned = [(m, lin) for m, lin in planned if quantizer_for(m, "gptq") == "gptq"]  # the embedding: RTN, no H

    calib = profile.calibration
    seq_len = calib.seq_len or min(DEFAULT_SEQ_LEN, calib.n_tokens)
    batches, ref = token_batches(loaded.tokenizer, calib.name, calib.n_tokens, seq_len)
    if calib.fingerprint and ref.fingerprint != calib.fingerprint:
        raise InvalidInput(f"the calibration windows of {calib.name!r} are not those profile {profile.id} was "
                           f"measured on (another text file, or a tokenizer that starts windows otherwise); "
                           f"profile the model again")
    return collect_hessians(loaded.model, batches, planned, device or default_device(), progress=progress)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
