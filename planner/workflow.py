"""profile -> plan -> apply -> evaluate, with everything stored: the calls the CLI and the service share.

Each step validates its input before any heavy work (a bad budget fails before a model loads) and
stores what it made.  Model code (torch, transformers) is imported inside the steps that need it, so
planning a stored profile works on a machine without torch.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bitplan.db.store import Store, profile_id
from bitplan.db.types import (Budget, Evaluation, InfeasibleBudget, InvalidInput, NotFound, Plan, Profile,
                               parse_options)
from bitplan.planner.allocators import needs_context
from bitplan.planner.plan import allocate, lookup_allocator, unit_of

log = logging.getLogger(__name__)

DEFAULT_BUDGET = "3.5bpw"
DEFAULT_ALLOCATOR = "ilp"
DEFAULT_GRANULARITY = "module"
EVAL_TOKENS = 8192
EVAL_WINDOW = 512


def run_profile(store: Store, source: str, *, options: str = "2,3,4,8", group_size: int | None = 64,
                estimator: str | None = None, quantizer: str | None = None, calib: str | None = None,
                tokens: int | None = None, seq_len: int | None = None, device: str | None = None,
                force: bool = False, loaded=None, progress: bool = True, latency: str | None = None,
                latency_batches: str | Sequence[int] | None = None, resume: bool = False,
                imatrix: str | None = None, cache=None, embeddings: str | None = None) -> Profile:
    """Profile `source` (or reuse the stored profile of the same model, text and settings).

    What is finished is kept in `profile_work_dir` until the profile is stored; `resume` continues
    from there (profiler/profile.py `error_table` says what each estimator resumes), otherwise an
    earlier run's unfinished work is discarded.

    `quantizer` (`rtn`, `gptq`; default `profiler.profile.DEFAULT_QUANTIZER`) is where each option's ΔW
    comes from; `apply` uses the same one for plans of this profile.  `cache` (an
    `executor.quantize.GPTQCache`) keeps the profile's GPTQ results for `run_apply` in this process.

    `imatrix`: a llama.cpp importance matrix for `estimator="imatrix"` (implied when no estimator is
    given); its content hash is part of the profile's estimator name and id.

    `latency` (`roofline:GPU` or `measured`) also fills the latency table at `latency_batches`
    (default 1,16,256): the result is the error profile with that table, stored under its own id.

    `embeddings` (`plan` or `keep`; default `profiler.profile.DEFAULT_EMBEDDINGS`, `keep` with an imatrix):
    whether the input embedding (and a head tied to it) is a planned module or stays at 16 bits in
    `fixed_bits`.
    """
    from bitplan.profiler import profile as prof
    from bitplan.profiler.calibration import CALIB, token_batches
    from bitplan.profiler.model import check_causal_lm, load_model

    if latency:
        from bitplan.profiler.latency import DEFAULT_BATCHES, parse_batches, parse_spec
        parse_spec(latency)  # a bad spec or batch list fails before a model loads
        batches = parse_batches(latency_batches or DEFAULT_BATCHES)
        if loaded is None:
            check_causal_lm(source)
            loaded = load_model(source)
        base = run_profile(store, source, options=options, group_size=group_size, estimator=estimator,
                           quantizer=quantizer, calib=calib, tokens=tokens, seq_len=seq_len, device=device,
                           force=force, loaded=loaded, progress=progress, resume=resume, imatrix=imatrix,
                           embeddings=embeddings)
        return add_latency(store, base, latency, batches, force=force)

    opts = parse_options(options, group_size)
    if imatrix and estimator not in (None, "imatrix"):
        raise InvalidInput(f"--imatrix is read by --estimator imatrix only, not {estimator}")
    estimator = estimator or ("imatrix" if imatrix else prof.DEFAULT_ESTIMATOR)
    quantizer = quantizer or prof.DEFAULT_QUANTIZER
    name = prof.estimator_name(estimator, quantizer, imatrix)  # a missing imatrix fails before the model loads
    embeddings = prof.check_embeddings(embeddings, estimator)
    calib, tokens = calib or CALIB, tokens or prof.DEFAULT_TOKENS
    seq_len, device = seq_len or prof.DEFAULT_SEQ_LEN, device or prof.default_device()
    if loaded is None:
        check_causal_lm(source)
        loaded = load_model(source)
    _, calib_ref = token_batches(loaded.tokenizer, calib, tokens, seq_len)
    pid = prof.profile_id(loaded, calib_ref.fingerprint, name, opts, seq_len, device, embeddings)
    if cache is not None:
        cache.claim(pid)
    if not force:
        try:
            stored = store.get_profile(pid)
            log.info("reusing stored profile %s", pid)
            return stored
        except NotFound:
            pass
    work = profile_work_dir(store, pid)
    if work.exists():
        if resume:
            log.info("resuming %s from %s", pid, work)
        else:
            log.info("discarding the unfinished work in %s (--resume continues it)", work)
            shutil.rmtree(work)
    profile = prof.profile_model(loaded, opts, estimator=estimator, quantizer=quantizer, calib=calib, n_tokens=tokens,
                                 seq_len=seq_len, device=device, progress=progress, work_dir=work, imatrix=imatrix,
                                 cache=cache, embeddings=embeddings)
    saved = store.save_profile(profile)
    shutil.rmtree(work, ignore_errors=True)
    return saved


def profile_work_dir(store: Store, pid: str) -> Path:
    """Where an unfinished profile keeps its finished blocks: `<db file>.work/<id>` beside a SQLite file,
    else under the user data dir (keyed by the profile id, which names everything the work depends on)."""
    url = store.engine.url
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        db = Path(url.database)
        return db.with_name(db.name + ".work") / pid
    import platformdirs
    return Path(platformdirs.user_data_dir("bitplan")) / "work" / pid


def run_validate(source: str, *, options: str = "2,3,4,8", group_size: int | None = 64, quantizer: str | None = None,
                 calib: str | None = None, tokens: int | None = None, seq_len: int | None = None,
                 device: str | None = None, layers: Sequence[int] | None = None, progress: bool = True,
                 estimators: Sequence[str] = ("hessian", "fisher"), imatrix: str | None = None) -> dict:
    """`bitplan profile --validate`: each cheap estimator's Spearman ρ against measured single-module KL.

    `estimators` may include `imatrix` (then read from `imatrix`) and `hutchinson`.
    JSON-ready: the tables are left out, the module names and figures stay.
    """
    from bitplan.profiler.model import check_causal_lm, load_model
    from bitplan.profiler.kl import DEFAULT_KL_TOKENS
    from bitplan.profiler.profile import (DEFAULT_QUANTIZER, DEFAULT_SEQ_LEN, DEFAULT_TOKENS, ESTIMATOR_NAMES,
                                          default_device, estimator_name)
    from bitplan.profiler.validate import validate

    quantizer = quantizer or DEFAULT_QUANTIZER
    for e in estimators:  # an unknown name or a missing imatrix fails before the model loads
        if e not in ESTIMATOR_NAMES:
            raise InvalidInput(f"unknown estimator {e!r} to validate; choose from {sorted(ESTIMATOR_NAMES)}")
        estimator_name(e, quantizer, imatrix)
    check_causal_lm(source)
    loaded = load_model(source)
    kw = {"calib": calib} if calib else {}
    tokens = tokens or DEFAULT_TOKENS
    result = validate(loaded, parse_options(options, group_size), quantizer=quantizer, n_tokens=tokens,
                      kl_tokens=min(DEFAULT_KL_TOKENS, tokens), seq_len=seq_len or DEFAULT_SEQ_LEN, layers=layers,
                      device=device or default_device(), progress=progress, estimators=tuple(estimators),
                      imatrix=imatrix, **kw)
    result.pop("tables")
    result["n_modules"] = len(result["modules"])
    return result


def add_latency(store: Store, profile: Profile, spec: str, batches: Sequence[int], *,
                force: bool = False) -> Profile:
    """`profile` with the latency table `spec` names, stored (a roofline one already stored is reused)."""
    from bitplan.profiler.latency import latency_profile_id, latency_table, parse_spec, with_latency

    device = parse_spec(spec)
    if device is not None and not force:
        try:
            return store.get_profile(latency_profile_id(profile.id, device.source, batches))
        except NotFound:
            pass
    table = latency_table(spec, profile.modules, profile.options, batches)
    return store.save_profile(with_latency(profile, table))


def read_profile_file(path: str | Path) -> Profile:
    """A `bitplan.profile/1` JSON file (README), validated."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidInput(f"no such profile file: {path}")
    return Profile.from_json(p.read_text(encoding="utf-8"))


