"""profile -> plan -> apply -> evaluate, with everything stored: the calls the CLI and the service share.

Each use case takes the `Workspace` (store, loaded model, GPTQ results, evaluation windows) and a typed
request; it validates its input before any heavy work (a bad budget fails before a model loads) and
stores what it made.  Model code (torch, transformers) is imported inside the steps that need it, so
planning a stored profile works on a machine without torch.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from bitplan.db.files import exclusive
from bitplan.db.store import content_profile_id
from bitplan.db.formats import parse_gguf_options
from bitplan.db.types import (DEFAULT_GPTQ_INPUTS, DEFAULT_GROUP_SIZES, DEFAULT_OPTIONS, Budget, Evaluation,
                              InfeasibleBudget, InvalidInput, NotFound, Option, Plan, Profile, Quantizer,
                              parse_options)
from bitplan.planner.allocators import lookup_allocator, needs_context
from bitplan.planner.app.workspace import Workspace
from bitplan.planner.budgets import DEMO_BUDGETS, parse_budgets
from bitplan.planner.engines import profile_engine
from bitplan.planner.plan import allocate, unit_of
from bitplan.planner.request import PlanRequest

log = logging.getLogger(__name__)

IMATRIX_FROM_CALIBRATION = "calibration"  # `--imatrix calibration`: llama-imatrix on the profile's own text


class ProfileRequest(BaseModel):
    """How to profile a model; None takes the profiler's default (profiler/profile.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: str | None = None  # llamacpp: the options are GGUF types, quantized by llama.cpp's own library
    options: str | None = None  # bit widths, `parse_options` (default 2,3,4,8); GGUF types for llamacpp
    group_sizes: str | None = None  # `32,64,128,ch`: every option's bits at each (default 64)
    estimator: str | None = None  # default: calibrated, or imatrix when an imatrix is given
    quantizer: str | None = None  # rtn, gptq or gptq:damp=0.05,...: where each option's ΔW comes from
    calib: str | None = None  # calibration text: a file, or the default plays
    tokens: int | None = None
    seq_len: int | None = None
    device: str | None = None
    # a llama.cpp importance matrix: the imatrix estimator's, and under engine llamacpp the quantizer's
    # (`calibration`: llama-imatrix makes one from the calibration text)
    imatrix: str | None = None
    embeddings: str | None = None  # plan or keep the input embedding
    latency: str | None = None  # roofline:GPU or measured: also fill the latency table
    latency_batches: str | tuple[int, ...] | None = None
    # weights read from disk one block at a time (auto: when they do not fit in memory): profiler/model.py
    stream_weights: str | None = None
    # `calibrated` on an MoE model: KL measured on this many routed experts per layer and role (None: all)
    kl_experts: int | None = None


