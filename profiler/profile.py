"""`profile_model`: error and size of every planned module at every option, from calibration text."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bitplan.db.types import InvalidInput, Module, Option, Profile, Quantizer, content_id
from bitplan.kernels.quantize import GPTQCache, quantize, quantize_dequantize, quantizer_for
from bitplan.profiler import estimators, moe
from bitplan.profiler.calibrate import calibrate
from bitplan.profiler.calibration import CALIB, token_batches
from bitplan.profiler.cluster import Cluster
from bitplan.profiler.fisher import fisher_diagonal
from bitplan.profiler.hutchinson import hutchinson_traces
from bitplan.profiler.imatrix import estimator_tag, file_sha256, imatrix_diagonals, importance_rows, read_imatrix
from bitplan.profiler.kl import DEFAULT_KL_TOKENS, kl_table
from bitplan.profiler.model import LoadedModel, fixed_bits, is_embedding, planned_linears, tied_head
from bitplan.profiler.stream import BlockCheckpoint, outside_hessians, stream_blocks
from bitplan.profiler.weights import materialized, streamed

log = logging.getLogger(__name__)

# the best plans measured on the embedded model and on tiny-Mixtral: README, "Choosing the estimator"
DEFAULT_ESTIMATOR = "calibrated"
DEFAULT_QUANTIZER = Quantizer(method="gptq", clip=True)
DEFAULT_OPTIONS = "2,3,4,8"
DEFAULT_TOKENS = 4096
DEFAULT_SEQ_LEN = 512
# whether `bitplan profile` (and `run_profile`, `bitplan demo`) plans the input embedding, `--embeddings
# plan|keep`: on the embedded model a planned embedding halved perplexity at the same checkpoint size
# (docs/embeddings.md).  `profile_model` itself plans what it is told, by default what `planned_linears` lists.
EMBEDDINGS = ("plan", "keep")
DEFAULT_EMBEDDINGS = "plan"


# ------------------------------------------------------------------------------------ estimators


@dataclass(frozen=True)
class TableInputs:
    """What an estimator's error table is made from; `profile_model` fills it."""

    model: nn.Module
    planned: list[tuple[Module, nn.Module]]
    options: list[Option]
    batches: torch.Tensor
    quantizer: Quantizer
    device: str = "cpu"
    progress: bool = True
    work_dir: str | Path | None = None
    imatrix: str | Path | None = None
    cache: GPTQCache | None = None
    importance: dict[str, np.ndarray] | None = None  # the llamacpp quantizer's, `importance_rows`
    kl_experts: int | None = None  # `calibrated`: routed experts measured per layer and role (None: all)
    cluster: Cluster | None = None  # where the modules' work fans out (profiler/cluster.py)


@dataclass(frozen=True)
class ErrorTable:
    """An estimator's `[modules, options]` error, and what the profile must know about its rows."""

    error: np.ndarray
    estimated: dict[str, str] = field(default_factory=dict)  # module name -> why its row is not measured
    fallback: frozenset[str] = frozenset()  # modules the estimator has no statistics for


@dataclass(frozen=True)
class Estimator:
    """One `--estimator`: how its error table is made (`table`) and what it needs.

    `formula`: the per-module `(ΔW, stats, n_tokens) -> error` of profiler/estimators.py that `error_table`
    applies, None for the estimators that measure (`kl`, and `calibrated`'s KL points).
    `needs_imatrix`: reads a llama.cpp importance matrix (`profile_model(imatrix=...)`), whose hash the
    profile's `estimator` field then carries (`estimator_name`).
    `default_tokens`: calibration tokens when `profile_model` is given none.
    `plans_embedding`: whether it can estimate the input embedding (`--embeddings plan`).
    """

    name: str
    table: Callable[[TableInputs], ErrorTable]
    formula: Callable[[torch.Tensor, torch.Tensor, int], float] | None = None
    needs_imatrix: bool = False
    default_tokens: int = DEFAULT_TOKENS
    plans_embedding: bool = True
    streams: bool = False  # its passes read one block's weights at a time: it profiles a model whose weights stay on disk