def run_plan(store: Store, profile: Profile | str, budget: str = DEFAULT_BUDGET,
             allocator: str = DEFAULT_ALLOCATOR, *, pins: list[str] | tuple = (), seed: int = 0,
             time_limit: float | None = None, granularity: str = DEFAULT_GRANULARITY,
             latency_budget: str | None = None, objective: str | None = None, params: dict | None = None,
             search_state: str | Path | None = None, loaded=None, progress: bool = True,
             engine: str = "bitplan", budget_split: str = "model") -> Plan:
    """Plan a stored profile (by id) or a profile object for `budget` (and `latency_budget`, `objective`:
    planner/latency.py); store the profile and the plan.  `budget_split="block"`: the same bits per
    weight in every decoder block (planner/blocks.py).

    An allocator that measures the model (`evolutionary`) gets it from `loaded`, or loads the profile's
    model source, with fitness text from the profile's calibration text (`model_context`);
    `search_state` is where its resumable state goes."""
    from bitplan.planner.latency import LatencyBudget, Objective

    Budget.parse(budget)  # a bad budget fails before anything is read
    if latency_budget:
        LatencyBudget.parse(latency_budget)
    Objective.parse(objective)
    profile = _with_id(store, profile)
    context = None
    if needs_context(allocator):
        context = model_context(profile, loaded=loaded, state_path=search_state, progress=progress)
    try:
        plan = allocate(profile, budget, allocator, pins=list(pins), seed=seed, time_limit=time_limit,
                        granularity=granularity, latency_budget=latency_budget or None, objective=objective,
                        params=params, context=context, engine=engine, budget_split=budget_split)
    finally:
        if context is not None:
            context.oracle.close()  # the loaded model gets its own weights back
    store.save_profile(profile)
    return store.save_plan(plan)


