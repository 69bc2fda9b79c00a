"""The HTTP service: a thin FastAPI layer over the same use cases as the CLI (`planner/app/usecases.py`).

Library errors carry their HTTP status (`BitplanError.status_code`); one handler turns them into
responses, so no route repeats a check. Every route declares its response model, so `/openapi.json`
documents every response. Set `BITPLAN_TOKEN` to require `Authorization: Bearer <token>`.

No `from __future__ import annotations` here: FastAPI reads the route annotations at definition time,
and `WorkspaceDep` is local to `create_app`.
"""


import os
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from bitplan.db.store import Store
from bitplan.db.types import BitplanError, CalibrationRef, Evaluation, ModelRef, Option, Profile, Quantizer
from bitplan.planner.app.usecases import run_plan
from bitplan.planner.app.workspace import Workspace
from bitplan.planner.request import PlanRequest


class PlanBody(PlanRequest):
    """`POST /v1/plans`: the stored profile to plan, and the plan request."""

    profile_id: str = Field(description="id of a stored profile")


class PlanDocument(BaseModel):
    """A plan in the `bitplan.plan/1` interchange format (`Plan.to_dict`, docs/formats.md)."""

    model_config = ConfigDict(extra="allow")

    format: str
    id: str
    profile_id: str
    model: ModelRef
    budget: str
    budget_bits: int
    allocator: str
    params: dict[str, Any]
    pins: list[str]
    assignment: dict[str, Option] = Field(description="module name -> its option (bits, group_size, symmetric; "
                                                      "gguf: a GGUF type, in a plan of a --engine llamacpp profile)")
    total_bits: int
    fixed_bits: int
    n_params: int
    bits_per_weight: float
    size_mib: float
    predicted_error: float
    status: str
    solve_seconds: float
    created_at: str = Field(description="ISO 8601, UTC")
    predicted_latency: dict[int, float] | None = None
    latency_source: str | None = None


class ProfileHead(BaseModel):
    """What names a profile: its id, model, calibration text, estimator, quantizer, device and options."""

    id: str
    model: ModelRef
    calibration: CalibrationRef
    estimator: str
    quantizer: Quantizer
    device: str
    options: list[Option]
    fixed_bits: int


class ProfileSummary(ProfileHead):
    """A stored profile without its matrices."""

    n_modules: int
    n_params: int
    created_at: datetime


class ProfileDocument(ProfileHead):
    """A profile in the interchange format (`Profile.to_dict`, docs/formats.md): every module with its
    error and size row per option."""

    model_config = ConfigDict(extra="allow")

    format: str
    modules: list[dict[str, Any]]


class ErrorDocument(BaseModel):
    detail: Any = Field(description="what was wrong with the request, and what to send instead")


ERRORS = {status: {"model": ErrorDocument} for status in (401, 404, 422)}


def profile_summary(p: Profile) -> ProfileSummary:
    return ProfileSummary(id=p.id, model=p.model, calibration=p.calibration, estimator=p.estimator, quantizer=p.quantizer, device=p.device,
                          options=p.options, n_modules=len(p.modules), n_params=p.n_params, fixed_bits=p.fixed_bits,
                          created_at=p.created_at)


def create_app(db_url: str | None = None, token: str | None = None) -> FastAPI:
    """The app over the store at `db_url` (default: `$BITPLAN_DB` or the user data dir)."""
    workspace = Workspace(Store(db_url), progress=False)
    token = token if token is not None else os.environ.get("BITPLAN_TOKEN")

    def authorize(authorization: Annotated[str | None, Header()] = None) -> None:
        if token and authorization != f"Bearer {token}":
            raise _Unauthorized("missing or wrong bearer token: send 'Authorization: Bearer <BITPLAN_TOKEN>'")

    def get_workspace() -> Workspace:
        return workspace

    WorkspaceDep = Annotated[Workspace, Depends(get_workspace)]
    app = FastAPI(title="bitplan", version="0.1.0", dependencies=[Depends(authorize)], responses=ERRORS,
                  description="Mixed-precision quantization plans for LLMs under a memory budget.")

    # the store's location is the server's business: a message names "the store" instead
    hidden = {workspace.store.url, workspace.store.engine.url.database or workspace.store.url}

    @app.exception_handler(BitplanError)
    async def _library_error(_: Request, e: BitplanError):
        message = str(e)
        for where in sorted(hidden, key=len, reverse=True):
            message = message.replace(where, "the store")
        return JSONResponse(status_code=e.status_code, content={"detail": message})

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, e: RequestValidationError):
        # FastAPI's own answer echoes each bad input whole; this one names the field and the rule only
        errors = [{"loc": list(err["loc"]), "msg": str(err["msg"])[:200], "type": err["type"]}
                  for err in e.errors()[:10]]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.get("/v1/profiles")
    def list_profiles(ws: WorkspaceDep) -> list[ProfileSummary]:
        """List stored profiles, newest first (without their error matrices)."""
        return [profile_summary(p) for p in ws.store.list_profiles()]

    @app.get("/v1/profiles/{profile_id}")
    def get_profile(profile_id: str, ws: WorkspaceDep) -> ProfileDocument:
        """A stored profile in the interchange format."""
        return ProfileDocument.model_validate(ws.store.get_profile(profile_id).to_dict())

    @app.post("/v1/plans", status_code=201)
    def create_plan(body: PlanBody, ws: WorkspaceDep) -> PlanDocument:
        """Plan a stored profile for a memory budget with one allocator; the plan is stored."""
        request = PlanRequest(**body.model_dump(exclude={"profile_id"}))
        return PlanDocument.model_validate(run_plan(ws, body.profile_id, request).to_dict())

    @app.get("/v1/plans/{plan_id}")
    def get_plan(plan_id: str, ws: WorkspaceDep) -> PlanDocument:
        """A stored plan."""
        return PlanDocument.model_validate(ws.store.get_plan(plan_id).to_dict())

    @app.get("/v1/plans")
    def list_plans(ws: WorkspaceDep, profile_id: str | None = None) -> list[PlanDocument]:
        """Stored plans, optionally of one profile."""
        return [PlanDocument.model_validate(p.to_dict()) for p in ws.store.list_plans(profile_id)]

    @app.get("/v1/evaluations")
    def list_evaluations(ws: WorkspaceDep, plan_id: str | None = None) -> list[Evaluation]:
        """Stored evaluations, optionally of one plan."""
        return ws.store.list_evaluations(plan_id)

    return app


class _Unauthorized(BitplanError):
    status_code = 401