def _cheap(t: TableInputs, estimator: str, stats: dict | None = None) -> np.ndarray:
    return error_table(t.model, t.planned, t.options, t.batches, estimator, t.quantizer, t.device, t.progress,
                       work_dir=t.work_dir, stats=stats, cache=t.cache, importance=t.importance, cluster=t.cluster)


def _hessian_table(t: TableInputs) -> ErrorTable:
    return ErrorTable(_cheap(t, "hessian"))


def _fisher_table(t: TableInputs) -> ErrorTable:
    return ErrorTable(_cheap(t, "fisher"))


def _imatrix_table(t: TableInputs) -> ErrorTable:
    stats, fallback = imatrix_diagonals(read_imatrix(t.imatrix), [m for m, _ in t.planned])
    return ErrorTable(_cheap(t, "imatrix", stats), fallback=frozenset(fallback))


def _hutchinson_table(t: TableInputs) -> ErrorTable:
    traces = hutchinson_traces(t.model, t.batches, t.planned, t.device, t.progress)
    return ErrorTable(_cheap(t, "hutchinson", traces))


def _kl_table(t: TableInputs) -> ErrorTable:
    return ErrorTable(kl_table(t.model, t.planned, t.options, t.batches, quantizer=t.quantizer, device=t.device,
                               progress=t.progress, cache=t.cache, importance=t.importance, cluster=t.cluster))


def _calibrated_table(t: TableInputs) -> ErrorTable:
    if t.cache is None and t.quantizer.method == "gptq":
        # the KL points' ΔW is the Fisher rows' GPTQ result: kept from the one for the other
        t = replace(t, cache=GPTQCache())
    error = _cheap(t, "fisher")
    # the KL points on the first sequences of the same text, as many as `kl` would measure on
    rows = max(1, DEFAULT_KL_TOKENS // t.batches.shape[1])
    routed = None
    if t.kl_experts is not None and any(m.expert is not None for m, _ in t.planned):
        routed = {name: np.asarray(r.tokens) for name, r in
                  routing_stats(t.model, t.batches[:rows], t.device, t.progress).items()}
    # GPTQ's ΔW at those points from H of the whole text, as the fisher rows and `apply` have it
    cal = calibrate(t.model, t.planned, t.options, error, t.batches[:rows], quantizer=t.quantizer, device=t.device,
                    progress=t.progress, hessian_batches=t.batches, cache=t.cache, importance=t.importance,
                    experts=t.kl_experts if routed is not None else None, routed_tokens=routed, cluster=t.cluster)
    return ErrorTable(cal.error, estimated={t.planned[i][0].name: why for i, why in cal.estimated.items()})


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    # fisher's rows rescaled to measured KL at each module's two lowest widths (profiler/calibrate.py)
    Estimator("calibrated", _calibrated_table),
    Estimator("fisher", _fisher_table, estimators.fisher),
    Estimator("hessian", _hessian_table, estimators.hessian, streams=True),
    # measured, not estimated: modules x options forward passes (profiler/kl.py)
    Estimator("kl", _kl_table, default_tokens=DEFAULT_KL_TOKENS),
    Estimator("hutchinson", _hutchinson_table, estimators.hutchinson),
    # llama.cpp's importance matrix records matmul inputs, and a lookup is no matmul
    Estimator("imatrix", _imatrix_table, estimators.imatrix, needs_imatrix=True, plans_embedding=False),
)}


def get_estimator(name: str) -> Estimator:
    """The registered estimator `name`; InvalidInput lists the others."""
    try:
        return ESTIMATORS[name]
    except (KeyError, TypeError):
        raise InvalidInput(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}") from None


def check_streams(estimator: str) -> None:
    """InvalidInput unless `estimator` can profile a model whose weights stay on disk (`Estimator.streams`)."""
    if not get_estimator(estimator).streams:
        can = sorted(e.name for e in ESTIMATORS.values() if e.streams)
        raise InvalidInput(f"--estimator {estimator} needs every weight in memory at once; with weights streamed from "
                           f"disk (--stream-weights) profile with --estimator {' or '.join(can)}")