def model_context(profile: Profile, *, loaded=None, state_path: str | Path | None = None, progress: bool = True):
    """The evolutionary allocator's SearchContext: a KL oracle on the profile's model and calibration text."""
    from bitplan.planner.allocators.evolutionary import SearchContext
    from bitplan.profiler.fitness import kl_fitness_for_profile

    return SearchContext(kl_fitness_for_profile(loaded or profile_model(profile), profile), state_path=state_path,
                         progress=progress)


def profile_model(profile: Profile, purpose: str = "the evolutionary allocator"):
    """The profiled model, loaded from the source the profile records, for `purpose`, which measures it."""
    from bitplan.profiler.model import check_causal_lm, load_model

    if not profile.model.source:
        raise InvalidInput(f"profile {profile.id} records no model source; {purpose} needs the model: use a "
                           f"profile made by `bitplan profile`")
    check_causal_lm(profile.model.source)
    return load_model(profile.model.source)


def _with_id(store: Store, profile: Profile | str) -> Profile:
    """A stored profile by id, or the object itself; a profile file without an id gets its content id."""
    if isinstance(profile, str):
        return store.get_profile(profile)
    if not profile.id:  # so that its plans can refer to it
        return profile.model_copy(update={"id": profile_id(profile)})
    return profile


def parse_budgets(spec: str | Sequence[str]) -> list[str]:
    """`"2.5:4.5:0.25"` (a bpw range, both ends included) or `"3bpw,3.5bpw,900MiB"`, or a mix -> budgets."""
    items = [x.strip() for x in spec.split(",")] if isinstance(spec, str) else [str(x).strip() for x in spec]
    budgets = []
    for item in filter(None, items):
        if ":" not in item:
            budgets.append(str(Budget.parse(item)))
            continue
        try:
            start, stop, step = (float(x) for x in item.split(":"))
        except ValueError as e:
            raise InvalidInput(f"bad budget range {item!r}: write START:STOP:STEP in bits per weight, "
                               "e.g. 2.5:4.5:0.25") from e
        if step <= 0 or stop < start or start <= 0:
            raise InvalidInput(f"bad budget range {item!r}: need 0 < START <= STOP and STEP > 0")
        n = math.floor((stop - start) / step + 1e-9) + 1  # the tolerance keeps STOP when it is on the grid
        budgets += [str(Budget.parse(f"{round(start + i * step, 10):g}bpw")) for i in range(n)]
    if not budgets:
        raise InvalidInput("no budgets given: write e.g. 2.5:4.5:0.25 or 3bpw,3.5bpw,900MiB")
    return list(dict.fromkeys(budgets))  # each budget once, in the order given


