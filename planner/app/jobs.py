"""Jobs: long work (profile, apply, eval, compare, a searched plan) asked for over HTTP, run by a worker.

A job is a row of the database (`db/tables.py` `JobRow`): the service validates its params with the
same typed requests the CLI builds (`ProfileRequest`, `PlanRequest`; unknown fields are refused), checks
every path in them against the allowed roots, and queues it; a worker (`planner/app/worker.py`) claims
it and runs the same use case the CLI runs (`planner/app/usecases.py`).

Allowed roots (`BITPLAN_ROOTS`, paths separated by `os.pathsep`; default: the data directory): every
path a request names (a model, a text, an output, a profile file, an importance matrix) must resolve,
symlinks followed, inside one of them, or the request is refused with `PathNotAllowed` (403).  A path
is handed on as the real path it resolved to, so a symlink changed after the check does not lead the
job elsewhere.  A relative path is taken relative to the first root, never to the server's working
directory.  The model a stored plan or profile was measured on is checked as well, when a job would
load it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from bitplan.db.files import WRITTEN_MARK, read_profile_file
from bitplan.db.formats import CALIB_TEXT, EMBEDDED_MODELS, EVAL_TEXT, EXPORT_FORMATS
from bitplan.db.store import Store
from bitplan.db.types import (DEFAULT_GPTQ_INPUTS, DEFAULT_GROUP_SIZES, DEFAULT_OPTIONS, GPTQ_INPUTS, InvalidInput,
                              PathNotAllowed, Profile, Quantizer, parse_options)
from bitplan.planner.app.usecases import COMPARE_EVAL_TOKENS, IMATRIX_FROM_CALIBRATION, ProfileRequest
from bitplan.planner.request import PlanRequest

log = logging.getLogger(__name__)

ROOTS_ENV = "BITPLAN_ROOTS"
EMBEDDED = tuple(EMBEDDED_MODELS)
BUILTIN_TEXTS = (CALIB_TEXT, EVAL_TEXT)


# ------------------------------------------------------------------------------------------ roots


def allowed_roots(spec: str | None = None) -> tuple[Path, ...]:
    """The folders requests may name paths in: `spec` or `$BITPLAN_ROOTS` (separated by `os.pathsep`),
    else the user data directory; each resolved, symlinks followed."""
    spec = os.environ.get(ROOTS_ENV, "") if spec is None else spec
    roots = [r for r in spec.split(os.pathsep) if r.strip()]
    if not roots:
        import platformdirs

        roots = [platformdirs.user_data_dir("bitplan")]
    return tuple(Path(r).expanduser().resolve() for r in roots)


def inside_roots(value: str, what: str, roots: tuple[Path, ...], *, names: tuple[str, ...] = (),
                 pattern: bool = False) -> str:
    """`value` as the real path it resolves to, when that lies inside one of `roots`; `names` (an embedded
    model, a built-in text) pass as they are.  With `pattern`, `value` may be a glob: its fixed part and
    every file it matches now must lie inside.  PathNotAllowed names the field, never a server path."""
    if value in names:
        return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = roots[0] / path
    if pattern and glob.has_magic(str(path)):
        fixed = Path(*[p for p in _until_magic(path.parts)])
        for p in [fixed, *map(Path, glob.glob(str(path), recursive=True))]:
            _check_inside(p.resolve(), what, value, roots)
        return str(fixed.resolve() / path.relative_to(fixed))
    real = path.resolve()
    _check_inside(real, what, value, roots)
    return str(real)


def _until_magic(parts: tuple[str, ...]) -> list[str]:
    out = []
    for p in parts:
        if glob.has_magic(p):
            break
        out.append(p)
    return out


def _check_inside(real: Path, what: str, given: str, roots: tuple[Path, ...]) -> None:
    if not any(real.is_relative_to(r) for r in roots):
        shown = given if len(given) <= 60 else given[:57] + "..."
        raise PathNotAllowed(f"{what} {shown!r} is outside the folders this service may read and write "
                             f"(BITPLAN_ROOTS): put it under one of them")


# ----------------------------------------------------------------------------------- job requests


class ProfileJob(ProfileRequest):
    """`bitplan profile MODEL ...` as a job: the request of the CLI plus its model and `--force`."""

    model: str = Field(description="a checkpoint folder or .gguf file inside the roots, or smollm2-135m")
    force: bool = False


class _ProfileSource(BaseModel):
    profile: str | None = Field(None, description="a stored profile id")
    profile_file: str | None = Field(None, description="a profile file inside the roots")


class PlanJob(PlanRequest, _ProfileSource):
    """`bitplan plan` as a job (the way to run the evolutionary search): a profile, and the plan request."""


class CompareJob(PlanRequest, _ProfileSource):
    """`bitplan compare` as a job: every budget with every allocator, `evaluate` to measure each plan."""

    budgets: str = Field(description="a bpw range 2.5:4.5:0.25, or a list 3bpw,900MiB")
    allocators: str = "ilp,closed_form,greedy,uniform"
    evaluate: bool = False
    eval_tokens: PositiveInt = COMPARE_EVAL_TOKENS


class ApplyJob(BaseModel):
    """`bitplan apply PLAN --out DIR` as a job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plan: str = Field(description="a stored plan id")
    out: str = Field(description="the output folder (a file for gguf), inside the roots")
    overwrite: bool = False
    format: Literal[EXPORT_FORMATS] = "bitplan"  # type: ignore[valid-type]
    gptq_inputs: Literal[GPTQ_INPUTS] = DEFAULT_GPTQ_INPUTS  # type: ignore[valid-type]