def estimator_name(estimator: str, *, imatrix: str | Path | None = None) -> str:
    """The profile's `estimator` field: the estimator's name, or for one that reads an importance matrix
    `imatrix:<sha256 prefix>` of the file (what it read is part of what the profile means).  An unknown
    estimator or a missing file raises InvalidInput."""
    return estimator_tag(imatrix) if get_estimator(estimator).needs_imatrix else estimator


def input_profile_id(loaded: LoadedModel, calib_fp: str, estimator: str, options: list[Option], seq_len: int,
                     device: str, *, quantizer: Quantizer, embeddings: str, kl_experts: int | None = None) -> str:
    """Same model, text, estimator (`estimator_name`), quantizer, options, sequence length, device, embedding
    setting and sample of experts -> same profile (reused from the store, not recomputed)."""
    settings = {"embeddings": embeddings, **({"kl_experts": kl_experts} if kl_experts is not None else {})}
    return content_id(loaded.ref.fingerprint, calib_fp, estimator, quantizer.model_dump(),
                      [o.model_dump() for o in options], seq_len, device, settings, prefix="prof-")


def check_kl_experts(kl_experts: int | None, estimator: str) -> None:
    """InvalidInput unless `kl_experts` is None, or a positive count for the `calibrated` estimator."""
    if kl_experts is None:
        return
    if estimator != "calibrated":
        raise InvalidInput(f"--kl-experts sets how many experts the calibrated estimator measures; drop it for "
                           f"--estimator {estimator}")
    if isinstance(kl_experts, bool) or not isinstance(kl_experts, int) or kl_experts < 1:
        raise InvalidInput(f"--kl-experts is a count of experts per layer and role (1 or more), not {kl_experts!r}")


def check_embeddings(embeddings: str | None, estimator: str = "") -> str:
    """`plan` or `keep` (None: the default, `keep` for an estimator that cannot plan the embedding)."""
    plans = estimator not in ESTIMATORS or ESTIMATORS[estimator].plans_embedding
    if embeddings is None:
        return DEFAULT_EMBEDDINGS if plans else "keep"
    if embeddings not in EMBEDDINGS:
        raise InvalidInput(f"unknown --embeddings {embeddings!r}; choose one of {list(EMBEDDINGS)}")
    if embeddings == "plan" and not plans:
        raise InvalidInput(f"--estimator {estimator} holds no statistics for the embedding lookup: profile with "
                           f"--embeddings keep, or with another --estimator")
    return embeddings


def check_quantizer_imatrix(quantizer: Quantizer, imatrix: str | Path | None) -> None:
    """A llamacpp quantizer with an importance matrix needs that file (by hash), before any work."""
    if quantizer.imatrix is None:
        return
    if imatrix is None or file_sha256(imatrix)[:16] != quantizer.imatrix:
        raise InvalidInput(f"the quantizer {quantizer.label} weighs llama.cpp's rounding by the importance matrix "
                           f"{quantizer.imatrix}: give that file as --imatrix")


def check_quantizer_options(quantizer: Quantizer, options: list[Option]) -> None:
    """GGUF options and the llamacpp quantizer go together: llama.cpp quantizes its own types only."""
    gguf = [o.gguf is not None for o in options]
    if quantizer.method == "llamacpp" and not all(gguf):
        raise InvalidInput("the llamacpp quantizer stores GGUF types only: give --engine llamacpp (its options "
                           "are GGUF types, e.g. --options q4_k,q6_k,q8_0) or another quantizer")
    if quantizer.method != "llamacpp" and any(gguf):
        raise InvalidInput(f"GGUF options are quantized by llama.cpp, not {quantizer.label}: profile them with "
                           f"--engine llamacpp")