COMPARE_EVAL_TOKENS = 2048  # base log-probs of all of them are held at once (2,048 x 49,152 floats: 400 MB)


def run_compare(store: Store, profile: Profile | str, budgets: str | Sequence[str],
                allocators: Sequence[str] = ("ilp", "closed_form", "greedy", "uniform"), *,
                pins: list[str] | tuple = (), seed: int = 0, time_limit: float | None = None,
                granularity: str = DEFAULT_GRANULARITY, engine: str = "bitplan", evaluate: bool = False,
                eval_tokens: int = COMPARE_EVAL_TOKENS, loaded=None, progress: bool = True,
                params: dict | None = None) -> list[dict]:
    """Solve every (budget, allocator) pair on one profile and store every plan; one row per pair.

    `evaluate` also measures each plan on the profile's model, in memory: held-out perplexity and mean
    per-token KL(base ‖ plan) on `eval_tokens` of the evaluation text (`executor.evaluate.evaluate_plans`).
    An allocator that measures the model (`evolutionary`, with `params` such as generations) shares one
    loaded model and one fitness oracle over all budgets, and the evaluation reuses that model.

    An infeasible pair keeps its row, with the message under `error` and no plan; any other bad input
    (an unknown allocator or granularity, a bad budget or pin) fails before anything is solved.
    """
    budgets = parse_budgets(budgets)
    if not allocators:
        raise InvalidInput("no allocators given")
    for a in allocators:
        lookup_allocator(a)
    measuring = any(needs_context(a) for a in allocators)
    if params and not measuring:
        raise InvalidInput(f"search parameters {sorted(params)} are for the evolutionary allocator, which is not "
                           f"among {list(allocators)}")
    profile = _with_id(store, profile)
    unit_of(profile.modules, granularity, engine)  # an unknown granularity or engine fails here, before any solve
    store.save_profile(profile)
    context = None
    if measuring:
        loaded = loaded or profile_model(profile)
        context = model_context(profile, loaded=loaded, progress=progress)
    rows = []
    try:
        for budget in budgets:
            for allocator in allocators:
                row = {"budget": budget, "allocator": allocator, "granularity": granularity, "plan_id": None,
                       "predicted_error": None, "bits_per_weight": None, "size_mib": None, "solve_seconds": None,
                       "status": None, "error": None}
                measures = needs_context(allocator)
                try:
                    plan = store.save_plan(allocate(profile, budget, allocator, pins=list(pins), seed=seed,
                                                    time_limit=time_limit, granularity=granularity, engine=engine,
                                                    params=params if measures else None,
                                                    context=context if measures else None))
                except InfeasibleBudget as e:
                    row.update(status="infeasible", error=str(e))
                else:
                    row.update(plan_id=plan.id, predicted_error=plan.predicted_error,
                               bits_per_weight=plan.bits_per_weight, size_mib=plan.size_mib,
                               solve_seconds=plan.solve_seconds, status=plan.status)
                rows.append(row)
    finally:
        if context is not None:
            context.oracle.close()  # the loaded model gets its own weights back
    if evaluate:
        _evaluate_rows(store, profile, rows, eval_tokens, loaded, progress)
    return rows