def run_profile(ws: Workspace, source: str, request: ProfileRequest = ProfileRequest(), *, force: bool = False,
                resume: bool = False) -> Profile:
    """Profile `source` (or reuse the stored profile of the same model, text and settings).

    What is finished is kept in `Store.work_dir` until the profile is stored; `resume` continues from
    there (profiler/profile.py `error_table` says what each estimator resumes), otherwise an earlier
    run's unfinished work is discarded.  The profile's GPTQ results stay in the workspace's cache when
    it keeps them, for the applies after it.  With `request.latency`, the result is the error profile
    with that latency table, stored under its own id.
    """
    from bitplan.profiler import profile as prof
    from bitplan.profiler.calibration import CALIB, token_batches

    r = request
    if ws.cluster is not None:
        ws.cluster.connect()  # a cluster that cannot be reached fails before a model loads
    latency_batches = None
    if r.latency:
        from bitplan.profiler.latency import DEFAULT_BATCHES, parse_batches, parse_spec

        parse_spec(r.latency)  # a bad spec or batch list fails before a model loads
        latency_batches = parse_batches(r.latency_batches or DEFAULT_BATCHES)
    gguf = r.engine == "llamacpp"
    if r.imatrix and not gguf and r.estimator not in (None, "imatrix"):
        raise InvalidInput(f"--imatrix is read by --estimator imatrix (or the llamacpp quantizer, with --engine "
                           f"llamacpp), not {r.estimator}")
    calib, tokens = r.calib or CALIB, r.tokens or prof.DEFAULT_TOKENS
    seq_len, device = r.seq_len or prof.DEFAULT_SEQ_LEN, r.device or prof.default_device()
    if r.imatrix == IMATRIX_FROM_CALIBRATION:
        if not gguf:
            raise InvalidInput(f"--imatrix {IMATRIX_FROM_CALIBRATION} runs llama-imatrix, for --engine llamacpp; "
                               f"give the path of an imatrix.gguf otherwise")
        profile_options(r.model_copy(update={"imatrix": None}))  # tools and options checked first
        made = ws.make_imatrix(source, calib, ctx=seq_len, chunks=-(-tokens // seq_len))
        r = r.model_copy(update={"imatrix": str(made)})
    opts, quantizer = profile_options(r)
    if quantizer.imatrix is not None:
        ws.keep_imatrix(r.imatrix)  # the applies of its plans quantize with this same file
    estimator = r.estimator or ("imatrix" if r.imatrix and not gguf else prof.DEFAULT_ESTIMATOR)
    name = prof.estimator_name(estimator, imatrix=r.imatrix)  # a missing imatrix fails before the model loads
    embeddings = prof.check_embeddings(r.embeddings, estimator)
    prof.check_kl_experts(r.kl_experts, estimator)
    loaded = _model_to_profile(ws, source, r.stream_weights or "auto", estimator)
    _, calib_ref = token_batches(loaded.tokenizer, calib, tokens, seq_len)
    pid = prof.input_profile_id(loaded, calib_ref.fingerprint, name, opts, seq_len, device, quantizer=quantizer,
                                embeddings=embeddings, kl_experts=r.kl_experts)
    cache = ws.gptq_cache(pid)
    profile = None if force else _stored_profile(ws, pid)
    if profile is None:
        work = ws.store.work_dir(pid)
        # one process at a time measures a profile: another one asking for it waits, then reuses it
        with exclusive(work.with_name(work.name + ".lock"),
                       waiting=f"another process is profiling {pid}: waiting for it to finish"):
            profile = None if force else _stored_profile(ws, pid)
            if profile is None:
                profile = _measure(ws, loaded, pid, work, resume, opts, estimator, quantizer, calib, tokens,
                                   seq_len, device, r.imatrix, cache, embeddings, r.kl_experts)
    if r.latency:
        return add_latency(ws, profile, r.latency, latency_batches, force=force)
    return profile


def _model_to_profile(ws: Workspace, source: str, stream_weights: str, estimator: str):
    """The model at `source`, its weights left on disk when `stream_weights` says so (checked against the
    estimator before the model loads).  A model with streamed weights serves this profile only: the
    workspace forgets it, so that a later use case loads the model whole."""
    from bitplan.profiler import profile as prof
    from bitplan.profiler.model import check_causal_lm, load_model, loaded_bytes, resolve, streams_weights

    if ws.has_model(source) and stream_weights != "on":
        return ws.model(source)
    check_causal_lm(source)
    if not streams_weights(source, stream_weights):
        return ws.model(source)
    try:
        prof.check_streams(estimator)
    except InvalidInput as e:
        if stream_weights == "on":
            raise
        raise InvalidInput(f"{source}'s weights ({loaded_bytes(resolve(source)[0]) / 2**30:.1f} GiB in float32) do "
                           f"not fit in the memory available, so they would be streamed from disk; {e}, or load "
                           f"them whole anyway with --stream-weights off") from None
    loaded = load_model(source, stream_weights="on")
    ws.adopt(source, None)  # another model the workspace held goes; this one is not kept for the next use case
    return loaded


def _measure(ws: Workspace, loaded, pid: str, work: Path, resume: bool, opts, estimator, quantizer, calib,
             tokens, seq_len, device, imatrix, cache, embeddings, kl_experts) -> Profile:
    """`profile_model` with its unfinished work kept in `work` (resumed or discarded), then stored."""
    from bitplan.profiler import profile as prof

    if work.exists():
        if resume:
            log.info("resuming %s from %s", pid, work)
        else:
            log.info("discarding the unfinished work in %s (--resume continues it)", work)
            shutil.rmtree(work)
    t0 = time.perf_counter()
    profile = prof.profile_model(loaded, opts, estimator=estimator, quantizer=quantizer, calib=calib,
                                 n_tokens=tokens, seq_len=seq_len, device=device, progress=ws.progress,
                                 work_dir=work, imatrix=imatrix, cache=cache, embeddings=embeddings,
                                 kl_experts=kl_experts, cluster=ws.cluster)
    profile = ws.store.save_profile(profile)
    shutil.rmtree(work, ignore_errors=True)
    log.info("profile %s (%s) in %.0f s", profile.id, profile.estimator, time.perf_counter() - t0)
    return profile


def profile_options(r: ProfileRequest) -> tuple[list[Option], Quantizer]:
    """The options and quantizer a request profiles: bit widths with its quantizer (default GPTQ), or under
    `engine="llamacpp"` GGUF types with llama.cpp's quantization (its tools checked before any work)."""
    from bitplan.profiler.profile import DEFAULT_QUANTIZER

    if r.engine not in (None, "bitplan", "llamacpp"):
        raise InvalidInput(f"profiles are made for --engine bitplan (our options) or llamacpp (GGUF types), "
                           f"not {r.engine!r}; a vllm plan is planned from a bitplan profile")
    if r.engine != "llamacpp":
        quantizer = Quantizer.parse(r.quantizer) if r.quantizer else DEFAULT_QUANTIZER
        return parse_options(r.options or DEFAULT_OPTIONS, r.group_sizes or DEFAULT_GROUP_SIZES), quantizer
    if r.quantizer not in (None, "llamacpp"):
        raise InvalidInput(f"--engine llamacpp measures llama.cpp's own quantization of each GGUF type; drop "
                           f"--quantizer {r.quantizer}")
    from bitplan.kernels.llamacpp import check_tools

    opts = parse_gguf_options(r.options)
    check_tools()
    from bitplan.profiler.imatrix import file_sha256

    return opts, Quantizer(method="llamacpp", imatrix=file_sha256(r.imatrix)[:16] if r.imatrix else None)


def _stored_profile(ws: Workspace, pid: str) -> Profile | None:
    try:
        stored = ws.store.get_profile(pid)
    except NotFound:
        return None
    log.info("reusing stored profile %s", pid)
    return stored


def run_validate(ws: Workspace, source: str, request: ProfileRequest = ProfileRequest(), *,
                 layers: Sequence[int] | None = None, estimators: Sequence[str] = ("hessian", "fisher")) -> dict:
    """`bitplan profile --validate`: each cheap estimator's Spearman ρ against measured single-module KL.

    `estimators` may include `imatrix` (then read from `request.imatrix`) and `hutchinson`.
    JSON-ready: the tables are left out, the module names and figures stay.
    """
    from bitplan.profiler.kl import DEFAULT_KL_TOKENS
    from bitplan.profiler.profile import DEFAULT_SEQ_LEN, DEFAULT_TOKENS, default_device, estimator_name
    from bitplan.profiler.validate import validate

    r = request
    options, quantizer = profile_options(r)
    for e in estimators:  # an unknown name or a missing imatrix fails before the model loads
        estimator_name(e, imatrix=r.imatrix)
    loaded = ws.model(source)
    kw = {"calib": r.calib} if r.calib else {}
    tokens = r.tokens or DEFAULT_TOKENS
    result = validate(loaded, options, quantizer=quantizer, n_tokens=tokens,
                      kl_tokens=min(DEFAULT_KL_TOKENS, tokens), seq_len=r.seq_len or DEFAULT_SEQ_LEN, layers=layers,
                      device=r.device or default_device(), progress=ws.progress, estimators=tuple(estimators),
                      imatrix=r.imatrix, **kw)
    result.pop("tables")
    result["n_modules"] = len(result["modules"])
    return result


def add_latency(ws: Workspace, profile: Profile, spec: str, batches: Sequence[int], *,
                force: bool = False) -> Profile:
    """`profile` with the latency table `spec` names, stored (a roofline one already stored is reused)."""
    from bitplan.profiler.latency import latency_profile_id, latency_table, parse_spec, with_latency

    device = parse_spec(spec)
    if device is not None and not force:
        try:
            return ws.store.get_profile(latency_profile_id(profile.id, device.source, batches))
        except NotFound:
            pass
    table = latency_table(spec, profile.modules, profile.options, batches)
    return ws.store.save_profile(with_latency(profile, table))


def run_plan(ws: Workspace, profile: Profile | str, request: PlanRequest = PlanRequest(), *,
             search_state: str | Path | None = None) -> Plan:
    """Plan a stored profile (by id) or a profile object as `request` asks; store the profile and the plan.

    An allocator that measures the model (`evolutionary`) gets the profile's model from the workspace,
    with fitness text from the profile's calibration text (`search_context`); `search_state` is where
    its resumable state goes."""
    request = request.checked()  # a bad request fails before anything is read
    profile = _with_id(ws, profile)
    context = search_context(ws, profile, search_state, request.params) if needs_context(request.allocator) else None
    try:
        plan = allocate(profile, request, context=context)
    finally:
        if context is not None:
            context.oracle.close()  # the loaded model gets its own weights back
    ws.store.save_profile(profile)
    return ws.store.save_plan(plan)


def search_context(ws: Workspace, profile: Profile, state_path: str | Path | None = None, params: dict | None = None):
    """The evolutionary allocator's SearchContext: a KL oracle on the profile's model and calibration text,
    with the fitness pool and held-out split the search's `params` ask for (`fitness_tokens`,
    `heldout_tokens`; else the oracle's defaults)."""
    from bitplan.planner.allocators.evolutionary import SearchContext, pool_sizes
    from bitplan.profiler.fitness import kl_fitness_for_profile

    pool = pool_sizes(params or {})  # a bad size fails before the model loads
    if ws.cluster is not None:
        ws.cluster.connect()  # a cluster that cannot be reached fails before the model loads
    loaded = ws.model_of(profile, "the evolutionary allocator")
    return SearchContext(kl_fitness_for_profile(loaded, profile, cluster=ws.cluster, **pool), state_path=state_path,
                         progress=ws.progress)


def _with_id(ws: Workspace, profile: Profile | str) -> Profile:
    """A stored profile by id, or the object itself; a profile file without an id gets its content id, and
    so does one whose id is a stored profile's with other content (an edited file), said so."""
    if isinstance(profile, str):
        return ws.store.get_profile(profile)
    if not profile.id:  # so that its plans can refer to it
        return profile.model_copy(update={"id": content_profile_id(profile)})
    try:
        stored = ws.store.get_profile(profile.id)
    except NotFound:
        return profile
    if content_profile_id(stored) != content_profile_id(profile):
        own = content_profile_id(profile)
        log.warning("the profile file says it is %s, but its content differs from the stored %s: planned as %s",
                    profile.id, profile.id, own)
        return profile.model_copy(update={"id": own})
    return profile


COMPARE_EVAL_TOKENS = 2048  # base log-probs of all of them are held at once (2,048 x 49,152 floats: 400 MB)


class CompareRow(BaseModel):
    """One (budget, allocator) pair of a comparison: its plan, or why there is none (`error`)."""

    budget: str
    allocator: str
    granularity: str
    plan_id: str | None = None
    predicted_error: float | None = None
    bits_per_weight: float | None = None
    size_mib: float | None = None
    solve_seconds: float | None = None
    status: str | None = None
    error: str | None = None
    # measured on the evaluation text (`compare --evaluate`)
    perplexity: float | None = None
    kl: float | None = None


def run_compare(ws: Workspace, profile: Profile | str, budgets: str | Sequence[str],
                allocators: Sequence[str] = ("ilp", "closed_form", "greedy", "uniform"),
                request: PlanRequest = PlanRequest(), *, evaluate: bool = False,
                eval_tokens: int = COMPARE_EVAL_TOKENS) -> list[CompareRow]:
    """Solve every (budget, allocator) pair on one profile and store every plan; one row per pair.

    `request` gives the settings every pair shares (pins, seed, granularity, engine, time limit; its
    `params` go to the allocator that measures the model).  `evaluate` also measures each plan on the
    profile's model, in memory: held-out perplexity and mean per-token KL(base ‖ plan) on `eval_tokens`
    of the evaluation text (`executor.evaluate.evaluate_plans`).  An allocator that measures the model
    (`evolutionary`) shares one fitness oracle over all budgets.

    An infeasible pair keeps its row, with the message under `error` and no plan; any other bad input
    (an unknown allocator or granularity, a bad budget or pin) fails before anything is solved.
    """
    budgets = parse_budgets(budgets)
    if not allocators:
        raise InvalidInput("no allocators given")
    for a in allocators:
        lookup_allocator(a)
    measuring = any(needs_context(a) for a in allocators)
    if request.params and not measuring:
        raise InvalidInput(f"search parameters {sorted(request.params)} are for the evolutionary allocator, which "
                           f"is not among {list(allocators)}")
    params = request.params  # the measuring allocator's; each pair's request is checked when it is solved
    request = request.model_copy(update={"params": {}}).checked()
    profile = _with_id(ws, profile)
    unit_of(profile.modules, request.granularity, request.engine or profile_engine(profile))  # fails here, before any solve
    ws.store.save_profile(profile)
    context = search_context(ws, profile, params=params) if measuring else None
    rows = []
    try:
        for budget in budgets:
            for allocator in allocators:
                measures = needs_context(allocator)
                pair = request.model_copy(update={"budget": budget, "allocator": allocator,
                                                  "params": params if measures else {}})
                row = CompareRow(budget=budget, allocator=allocator, granularity=request.granularity)
                try:
                    plan = ws.store.save_plan(allocate(profile, pair, context=context if measures else None))
                except InfeasibleBudget as e:
                    row.status, row.error = "infeasible", str(e)
                else:
                    row = row.model_copy(update=dict(
                        plan_id=plan.id, predicted_error=plan.predicted_error, bits_per_weight=plan.bits_per_weight,
                        size_mib=plan.size_mib, solve_seconds=plan.solve_seconds, status=plan.status))
                rows.append(row)
    finally:
        if context is not None:
            context.oracle.close()  # the loaded model gets its own weights back
    if evaluate:
        rows = _evaluate_rows(ws, profile, rows, eval_tokens)
    return rows


def _evaluate_rows(ws: Workspace, profile: Profile, rows: list[CompareRow], tokens: int) -> list[CompareRow]:
    from bitplan.executor.evaluate import evaluate_plans
    from bitplan.profiler import profile as prof
    from bitplan.profiler.model import planned_for

    done = [r.plan_id for r in rows if r.plan_id]
    if not done:
        return rows
    loaded = ws.model_of(profile, "evaluating plans")
    planned = planned_for(loaded.model, {m.name for m in profile.modules})
    plans = [ws.store.get_plan(p) for p in done]
    quantizer = profile.quantizer
    hessians = prof.gptq_hessians(loaded, profile, planned, progress=ws.progress)  # {} for RTN
    windows = ws.windows(loaded.tokenizer, tokens=tokens)
    from bitplan.kernels.quantize import GPTQCache  # the compared plans share modules' results

    cache = ws.gptq_cache(profile.id) or GPTQCache().claim(profile.id)
    importance = None
    if quantizer.imatrix is not None:
        from bitplan.profiler.imatrix import importance_rows, read_imatrix

        importance = importance_rows(read_imatrix(ws.imatrix(quantizer.imatrix)), [m for m, _ in planned])
    measured = dict(zip(done, evaluate_plans(loaded.model, planned, [p.assignment for p in plans], windows.ids,
                                             quantizer=quantizer, hessians=hessians, progress=ws.progress,
                                             cache=cache, importance=importance)))
    return [r.model_copy(update=measured[r.plan_id]) if r.plan_id else r for r in rows]


class TextValidation(BaseModel):
    """On one evaluation text: how the plans' predicted errors ranked their measured ones."""

    corpus: str
    n_plans: int
    spearman_kl: float | None = None  # None where fewer than 3 plans have a measured KL
    spearman_perplexity: float | None = None


class ProfileValidation(BaseModel):
    """What the evaluations stored so far say of a profile's predictions (`GET /v1/profiles/{id}/validation`)."""

    profile_id: str
    n_plans: int
    n_evaluated: int
    texts: list[TextValidation]


def profile_validation(store, profile_id: str) -> ProfileValidation:
    """Spearman's rho between predicted error and measured KL / perplexity over the profile's evaluated
    plans, per evaluation text (bitplan's own evaluator; a plan evaluated twice on a text counts its
    newest).  A rank correlation: the planner needs the order of its costs right, not their scale."""
    store.get_profile(profile_id)  # 404 for an unknown profile
    plans = {p.id: p for p in store.list_plans(profile_id)}
    by_text: dict[str, dict[str, Evaluation]] = {}
    for plan_id in plans:
        for ev in store.list_evaluations(plan_id):  # newest first
            if ev.engine == "bitplan":
                by_text.setdefault(ev.corpus, {}).setdefault(plan_id, ev)
    texts = [_text_validation(corpus, evs, plans) for corpus, evs in sorted(by_text.items())]
    return ProfileValidation(profile_id=profile_id, n_plans=len(plans),
                             n_evaluated=len({p for evs in by_text.values() for p in evs}),
                             texts=sorted(texts, key=lambda t: -t.n_plans))


def _text_validation(corpus: str, evs: dict[str, Evaluation], plans: dict[str, Plan]) -> TextValidation:
    def rho(pairs):
        if len(pairs) < 3:
            return None
        from scipy.stats import spearmanr

        value = spearmanr(*zip(*pairs)).statistic
        return None if value != value else round(float(value), 4)  # NaN: all predictions equal

    predicted = {pid: plans[pid].predicted_error for pid in evs}
    return TextValidation(
        corpus=corpus, n_plans=len(evs),
        spearman_kl=rho([(predicted[p], e.kl_divergence) for p, e in evs.items() if e.kl_divergence is not None]),
        spearman_perplexity=rho([(predicted[p], e.perplexity) for p, e in evs.items()]))


def run_apply(ws: Workspace, plan: Plan | str, out: str | Path, *, overwrite: bool = False,
              fmt: str = "bitplan", gptq_inputs: str = DEFAULT_GPTQ_INPUTS, stream_weights: str = "auto") -> Path:
    """Write the quantized checkpoint of a stored plan, in our format or another engine's (`fmt`:
    executor/export.py).  GPTQ results the workspace keeps for the plan's profile are not computed
    again, and the `H` collected for those it lacks is kept there for the next plan.  `gptq_inputs`:
    GPTQ's statistics from the unquantized model's activations (`original`, shared by every plan of the
    profile) or from those the plan's own quantized model gives each block (`quantized`).

    `stream_weights` (`auto`, `on`, `off`, as for profiling): the model's weights read from its shards one
    block at a time and the checkpoint written from parts (`executor.apply.apply_plan_streamed`), for a
    model larger than memory; our format, with GPTQ on the unquantized model's statistics."""
    from bitplan.executor.apply import missing_hessians
    from bitplan.executor.export import check_format, export_llamacpp, export_plan
    from bitplan.profiler import profile as prof
    from bitplan.profiler.fitness import check_same_model
    from bitplan.profiler.model import planned_for

    check_format(fmt)
    from bitplan.db.types import GPTQ_INPUTS
    if gptq_inputs not in GPTQ_INPUTS:
        raise InvalidInput(f"--gptq-inputs is one of {', '.join(GPTQ_INPUTS)}, not {gptq_inputs[:40]!r}")
    if isinstance(plan, str):
        plan = ws.store.get_plan(plan)
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise InvalidInput(f"{out} exists; choose another --out or pass --overwrite")
    if fmt == "gguf":
        return _apply_gguf(ws, plan, out)
    if fmt == "llamacpp" and not ws.has_model(plan.model.source):
        # a text file of tensor types: the profile's module names and shapes suffice, no weights needed
        modules = _profile_modules(ws, plan)
        if modules is not None:
            return export_llamacpp(plan, modules, out, overwrite=overwrite)
    if not ws.has_model(plan.model.source) and _streams_for_apply(plan.model.source, stream_weights, fmt):
        return _apply_streamed(ws, plan, out, overwrite=overwrite, gptq_inputs=gptq_inputs)
    loaded = ws.model(plan.model.source)
    # a model replaced at its source since it was profiled would be quantized with another model's plan
    check_same_model(loaded, plan.model, f"plan {plan.id} (profile {plan.profile_id})")
    planned = planned_for(loaded.model, plan.assignment)
    quantizer = plan_quantizer(ws, plan)
    if gptq_inputs == "quantized":
        cache = prof.gptq_propagated(loaded, ws.store.get_profile(plan.profile_id), planned, plan.assignment,
                                     progress=ws.progress)
        return export_plan(plan, loaded.model, loaded.tokenizer, planned, out, fmt, overwrite=overwrite,
                           progress=ws.progress, quantizer=quantizer, cache=cache)
    cache = ws.gptq_cache(plan.profile_id)
    hessians = None if cache is None else cache.hessians
    if missing_hessians(planned, plan, quantizer, hessians, cache):
        hessians = prof.gptq_hessians(loaded, ws.store.get_profile(plan.profile_id), planned, progress=ws.progress)
        if cache is not None:
            cache.hessians = hessians
    return export_plan(plan, loaded.model, loaded.tokenizer, planned, out, fmt, overwrite=overwrite,
                       progress=ws.progress, quantizer=quantizer, hessians=hessians, cache=cache)


def _streams_for_apply(source: str, stream_weights: str, fmt: str) -> bool:
    """Whether `apply` reads the weights from disk one block at a time (checked against the format)."""
    from bitplan.profiler.model import check_causal_lm, loaded_bytes, resolve, streams_weights

    check_causal_lm(source)
    if not streams_weights(source, stream_weights):
        return False
    if fmt != "bitplan":
        raise InvalidInput(f"{source}'s weights ({loaded_bytes(resolve(source)[0]) / 2**30:.1f} GiB in float32) would be "
                           f"streamed from disk, which writes --format bitplan only; write that, or load them whole "
                           f"with --stream-weights off")
    return True


def _apply_streamed(ws: Workspace, plan: Plan, out: Path, *, overwrite: bool, gptq_inputs: str) -> Path:
    """`run_apply` with the weights streamed from disk (executor.apply.apply_plan_streamed)."""
    from bitplan.executor.apply import apply_plan_streamed
    from bitplan.profiler import profile as prof
    from bitplan.profiler.fitness import check_same_model
    from bitplan.profiler.model import load_model, planned_for

    quantizer = plan_quantizer(ws, plan)
    if quantizer.method == "gptq" and gptq_inputs != "original":
        raise InvalidInput("with the weights streamed from disk GPTQ takes the unquantized model's statistics: pass "
                           "--gptq-inputs original, or load the model whole with --stream-weights off")
    loaded = load_model(plan.model.source, stream_weights="on")
    check_same_model(loaded, plan.model, f"plan {plan.id} (profile {plan.profile_id})")
    batches = prof.calibration_batches(loaded, ws.store.get_profile(plan.profile_id)) \
        if quantizer.method == "gptq" else None
    return apply_plan_streamed(plan, loaded.model, loaded.tokenizer, planned_for(loaded.model, plan.assignment), out,
                               batches=batches, overwrite=overwrite, progress=ws.progress, quantizer=quantizer,
                               device=prof.default_device())


def _apply_gguf(ws: Workspace, plan: Plan, out: Path) -> Path:
    """The plan as a GGUF file, by llama-quantize from the model's F16 GGUF."""
    from bitplan.executor.export import llamacpp_types
    from bitplan.executor.llamacpp import quantize_gguf
    from bitplan.kernels.llamacpp import check_tools
    from bitplan.profiler.model import planned_for

    if out.suffix != ".gguf":
        raise InvalidInput(f"--format gguf writes one file: give --out NAME.gguf, not {out}")
    check_tools()
    modules = _profile_modules(ws, plan)
    if modules is None:
        modules = [m for m, _ in planned_for(ws.model(plan.model.source).model, plan.assignment)]
    llamacpp_types(plan, modules)  # a type llama.cpp cannot store fails before the F16 GGUF is written
    key = plan_quantizer(ws, plan).imatrix
    imatrix = None if key is None else ws.imatrix(key)
    out.parent.mkdir(parents=True, exist_ok=True)
    return quantize_gguf(ws.base_gguf(plan.model.source), out, plan=plan, modules=modules, imatrix=imatrix)


def _profile_modules(ws: Workspace, plan: Plan) -> list | None:
    """The planned modules as the plan's stored profile names them, or None when this store lacks it."""
    try:
        modules = ws.store.get_profile(plan.profile_id).modules
    except NotFound:
        return None
    if {m.name for m in modules} != set(plan.assignment):
        raise InvalidInput(f"plan {plan.id} does not assign exactly the modules of its profile {plan.profile_id}")
    return list(modules)


def plan_quantizer(ws: Workspace, plan: Plan) -> Quantizer:
    """The quantizer the plan's profile measured ΔW with (RTN when the profile is not in this store)."""
    try:
        return ws.store.get_profile(plan.profile_id).quantizer
    except NotFound:
        log.warning("profile %s of plan %s is not in %s: applying with rtn", plan.profile_id, plan.id, ws.store.url)
        return Quantizer()


def run_eval(ws: Workspace, checkpoint: str, *, text: str | None = None, tokens: int | None = None,
             window: int | None = None, device: str = "cpu", plan_id: str | None = None,
             speed_batches: Sequence[int] | None = None, engine: str | None = None,
             base: str | None = None, speed_compile: bool = False) -> Evaluation:
    """Perplexity of a checkpoint (bitplan-quantized, any HF directory, GGUF, or the embedded name).

    A checkpoint bitplan wrote loads with its plan's kernels; any other is the workspace's model.
    On a GPU, also decode tokens/s and peak memory at each of `speed_batches` (default 1 and 16;
    `()` for none), beside the bf16 model of the same architecture (`executor.evaluate.speed_report`;
    `speed_compile`: both decode steps `torch.compile`d first).
    `engine="llamacpp"` (the default for a .gguf path) measures with `llama-perplexity` instead, and the
    KL divergence to the F16 GGUF of `base` (the model the file was quantized from; the plan's model).
    """
    if engine is None:
        engine = "llamacpp" if str(checkpoint).endswith(".gguf") else "bitplan"
    if engine not in ("bitplan", "llamacpp"):
        raise InvalidInput(f"evaluations are measured by bitplan or llamacpp, not {engine!r}")
    if engine == "llamacpp":
        return _eval_llamacpp(ws, checkpoint, text=text, tokens=tokens, window=window, plan_id=plan_id, base=base)
    if base is not None:
        raise InvalidInput("--base is for llama.cpp's KL divergence: evaluate with --engine llamacpp")
    import torch

    from bitplan.executor.apply import checkpoint_bytes
    from bitplan.executor.evaluate import perplexity, speed_report
    from bitplan.executor.load import checkpoint_plan_id, is_quantized, load_quantized

    t0 = time.perf_counter()
    on_gpu = device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise InvalidInput(f"--device {device}: this machine has no CUDA GPU; evaluate with --device cpu")
    if is_quantized(checkpoint):
        plan_id = plan_id or _stored_plan_id(ws, checkpoint_plan_id(checkpoint))
        # bf16 on the GPU, where the kernels run; float32 on the CPU reference path
        model, tokenizer, _ = load_quantized(checkpoint, dtype=torch.bfloat16 if on_gpu else torch.float32)
    else:
        loaded = ws.model(checkpoint)
        model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise InvalidInput(f"{checkpoint} has no tokenizer to read the evaluation text with")
    from bitplan.profiler.weights import streamed

    on_disk = streamed(model) is not None  # perplexity runs one block at a time; decoding needs the whole model
    windows = ws.windows(tokenizer, text, tokens, window)
    ppl = perplexity(model, windows.ids, device=device, progress=ws.progress)
    speed = None
    if on_gpu and on_disk:
        log.warning("no decode speed for %s: its weights stay on disk (decoding needs the whole model)", checkpoint)
    elif on_gpu and (speed_batches is None or speed_batches):
        log.info("decode speed at batch %s beside the bf16 model", ", ".join(map(str, speed_batches or (1, 16))))
        speed = speed_report(model, speed_batches or (1, 16), device=device, compile=speed_compile)
    path = Path(checkpoint)
    ev = Evaluation(plan_id=plan_id, checkpoint=str(path.resolve()) if path.exists() else checkpoint,
                    corpus=windows.corpus, n_tokens=int(windows.ids.numel()), window=int(windows.ids.shape[1]),
                    perplexity=ppl, bytes_on_disk=checkpoint_bytes(checkpoint),
                    device=device, seconds=time.perf_counter() - t0, speed=speed)
    return ws.store.save_evaluation(ev)


def _stored_plan_id(ws: Workspace, plan_id: str | None) -> str | None:
    """The checkpoint's plan id if this database knows the plan, else None (the evaluation is still kept)."""
    if plan_id is None:
        return None
    try:
        return ws.store.get_plan(plan_id).id
    except NotFound:
        log.warning("plan %s of this checkpoint is not in %s; storing the evaluation without it", plan_id,
                    ws.store.url)
        return None


class DemoRow(BaseModel):
    """One applied and evaluated plan of `bitplan demo` (or the unquantized model: no plan)."""

    budget: str
    allocator: str
    bits_per_weight: float
    size_mib: float
    predicted_error: float
    perplexity: float
    seconds: float
    plan_id: str | None = None
    evaluation_id: str | None = None
    status: str | None = None
    checkpoint: str | None = None


def _eval_llamacpp(ws: Workspace, checkpoint: str, *, text: str | None, tokens: int | None, window: int | None,
                   plan_id: str | None, base: str | None) -> Evaluation:
    """`llama-perplexity` of a GGUF file, in windows of `window` tokens, and its KL divergence to `base`."""
    from bitplan.executor.evaluate import EVAL_TOKENS
    from bitplan.executor.llamacpp import EVAL_CTX, perplexity
    from bitplan.kernels.llamacpp import check_tools
    from bitplan.profiler.calibration import EVAL

    path = Path(checkpoint).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise InvalidInput(f"llama.cpp evaluates a .gguf file; {checkpoint} is not one (evaluate it with "
                           f"--engine bitplan)")
    check_tools()
    from bitplan.profiler.model import check_gguf

    check_gguf(path)  # a damaged file is refused here, not by llama-perplexity's crash
    t0 = time.perf_counter()
    text, ctx = text or EVAL, window or EVAL_CTX
    chunks = max(1, (tokens or EVAL_TOKENS) // ctx)
    if plan_id is not None:
        plan = ws.store.get_plan(plan_id)
    else:  # a file `apply --format gguf` wrote names its plan; one of another store is left out
        from bitplan.executor.llamacpp import gguf_plan_id

        named = gguf_plan_id(path)
        try:
            plan = ws.store.get_plan(named) if named else None
        except NotFound:
            plan = None
    plan_id = plan.id if plan else None
    base = base or (plan.model.source if plan else None)
    if base is not None:
        logits, _ = ws.base_logits(base, text, ctx, chunks)
        measured = perplexity(path, ws.text_file(text), ctx=ctx, chunks=chunks, kl_base=logits)
    else:
        measured = perplexity(path, ws.text_file(text), ctx=ctx, chunks=chunks)
    ev = Evaluation(plan_id=plan_id, checkpoint=str(path.resolve()), corpus=text, n_tokens=measured.n_tokens,
                    window=ctx, perplexity=measured.perplexity, kl_divergence=measured.kl_divergence,
                    bytes_on_disk=path.stat().st_size, engine="llamacpp", seconds=time.perf_counter() - t0)
    return ws.store.save_evaluation(ev)


def run_demo(ws: Workspace, *, source: str = "smollm2-135m", budgets: Sequence[str] = DEMO_BUDGETS,
             allocators: Sequence[str] = ("ilp", "uniform"), profile_request: ProfileRequest = ProfileRequest(),
             eval_tokens: int | None = None, out_dir: str | Path = "runs") -> list[DemoRow]:
    """The main job: profile, plan every budget with every allocator, apply, reload, measure perplexity.

    Returns one row per (budget, allocator) plus the unquantized baseline, each with its stored ids.
    GPTQ runs once per (module, option) when the workspace keeps GPTQ results (`Workspace(keep_gptq=True)`).
    """
    for b in budgets:
        Budget.parse(b)
    for a in allocators:
        lookup_allocator(a)
    profile = run_profile(ws, source, profile_request)
    t0 = time.perf_counter()
    base = run_eval(ws, source, tokens=eval_tokens)
    rows = [DemoRow(budget="-", allocator="unquantized", bits_per_weight=16.0,
                    size_mib=(profile.n_params * 16 + profile.fixed_bits) / 8 / 2**20, predicted_error=0.0,
                    perplexity=base.perplexity, seconds=time.perf_counter() - t0, evaluation_id=base.id)]
    for budget in budgets:
        for allocator in allocators:
            t0 = time.perf_counter()
            plan = run_plan(ws, profile, PlanRequest(budget=budget, allocator=allocator))
            # GPTQ from the unquantized model's activations: the results profiling kept serve every plan,
            # where `quantized` inputs (apply's default) would cost a pass per plan (docs/recipes.md)
            out = run_apply(ws, plan, Path(out_dir) / plan.id, overwrite=True, gptq_inputs="original")
            ev = run_eval(ws, str(out), tokens=eval_tokens, plan_id=plan.id)
            rows.append(DemoRow(budget=budget, allocator=allocator, bits_per_weight=plan.bits_per_weight,
                                size_mib=plan.size_mib, predicted_error=plan.predicted_error,
                                perplexity=ev.perplexity, seconds=time.perf_counter() - t0, plan_id=plan.id,
                                evaluation_id=ev.id, status=plan.status, checkpoint=str(out)))
            log.info("%s %s: %.3f bpw, ppl %.2f", budget, allocator, plan.bits_per_weight, ev.perplexity)
    return rows