def profile_model(
    loaded: LoadedModel,
    options: list[Option],
    *,
    estimator: str = DEFAULT_ESTIMATOR,
    quantizer: Quantizer = DEFAULT_QUANTIZER,
    calib: str = CALIB,
    n_tokens: int | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    device: str = "cpu",
    progress: bool = True,
    work_dir: str | Path | None = None,
    imatrix: str | Path | None = None,
    cache: GPTQCache | None = None,
    embeddings: str = "keep",
    kl_experts: int | None = None,
    cluster: Cluster | None = None,
) -> Profile:
    """Measure `error[module, option]` with `estimator` (one of ESTIMATORS) on `n_tokens` of `calib`; sizes
    are exact.

    `quantizer` is what ΔW comes from, the quantizer `apply` will use: RTN, or GPTQ (with each module's
    `H = Σ xxᵀ` from the calibration text, collected by streaming the blocks; for `fisher` that is one
    extra forward pass).  `n_tokens` defaults to the estimator's `default_tokens` (DEFAULT_KL_TOKENS for
    `kl`: modules x options forward passes over them).

    An MoE model's expert matrices also get their routing statistics (one more streamed pass), and
    an expert no calibration token reaches gets the fallback error, never zero (profiler/moe.py).
    With `calibrated`, an expert with too few routed tokens in the KL sample gets its siblings' scale
    instead of its own measurement; the Profile's `estimated` names those (profiler/calibrate.py).

    `imatrix` (for `estimator="imatrix"`): a llama.cpp importance matrix, read into each module's
    `diag(H)` (profiler/imatrix.py); the calibration text then gives only ΔW's GPTQ `H` and MoE routing.
    It is also the file of a llamacpp quantizer with an importance matrix (`Quantizer.imatrix`, checked
    against the file's hash): llama.cpp's quantization of each row is weighted by it, as in
    `llama-quantize --imatrix`.

    `work_dir` keeps what is finished so that a rerun with the same folder resumes (`error_table`).
    `cache` keeps every GPTQ result for the applies of this profile's plans in the same process.

    `embeddings="plan"` makes the input embedding a module of the profile (with a tied head, the pair:
    `planned_linears`), quantized with RTN whatever `quantizer` is (`kernels.quantize.quantizer_for`);
    `"keep"` leaves it at 16 bits in `fixed_bits`.

    `kl_experts` (`calibrated` only): the KL points of an MoE model are measured on that many routed
    experts per layer and role, the others scaled like them (profiler/calibrate.py).

    `cluster`: the modules' quantization, error rows and KL points fan out over a Ray cluster
    (profiler/cluster.py); the profile is the same.
    """
    spec = get_estimator(estimator)
    if streamed(loaded.model) is not None:
        check_streams(estimator)
    if not isinstance(quantizer, Quantizer):
        raise TypeError(f"quantizer must be a Quantizer (e.g. Quantizer.parse({quantizer!r})), "
                        f"not {type(quantizer).__name__}")
    check_embeddings(embeddings, estimator)
    check_quantizer_options(quantizer, options)
    name = estimator_name(estimator, imatrix=imatrix)  # a missing imatrix fails before any pass
    check_quantizer_imatrix(quantizer, imatrix)
    if n_tokens is None:
        n_tokens = spec.default_tokens
    t0 = time.perf_counter()
    model = loaded.model
    batches, calib_ref = token_batches(loaded.tokenizer, calib, n_tokens, seq_len)
    planned = planned_linears(model, embeddings == "plan")
    log.info("profiling %d modules x %d options with %s (%s) on %d tokens", len(planned), len(options),
             estimator, quantizer.label, batches.numel())
    importance = None
    if quantizer.imatrix is not None:
        importance = importance_rows(read_imatrix(imatrix), [m for m, _ in planned])
    check_kl_experts(kl_experts, estimator)
    table = spec.table(TableInputs(model, planned, options, batches, quantizer, device, progress, work_dir,
                                   imatrix, cache, importance, kl_experts, cluster))
    error, estimated = table.error, dict(table.estimated)
    modules = [m if m.name not in table.fallback else m.model_copy(update={"fallback": True}) for m, _ in planned]
    if any(m.expert is not None for m in modules):
        modules = moe.with_routing(modules, routing_stats(model, batches, device, progress))
        error, modules = moe.fill_unrouted(error, modules)
        # their rows are the fallback's now, and `fallback` says so
        estimated = {m.name: estimated[m.name] for m in modules if m.name in estimated and not m.fallback}
    size = np.array([[o.size_bits(*m.shape) for o in options] for m in modules], dtype=np.int64)
    return Profile(
        id=input_profile_id(loaded, calib_ref.fingerprint, name, options, seq_len, device, quantizer=quantizer,
                            embeddings=embeddings, kl_experts=kl_experts),
        model=loaded.ref,
        calibration=calib_ref,
        estimator=name,
        quantizer=quantizer,
        device=device,
        options=options,
        modules=modules,
        error=error,
        size_bits=size,
        fixed_bits=fixed_bits(model, planned, gguf=quantizer.method == "llamacpp"),
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
                estimator: str, quantizer: Quantizer = Quantizer(), device: str = "cpu",
                progress: bool = True, work_dir: str | Path | None = None, stats: dict | None = None,
                cache: GPTQCache | None = None, importance: dict[str, np.ndarray] | None = None,
                cluster: Cluster | None = None) -> np.ndarray:
    """`[modules, options]` error of an estimator with a per-module `formula` (`hessian`, `fisher`, ...), ΔW
    from `quantizer` (with `importance`, the llamacpp quantizer's column weights per module).

    `cluster`: each block's modules are quantized and measured on its workers (profiler/cluster.py).

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
    estimate = get_estimator(estimator).formula
    if estimate is None:
        raise ValueError(f"{estimator} measures its table (ESTIMATORS[{estimator!r}].table): it has no formula")
    n = batches.numel()

    def fill(mods, stats, H=None):
        # a block's modules x options (an MoE block: hundreds of matrices), under the blocks' bar
        rows = module_rows(mods, stats, H, options, quantizer, estimate, n, device, cache=cache,
                           importance=importance, cluster=cluster, progress=progress)
        for (m, _), row in zip(mods, rows):
            error[index[m.name]] = row

    # an untied lm_head: not in any block; the embedding has no linear's inputs to hook
    outside = [(m, lin) for m, lin in planned if m.layer is None and not is_embedding(m)]
    embedding = [(m, emb) for m, emb in planned if is_embedding(m)]
    if estimator == "hessian":
        stream_blocks(model, batches, planned, lambda i, mods, H, _: fill(mods, H, H), device, progress,
                      checkpoint=ckpt)
        if outside:
            H = outside_hessians(model, batches, outside, device, progress)
            with materialized(model, [lin for _, lin in outside]):  # weights streamed from disk: read now
                fill(outside, H, H)
        for m, emb in embedding:
            counts, H = embedding_statistics(model, batches, m, device, progress)
            with materialized(model, [emb]):
                W = emb.weight.detach()
                for j, opt in enumerate(options):
                    dW = quantize_dequantize(W, opt) - W
                    error[index[m.name], j] = estimators.embedding_hessian(dW, counts, H, n)
                del W, dW
        return error
    F = stats if stats is not None else fisher_diagonal(model, batches, planned, device, progress,
                        checkpoint=None if work_dir is None else Path(work_dir) / "fisher.pt")
    if quantizer.method != "gptq":  # no H needed
        fill(planned, F)
        return error
    stream_blocks(model, batches, planned, lambda i, mods, H, _: fill(mods, F, H), device, progress,
                  checkpoint=ckpt)
    if outside:
        fill(outside, F, outside_hessians(model, batches, outside, device, progress))
    fill(embedding, F)  # RTN: no H
    return error


def module_rows(mods: list[tuple[Module, nn.Module]], stats: dict[str, torch.Tensor] | None,
                H: dict[str, torch.Tensor] | None, options: list[Option], quantizer: Quantizer,
                estimate: Callable | None, n: int, device: str = "cpu", *, cache: GPTQCache | None = None,
                importance: dict[str, np.ndarray] | None = None, cluster: Cluster | None = None,
                progress: bool = False) -> list[np.ndarray | None]:
    """Each module's `[options]` error, `estimate(ΔW, stats[name], n)` with ΔW from `quantizer` (GPTQ from
    `H[name]`): in this process, or with `cluster` one task per module on its workers.  With `estimate`
    None only GPTQ runs (its results go to `cache`) and the rows are None.  Results GPTQ makes go to
    `cache` either way."""
    imp = importance or {}

    def inputs(m: Module) -> tuple:
        """`(H, statistics)` of `m`; statistics None where they are its `H` (`hessian`) or not needed."""
        h = None if H is None or m.name not in H else H[m.name]
        st = None if stats is None or estimate is None else stats[m.name]
        return h, None if st is h else st

    if cluster is None or len(mods) < 2:
        # on `device`: the streamed pass has put the block back on the host, and GPTQ and the error run where
        # the weight is (on a GPU they are most of a large model's profile)
        return [_module_row(m, lin.weight.detach().to(device), *inputs(m), options, quantizer, estimate, n,
                            imp.get(m.name), cache)
                for m, lin in tqdm(mods, desc="error table", unit="module", leave=False,
                                   disable=not progress or len(mods) < 2)]
    rows: list = [None] * len(mods)

    def got(i: int, result: tuple) -> None:
        rows[i], kept = result
        if cache is not None:
            cache.update(kept)

    # to the workers from the host, with the module's results so far; its new ones come back
    # made as the tasks go out, so a block's routed experts' H exist a few at a time (BlockHessians)
    calls = ((m, lin.weight.detach().cpu(), *(None if t is None else t.cpu() for t in inputs(m)), options,
              quantizer, estimate, n, imp.get(m.name), None if cache is None else cache.entries([m.name]))
             for m, lin in mods)
    cluster.map(_remote_row, calls, device, total=len(mods), on_result=got, progress=progress, desc="error table")
    return rows


def _module_row(m: Module, W: torch.Tensor, H: torch.Tensor | None, stats: torch.Tensor | None,
                options: list[Option], quantizer: Quantizer, estimate: Callable | None, n: int,
                importance: np.ndarray | None, cache: GPTQCache | None) -> np.ndarray | None:
    """One module's row of `module_rows` (`stats` None: `H` is the statistics, as for `hessian`)."""
    q = quantizer_for(m, quantizer)
    H = None if H is None else H.to(W.device)
    if estimate is None:
        for opt in options:
            if opt.quantized and q.method == "gptq":
                quantize(W, opt, q, H, cache=cache, name=m.name)
        return None
    stats = (H if stats is None else stats).to(W.device)
    row = np.zeros(len(options))
    for j, opt in enumerate(options):
        dW = quantize_dequantize(W, opt, q, H, cache=cache, name=m.name, importance=importance) - W
        row[j] = estimate(dW, stats, n)
    return row