def _evaluate_rows(store: Store, profile: Profile, rows: list[dict], tokens: int, loaded, progress: bool) -> None:
    from bitplan.executor.evaluate import evaluate_plans
    from bitplan.executor.quantize import GPTQCache
    from bitplan.profiler import profile as prof
    from bitplan.profiler.model import planned_for

    done = [r for r in rows if r["plan_id"]]
    if not done:
        return
    loaded = loaded or profile_model(profile, "evaluating plans")
    planned = planned_for(loaded.model, {m.name for m in profile.modules})
    plans = [store.get_plan(r["plan_id"]) for r in done]
    quantizer, hessians = plan_quantizer(store, plans[0]), None
    if quantizer == "gptq":
        hessians = prof.gptq_hessians(loaded, profile, planned, progress=progress)
    windows = eval_windows(loaded.tokenizer, tokens=tokens, window=min(EVAL_WINDOW, tokens))
    measured = evaluate_plans(loaded.model, planned, [p.assignment for p in plans], windows.ids, quantizer=quantizer,
                              hessians=hessians, progress=progress, cache=GPTQCache().claim(profile.id))
    for row, m in zip(done, measured):
        row.update(m)


def write_json(obj: dict, path: str | Path) -> Path:
    """Write JSON atomically (temporary file, then rename)."""
    p = Path(path).expanduser()
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p


def run_apply(store: Store, plan: Plan | str, out: str | Path, *, overwrite: bool = False, loaded=None,
              progress: bool = True, fmt: str = "bitplan", cache=None) -> Path:
    """Write the quantized checkpoint of a stored plan, in our format or another engine's (`fmt`:
    executor/export.py).

    `cache` (an `executor.quantize.GPTQCache` of the plan's profile): GPTQ results it holds are not
    computed again, and the `H` collected for those it lacks is kept in it for the next plan.
    """
    from bitplan.executor.apply import missing_hessians
    from bitplan.executor.export import check_format, export_llamacpp, export_plan
    from bitplan.profiler import profile as prof
    from bitplan.profiler.model import check_causal_lm, load_model, planned_for

    check_format(fmt)
    if isinstance(plan, str):
        plan = store.get_plan(plan)
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise InvalidInput(f"{out} exists; choose another --out or pass --overwrite")
    if fmt == "llamacpp" and loaded is None:
        # a text file of tensor types: the profile's module names and shapes suffice, no weights needed
        modules = _profile_modules(store, plan)
        if modules is not None:
            return export_llamacpp(plan, modules, out, overwrite=overwrite)
    if loaded is None:
        check_causal_lm(plan.model.source)
        loaded = load_model(plan.model.source)
    planned = planned_for(loaded.model, plan.assignment)
    quantizer = plan_quantizer(store, plan)
    hessians = None
    if cache is not None:
        hessians = cache.claim(plan.profile_id).hessians
    if missing_hessians(planned, plan, quantizer, hessians, cache):
        hessians = prof.gptq_hessians(loaded, store.get_profile(plan.profile_id), planned, progress=progress)
        if cache is not None:
            cache.hessians = hessians
    return export_plan(plan, loaded.model, loaded.tokenizer, planned, out, fmt, overwrite=overwrite,
                       progress=progress, quantizer=quantizer, hessians=hessians, cache=cache)


