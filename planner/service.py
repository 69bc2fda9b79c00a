"""The HTTP service: a thin FastAPI layer over the same calls as the CLI (`planner/workflow.py`).

Library errors carry their HTTP status (`BitplanError.status_code`); one handler turns them into
responses, so no route repeats a check. Set `BITPLAN_TOKEN` to require `Authorization: Bearer <token>`.

No `from __future__ import annotations` here: FastAPI reads the route annotations at definition time,
and `StoreDep` is local to `create_app`.
"""


import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from bitplan.db.store import Store
from bitplan.db.types import BitplanError, Profile
from bitplan.planner.workflow import DEFAULT_ALLOCATOR, DEFAULT_BUDGET, DEFAULT_GRANULARITY, run_plan


class PlanRequest(BaseModel):
    profile_id: str = Field(description="id of a stored profile")
    budget: str = Field(DEFAULT_BUDGET, description="3.5bpw (overheads included), 900MiB, 0.9GiB, ...")
    allocator: str = Field(DEFAULT_ALLOCATOR, description="ilp, closed_form, greedy, dp or uniform")
    granularity: str = Field(DEFAULT_GRANULARITY,
                             description="units that share one option: module, expert (MoE) or layer")
    pins: list[str] = Field(default_factory=list, description="e.g. ['model.layers.0.*>=4']")
    seed: int = 0
    time_limit: float | None = Field(None, gt=0, description="solver time limit, seconds")
    latency_budget: str | None = Field(None, description="e.g. 8ms@batch1 (needs a profile with a latency table; ilp)")
    objective: str = Field("error", description="error, latency, or error+λ*latency (λ in nats per millisecond)")


def profile_summary(p: Profile) -> dict[str, Any]:
    return {"id": p.id, "model": p.model.model_dump(), "calibration": p.calibration.model_dump(),
            "estimator": p.estimator, "device": p.device, "options": [o.model_dump() for o in p.options],
            "n_modules": len(p.modules), "n_params": p.n_params, "fixed_bits": p.fixed_bits,
            "created_at": p.created_at.isoformat()}


def create_app(db_url: str | None = None, token: str | None = None) -> FastAPI:
    """The app over the store at `db_url` (default: `$BITPLAN_DB` or the user data dir)."""
    store = Store(db_url)
    token = token if token is not None else os.environ.get("BITPLAN_TOKEN")

    def authorize(authorization: Annotated[str | None, Header()] = None) -> None:
        if token and authorization != f"Bearer {token}":
            raise _Unauthorized("missing or wrong bearer token: send 'Authorization: Bearer <BITPLAN_TOKEN>'")

    def get_store() -> Store:
        return store

    StoreDep = Annotated[Store, Depends(get_store)]
    app = FastAPI(title="bitplan", version="0.1.0", dependencies=[Depends(authorize)],
                  description="Mixed-precision quantization plans for LLMs under a memory budget.")

    @app.exception_handler(BitplanError)
    async def _library_error(_: Request, e: BitplanError):
        return JSONResponse(status_code=e.status_code, content={"detail": str(e)})

    @app.get("/v1/profiles")
    def list_profiles(store: StoreDep) -> list[dict[str, Any]]:
        """List stored profiles, newest first (without their error matrices)."""
        return [profile_summary(p) for p in store.list_profiles()]

    @app.get("/v1/profiles/{profile_id}")
    def get_profile(profile_id: str, store: StoreDep) -> dict[str, Any]:
        """A stored profile in the `bitplan.profile/1` format."""
        return store.get_profile(profile_id).to_dict()

    @app.post("/v1/plans", status_code=201)
    def create_plan(req: PlanRequest, store: StoreDep) -> dict[str, Any]:
        """Plan a stored profile for a memory budget with one allocator; the plan is stored."""
        return run_plan(store, req.profile_id, req.budget, req.allocator, pins=req.pins, seed=req.seed,
                        time_limit=req.time_limit, granularity=req.granularity, latency_budget=req.latency_budget,
                        objective=req.objective).to_dict()

    @app.get("/v1/plans/{plan_id}")
    def get_plan(plan_id: str, store: StoreDep) -> dict[str, Any]:
        """A stored plan."""
        return store.get_plan(plan_id).to_dict()

    @app.get("/v1/plans")
    def list_plans(store: StoreDep, profile_id: str | None = None) -> list[dict[str, Any]]:
        """Stored plans, optionally of one profile."""
        return [p.to_dict() for p in store.list_plans(profile_id)]

    @app.get("/v1/evaluations")
    def list_evaluations(store: StoreDep, plan_id: str | None = None) -> list[dict[str, Any]]:
        """Stored evaluations, optionally of one plan."""
        return [e.model_dump(mode="json") for e in store.list_evaluations(plan_id)]

    return app


class _Unauthorized(BitplanError):
    status_code = 401