def _remote_row(m, W, H, stats, options, quantizer, estimate, n, importance, cache, device) -> tuple:
    """`_module_row` as a cluster task: the weight on the worker's device (GPTQ brings `H` there), its GPTQ
    results returned with the row."""
    return _module_row(m, W.to(device), H, stats, options, quantizer, estimate, n, importance, cache), cache


def gptq_results(model: nn.Module, planned: list[tuple[Module, nn.Linear]], options: list[Option],
                 batches: torch.Tensor, quantizer: Quantizer, device: str = "cpu", progress: bool = True, *,
                 cache: GPTQCache | None = None, cluster: Cluster | None = None) -> GPTQCache:
    """A cache holding GPTQ's result for every planned module at every quantized option, from `H` of
    `batches` (what `error_table` puts in its cache on the way), made with `cluster` where given."""
    cache = cache if cache is not None else GPTQCache(max_bytes=1 << 62)
    gptq_mods = [(m, lin) for m, lin in planned if quantizer_for(m, quantizer).method == "gptq"]

    def run(mods, H):
        module_rows(mods, None, H, options, quantizer, None, 0, device, cache=cache, cluster=cluster)

    stream_blocks(model, batches, gptq_mods, lambda i, mods, H, _: run(mods, H), device, progress,
                  desc="GPTQ")
    outside = [(m, lin) for m, lin in gptq_mods if m.layer is None]
    if outside:
        run(outside, outside_hessians(model, batches, outside, device, progress))
    return cache


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
    """`H` of every planned module the profile's quantizer runs GPTQ on, from the profile's own calibration
    tokens, for GPTQ after profiling (`apply`, `compare --evaluate`, the evolutionary search's variants);
    `{}` for an RTN profile.
    """
    from bitplan.profiler.stream import collect_hessians

    # the embedding is RTN whatever the profile's quantizer: no H
    planned = [(m, lin) for m, lin in planned if quantizer_for(m, profile.quantizer).method == "gptq"]
    if not planned:
        return {}
    batches = calibration_batches(loaded, profile)
    return collect_hessians(loaded.model, batches, planned, device or default_device(), progress=progress)