def _profile_modules(store: Store, plan: Plan) -> list | None:
    """The planned modules as the plan's stored profile names them, or None when this store lacks it."""
    try:
        modules = store.get_profile(plan.profile_id).modules
    except NotFound:
        return None
    if {m.name for m in modules} != set(plan.assignment):
        raise InvalidInput(f"plan {plan.id} does not assign exactly the modules of its profile {plan.profile_id}")
    return list(modules)


def plan_quantizer(store: Store, plan: Plan) -> str:
    """The quantizer the plan's profile measured ΔW with (`rtn` when the profile is not in this store)."""
    from bitplan.profiler.profile import parse_estimator_name

    try:
        return parse_estimator_name(store.get_profile(plan.profile_id).estimator)[1]
    except NotFound:
        log.warning("profile %s of plan %s is not in %s: applying with rtn", plan.profile_id, plan.id, store.url)
        return "rtn"


@dataclass
class Windows:
    """Held-out evaluation text, tokenized once and reused for every model compared."""

    ids: object  # torch.Tensor [n, window]
    corpus: str


def eval_windows(tokenizer, text: str | None = None, tokens: int = EVAL_TOKENS, window: int = EVAL_WINDOW) -> Windows:
    from bitplan.profiler.calibration import EVAL, token_batches

    ids, ref = token_batches(tokenizer, text or EVAL, tokens, window)
    return Windows(ids, ref.name)


def run_eval(store: Store, checkpoint: str, *, text: str | None = None, tokens: int = EVAL_TOKENS,
             window: int = EVAL_WINDOW, device: str = "cpu", plan_id: str | None = None, model=None,
             tokenizer=None, windows: Windows | None = None, speed_batches: Sequence[int] | None = None,
             progress: bool = True) -> Evaluation:
    """Perplexity of a checkpoint (bitplan-quantized, any HF directory, GGUF, or the embedded name).

    On a GPU, also decode tokens/s and peak memory at each of `speed_batches` (default 1 and 16;
    `()` for none), beside the bf16 model of the same architecture (`executor.evaluate.speed_report`).
    """
    import torch

    from bitplan.executor.apply import checkpoint_bytes
    from bitplan.executor.evaluate import perplexity, speed_report
    from bitplan.executor.load import checkpoint_plan_id, is_quantized, load_quantized
    from bitplan.profiler.model import check_causal_lm, load_model

    t0 = time.perf_counter()
    on_gpu = device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise InvalidInput(f"--device {device}: this machine has no CUDA GPU; evaluate with --device cpu")
    if model is None:
        if is_quantized(checkpoint):
            plan_id = plan_id or _stored_plan_id(store, checkpoint_plan_id(checkpoint))
            # bf16 on the GPU, where the kernels run; float32 on the CPU reference path
            model, tokenizer, _ = load_quantized(checkpoint, dtype=torch.bfloat16 if on_gpu else torch.float32)
        else:
            check_causal_lm(checkpoint)
            loaded = load_model(checkpoint)
            model, tokenizer = loaded.model, loaded.tokenizer
    if windows is None:
        if tokenizer is None:
            raise InvalidInput(f"{checkpoint} has no tokenizer to read the evaluation text with")
        windows = eval_windows(tokenizer, text, tokens, window)
    ppl = perplexity(model, windows.ids, device=device, progress=progress)
    speed = None
    if on_gpu and (speed_batches is None or speed_batches):
        log.info("decode speed at batch %s beside the bf16 model", ", ".join(map(str, speed_batches or (1, 16))))
        speed = speed_report(model, speed_batches or (1, 16), device=device)
    path = Path(checkpoint)
    ev = Evaluation(plan_id=plan_id, checkpoint=str(path.resolve()) if path.exists() else checkpoint,
                    corpus=windows.corpus, n_tokens=int(windows.ids.numel()), window=int(windows.ids.shape[1]),
                    perplexity=ppl, bytes_on_disk=checkpoint_bytes(checkpoint),
                    device=device, seconds=time.perf_counter() - t0, speed=speed)
    return store.save_evaluation(ev)