class EvalJob(BaseModel):
    """`bitplan eval CHECKPOINT` as a job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str = Field(description="a checkpoint folder or .gguf inside the roots, or smollm2-135m")
    text: str | None = None
    tokens: PositiveInt | None = None
    window: PositiveInt | None = None
    device: str = "cpu"
    plan_id: str | None = None
    engine: Literal["bitplan", "llamacpp"] | None = None
    base: str | None = None


JOB_PARAMS: dict[str, type[BaseModel]] = {"profile": ProfileJob, "plan": PlanJob, "compare": CompareJob,
                                          "apply": ApplyJob, "eval": EvalJob}


def _body(kind: str, params: type[BaseModel]) -> type[BaseModel]:
    return type(f"{params.__name__}Body", (BaseModel,), {
        "__annotations__": {"kind": Literal[kind], "params": params},  # type: ignore[valid-type]
        "model_config": ConfigDict(extra="forbid"),
        "__doc__": f"`POST /v1/jobs` for a {kind} job."})


# the body of `POST /v1/jobs`: `kind` says which params model validates `params` (422 naming the field)
JobBody = Annotated[Union[tuple(_body(k, p) for k, p in JOB_PARAMS.items())], Field(discriminator="kind")]


def checked_params(store: Store, kind: str, params: BaseModel, roots: tuple[Path, ...]) -> BaseModel:
    """`params` with every path resolved inside `roots`, after the checks that need no model (options,
    budgets, allocators, the stored plan or profile named): a job that would fail at once is not queued."""
    update: dict[str, Any] = {}
    if kind == "profile":
        p: ProfileJob = params  # type: ignore[assignment]
        update["model"] = inside_roots(p.model, "model", roots, names=EMBEDDED)
        if p.calib:
            update["calib"] = inside_roots(p.calib, "calib", roots, names=BUILTIN_TEXTS, pattern=True)
        if p.imatrix and p.imatrix != IMATRIX_FROM_CALIBRATION:
            update["imatrix"] = inside_roots(p.imatrix, "imatrix", roots)
        if p.engine != "llamacpp":  # llama.cpp's options are checked with its tools, by the worker
            parse_options(p.options or DEFAULT_OPTIONS, p.group_sizes or DEFAULT_GROUP_SIZES)
            if p.quantizer:
                Quantizer.parse(p.quantizer)
    elif kind in ("plan", "compare"):
        p = params  # type: ignore[assignment]
        if bool(p.profile) == bool(p.profile_file):
            raise InvalidInput("give profile (a stored id) or profile_file (one of them)")
        if p.profile_file:
            update["profile_file"] = inside_roots(p.profile_file, "profile_file", roots)
            profile = read_profile_file(update["profile_file"])
        else:
            profile = store.get_profile(p.profile)
        if kind == "plan":
            PlanRequest(**_plan_fields(p)).checked()
        else:
            _compare_checks(p)
        _check_source(profile, roots)
    elif kind == "apply":
        p = params  # type: ignore[assignment]
        plan = store.get_plan(p.plan)
        update["out"] = inside_roots(p.out, "out", roots)
        if plan.model.source:
            inside_roots(plan.model.source, f"the model of plan {plan.id}", roots, names=EMBEDDED)
    elif kind == "eval":
        p = params  # type: ignore[assignment]
        update["checkpoint"] = inside_roots(p.checkpoint, "checkpoint", roots, names=EMBEDDED)
        if p.text:
            update["text"] = inside_roots(p.text, "text", roots, names=BUILTIN_TEXTS, pattern=True)
        if p.base:
            update["base"] = inside_roots(p.base, "base", roots, names=EMBEDDED)
        if p.plan_id:
            store.get_plan(p.plan_id)
    return params.model_copy(update=update)


def _check_source(profile: Profile, roots: tuple[Path, ...]) -> None:
    # a profile file may name any model: the search and evaluations would load it
    if profile.model.source:
        inside_roots(profile.model.source, f"the model of profile {profile.id or 'in the file'}", roots,
                     names=EMBEDDED)


def _plan_fields(p: BaseModel) -> dict:
    return {k: getattr(p, k) for k in PlanRequest.model_fields}


def _compare_checks(p: CompareJob) -> None:
    from bitplan.planner.allocators import lookup_allocator
    from bitplan.planner.budgets import parse_budgets

    parse_budgets(p.budgets)
    for a in _csv(p.allocators):
        lookup_allocator(a)
    PlanRequest(**{**_plan_fields(p), "params": {}}).checked()


def submit(store: Store, kind: str, params: BaseModel, roots: tuple[Path, ...], *,
           max_queued: int | None = None) -> dict:
    """Queue a job of `kind` with its validated `params` (paths checked against `roots`); the job row."""
    params = checked_params(store, kind, params, roots)
    return store.create_job_checked(kind, params.model_dump(mode="json"), max_queued=max_queued)


# ------------------------------------------------------------------------------------------ running


def run_job(ws, job: dict) -> tuple[str | None, dict | None]:
    """Run `job` (a row of `Store.get_job`) with the use case its kind names: `(result_id, result)`.

    A job claimed before (`attempts > 1`: its worker died) resumes where that can be done: a profile
    from its finished blocks, a search from its state file, an apply whose checkpoint was in place
    before the worker died is taken as done; anything else runs again (all of them are idempotent)."""
    from bitplan.planner.app import usecases as uc

    kind, resumed = job["kind"], job["attempts"] > 1
    p = JOB_PARAMS[kind].model_validate(job["params"])
    if kind == "profile":
        request = ProfileRequest(**{k: getattr(p, k) for k in ProfileRequest.model_fields})
        return uc.run_profile(ws, p.model, request, force=p.force and not resumed, resume=resumed).id, None
    if kind == "plan":
        from bitplan.planner.allocators import needs_context

        state = ws.store.work_dir(job["id"]) / "search.json" if needs_context(p.allocator) else None
        plan = uc.run_plan(ws, _profile_of(ws, p), PlanRequest(**_plan_fields(p)), search_state=state)
        if state is not None:
            import shutil

            shutil.rmtree(state.parent, ignore_errors=True)
        return plan.id, None
    if kind == "compare":
        rows = uc.run_compare(ws, _profile_of(ws, p), p.budgets, _csv(p.allocators), PlanRequest(**_plan_fields(p)),
                              evaluate=p.evaluate, eval_tokens=p.eval_tokens)
        return None, {"rows": [r.model_dump() for r in rows]}
    if kind == "apply":
        out = Path(p.out)
        if resumed and _written(out, p.plan):
            return p.plan, {"checkpoint": str(out)}
        written = uc.run_apply(ws, p.plan, out, overwrite=p.overwrite, fmt=p.format, gptq_inputs=p.gptq_inputs)
        return p.plan, {"checkpoint": str(written)}
    if kind == "eval":
        ev = uc.run_eval(ws, p.checkpoint, text=p.text, tokens=p.tokens, window=p.window, device=p.device,
                         plan_id=p.plan_id, engine=p.engine, base=p.base, speed_batches=())
        return ev.id, None
    raise InvalidInput(f"unknown job kind {kind!r}; known: {list(JOB_PARAMS)}")


def _profile_of(ws, p) -> Profile | str:
    return read_profile_file(p.profile_file) if p.profile_file else p.profile


def _written(out: Path, plan_id: str) -> bool:
    """Whether `out` is the checkpoint of plan `plan_id` that bitplan wrote (its rename is the last step)."""
    try:
        return json.loads((out / WRITTEN_MARK).read_text())["id"] == plan_id
    except (OSError, ValueError, KeyError, TypeError):
        return False


def output_of(job: dict) -> Path | None:
    """The output path a job writes, if any: where a dead worker's temporary folders lie."""
    if job["kind"] == "apply":
        out = job["params"].get("out")
        return Path(out) if out else None
    return None


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]