def gptq_propagated(loaded: LoadedModel, profile: Profile, planned: list[tuple[Module, nn.Linear]],
                    assignment: dict[str, Option], *, device: str | None = None,
                    progress: bool = True) -> GPTQCache:
    """GPTQ of one plan's modules (`assignment`) on the inputs its quantized model gives them, from the
    profile's calibration tokens (`apply --gptq-inputs quantized`): `gptq_on_quantized_inputs`."""
    if profile.quantizer.method != "gptq":
        raise InvalidInput(f"--gptq-inputs chooses the activations GPTQ sees; profile {profile.id}'s quantizer "
                           f"is {profile.quantizer.label}")
    return gptq_on_quantized_inputs(loaded.model, calibration_batches(loaded, profile), planned, assignment,
                                    profile.quantizer, device or default_device(), progress).claim(profile.id)


def gptq_on_quantized_inputs(model: nn.Module, batches: torch.Tensor, planned: list[tuple[Module, nn.Linear]],
                             assignment: dict[str, Option], quantizer: Quantizer, device: str = "cpu",
                             progress: bool = True) -> GPTQCache:
    """Every quantized module of `assignment` quantized for the inputs the quantized model feeds it, as a
    cache `apply` reads GPTQ's results from.

    The embedding (and any other module before the blocks) is quantized first; then each block runs on
    the outputs of the blocks quantized before it, its `H` is taken, its modules are quantized with it,
    and it runs again to give the next block its inputs; a planned head outside the blocks comes last,
    from the quantized blocks' outputs.  GPTQ then spends its error compensation on the activations the
    deployed model computes rather than on the unquantized model's.  `model`'s weights are as they were
    afterwards.
    """
    from bitplan.profiler.stream import outside_hessians

    cache = GPTQCache(max_bytes=1 << 62, inputs="quantized")
    originals: list[tuple[nn.Module, torch.Tensor]] = []

    def quantize_in_place(mods: list[tuple[Module, nn.Linear]], H: dict[str, torch.Tensor]) -> None:
        for m, lin in mods:
            option = assignment[m.name]
            if not option.quantized:
                continue
            h = H.get(m.name)  # none for RTN modules (the embedding)
            qw = quantize(lin.weight, option, quantizer_for(m, quantizer), None if h is None else h.to(torch.float32),
                          cache=cache, name=m.name)
            originals.append((lin, lin.weight.data))
            lin.weight.data = qw.dequantize(lin.weight.dtype).to(lin.weight.device)

    outside = [(m, lin) for m, lin in planned if m.layer is None]
    head = [(m, lin) for m, lin in outside if quantizer_for(m, quantizer).method == "gptq"]  # an untied head
    try:
        quantize_in_place([(m, lin) for m, lin in outside if quantizer_for(m, quantizer).method != "gptq"], {})
        stream_blocks(model, batches, planned, lambda *_: None, device, progress, desc="GPTQ on quantized inputs",
                      rewrite=lambda _i, mods, H: quantize_in_place(mods, H))
        quantize_in_place(head, outside_hessians(model, batches, head, device, progress))
    finally:
        for lin, weight in reversed(originals):
            lin.weight.data = weight
    return cache


def calibration_batches(loaded: LoadedModel, profile: Profile) -> torch.Tensor:
    """The profile's own calibration windows, checked to be the ones it was measured on.

    A profile whose calibration records no sequence length (`seq_len` 0) gets sequences of the default
    length (H sums over tokens; only attention context differs).
    """
    calib = profile.calibration
    seq_len = calib.seq_len or min(DEFAULT_SEQ_LEN, calib.n_tokens)
    batches, ref = token_batches(loaded.tokenizer, calib.name, calib.n_tokens, seq_len)
    if calib.fingerprint and ref.fingerprint != calib.fingerprint:
        raise InvalidInput(f"the calibration windows of {calib.name!r} are not those profile {profile.id} was "
                           f"measured on (another text file, or a tokenizer that starts windows otherwise); "
                           f"profile the model again")
    return batches


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