def _stored_plan_id(store: Store, plan_id: str | None) -> str | None:
    """The checkpoint's plan id if this database knows the plan, else None (the evaluation is still kept)."""
    if plan_id is None:
        return None
    try:
        return store.get_plan(plan_id).id
    except NotFound:
        log.warning("plan %s of this checkpoint is not in %s; storing the evaluation without it", plan_id, store.url)
        return None


def run_demo(store: Store, *, source: str = "smollm2-135m", budgets: list[str] = ("3.0bpw", "3.5bpw", "4.0bpw"),
             allocators: list[str] = ("ilp", "uniform"), estimator: str | None = None, quantizer: str | None = None,
             tokens: int | None = None, eval_tokens: int = EVAL_TOKENS, out_dir: str | Path = "runs",
             progress: bool = True, imatrix: str | None = None, embeddings: str | None = None) -> list[dict]:
    """The main job: profile, plan every budget with every allocator, apply, reload, measure perplexity.

    Returns one row per (budget, allocator) plus the unquantized baseline, each with its stored ids.
    GPTQ runs once per (module, option): the profile's results are kept for the applies (`GPTQCache`).
    """
    from bitplan.executor.load import load_quantized
    from bitplan.executor.quantize import GPTQCache
    from bitplan.profiler.model import check_causal_lm, load_model

    for b in budgets:
        Budget.parse(b)
    check_causal_lm(source)
    t0 = time.perf_counter()
    loaded = load_model(source)
    log.info("loaded %s in %.0f s", source, time.perf_counter() - t0)
    t0 = time.perf_counter()
    cache = GPTQCache()
    profile = run_profile(store, source, estimator=estimator, quantizer=quantizer, tokens=tokens, loaded=loaded,
                          progress=progress, imatrix=imatrix, cache=cache, embeddings=embeddings)
    log.info("profile %s (%s) in %.0f s", profile.id, profile.estimator, time.perf_counter() - t0)
    windows = eval_windows(loaded.tokenizer, tokens=eval_tokens)
    t0 = time.perf_counter()
    base = run_eval(store, source, model=loaded.model, windows=windows, progress=progress)
    rows = [{"budget": "-", "allocator": "unquantized", "bits_per_weight": 16.0,
             "size_mib": (profile.n_params * 16 + profile.fixed_bits) / 8 / 2**20, "predicted_error": 0.0,
             "perplexity": base.perplexity, "seconds": time.perf_counter() - t0, "plan_id": None,
             "evaluation_id": base.id}]
    for budget in budgets:
        for allocator in allocators:
            t0 = time.perf_counter()
            plan = run_plan(store, profile, budget, allocator)
            out = run_apply(store, plan, Path(out_dir) / plan.id, overwrite=True, loaded=loaded, progress=progress,
                            cache=cache)
            model, _, _ = load_quantized(out)
            ev = run_eval(store, str(out), model=model, windows=windows, plan_id=plan.id, progress=progress)
            rows.append({"budget": budget, "allocator": allocator, "bits_per_weight": plan.bits_per_weight,
                         "size_mib": plan.size_mib, "predicted_error": plan.predicted_error,
                         "perplexity": ev.perplexity, "seconds": time.perf_counter() - t0, "plan_id": plan.id,
                         "evaluation_id": ev.id, "status": plan.status, "checkpoint": str(out)})
            log.info("%s %s: %.3f bpw, ppl %.2f", budget, allocator, plan.bits_per_weight, ev.perplexity)
    return rows
