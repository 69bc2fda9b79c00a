"""The HTTP service: a thin FastAPI layer over the same use cases as the CLI (`planner/app/usecases.py`).

Library errors carry their HTTP status (`BitplanError.status_code`); one handler turns them into
responses, so no route repeats a check. Every route declares its response model, so `/openapi.json`
documents every response.

Safe by default:

- `BITPLAN_TOKEN` (or `token=`) requires `Authorization: Bearer <token>`, compared in constant time and
  checked from the headers alone, before a byte of the body is read (`Guard`, outside FastAPI);
- a request body larger than `max_body` bytes (`BITPLAN_MAX_BODY`, default 16 MiB) is refused with 413,
  from its Content-Length or, streamed without one, as soon as the bytes read pass the limit;
- every path a job names must lie inside the allowed roots (`BITPLAN_ROOTS`; `planner/app/jobs.py`);
- messages name "the store" instead of the database's location and never echo a body.

Long work runs as jobs (`POST /v1/jobs`), in worker processes (`planner/app/worker.py`), never in the
server.  A quick plan (`POST /v1/plans`) is solved in the request, but by a pool of `solvers` of its own
(processes under `bitplan serve`, threads by default here), off the event loop and off the threads that
serve reads: a burst of plans does not hold up `GET`s.  Lists are pages of summaries (`limit`, `cursor`), the full object one `GET` away.

No `from __future__ import annotations` here: FastAPI reads the route annotations at definition time,
and `WorkspaceDep` is local to `create_app`.
"""


import asyncio
import hmac
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from bitplan.db.store import DEFAULT_PAGE, MAX_PAGE, JobConflict, Store
from bitplan.db.tables import JOB_FINAL
from bitplan.db.types import BitplanError, CalibrationRef, Evaluation, ModelRef, Option, Quantizer
from bitplan.db.formats import EXPORT_FORMATS
from bitplan.planner.app.jobs import JobBody, allowed_roots, inside_roots, submit
from bitplan.planner.app.usecases import ProfileValidation, profile_validation, run_plan
from bitplan.planner.app.workspace import Workspace
from bitplan.planner.request import PlanRequest

MAX_BODY = 16 * 2**20  # bytes: a profile file of a 45k-module MoE model is a few MiB
MAX_QUEUED = 1000  # jobs waiting at once
SOLVERS = 2  # quick plans solved at once (this machine has 2 cores)
SOLVE_IN = "threads"  # or "processes" (`BITPLAN_SOLVE_IN`), which `bitplan serve` uses
WEB_DIR = Path(__file__).resolve().parent / "web"  # the page at `/`: plain HTML, JS and CSS, shipped in the package
WEB_FILES = {f"/web/{f.name}": f for f in sorted(WEB_DIR.glob("*")) if f.is_file()}
# readable without the token: the docs, and the page (it holds no data; it asks for the token itself)
OPEN_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/", *WEB_FILES)


class PlanBody(PlanRequest):
    """`POST /v1/plans`: the stored profile to plan, and the plan request."""

    profile_id: str = Field(description="id of a stored profile")


class PlanHead(BaseModel):
    """What a plan is, without its assignment: the fields a summary and the whole plan share."""

    id: str
    profile_id: str
    model: ModelRef
    budget: str
    budget_bits: int
    allocator: str
    params: dict[str, Any]
    pins: list[str]
    total_bits: int
    fixed_bits: int
    n_params: int
    bits_per_weight: float
    size_mib: float
    predicted_error: float
    status: str
    solve_seconds: float
    predicted_latency: dict[int, float] | None = None
    latency_source: str | None = None


class PlanSummary(PlanHead):
    """A stored plan without its assignment (`GET /v1/plans/{id}` has it)."""

    created_at: datetime


class PlanDocument(PlanHead):
    """A plan in the `bitplan.plan/1` interchange format (`Plan.to_dict`, docs/formats.md)."""

    model_config = ConfigDict(extra="allow")

    format: str
    assignment: dict[str, Option] = Field(description="module name -> its option (bits, group_size, symmetric; "
                                                      "gguf: a GGUF type, in a plan of a --engine llamacpp profile)")
    created_at: str = Field(description="ISO 8601, UTC")


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
    """A stored profile without its modules and matrices (`GET /v1/profiles/{id}` has them)."""

    n_modules: int
    has_latency: bool
    created_at: datetime


class ProfileDocument(ProfileHead):
    """A profile in the interchange format (`Profile.to_dict`, docs/formats.md): every module with its
    error and size row per option."""

    model_config = ConfigDict(extra="allow")

    format: str
    modules: list[dict[str, Any]]


class ServerInfo(BaseModel):
    """What a client needs to know of this server before it names paths or formats."""

    version: str
    roots: list[str] = Field(description="the folders jobs may read and write (BITPLAN_ROOTS); a relative "
                                         "path is taken inside the first")
    database: str = Field(description="the store's kind: sqlite or postgresql (never its location)")
    export_formats: list[str] = Field(description="what `apply` jobs can write (`format`)")


JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobSummary(BaseModel):
    """A job without its params and result (`GET /v1/jobs/{id}` has them)."""

    id: str
    kind: str
    state: JobState
    progress: float = Field(description="0..1, of the step named in `message`")
    message: str = Field(description="what is being done (the CLI's progress bar), with an ETA where known")
    eta_seconds: float | None = None
    error: str | None = Field(None, description="why it failed")
    result_id: str | None = Field(None, description="the profile, plan or evaluation it made")
    created_at: datetime
    updated_at: datetime


class JobDocument(JobSummary):
    """A job: what was asked (`params`), where it stands, and what it made."""

    params: dict[str, Any]
    result: dict[str, Any] | None = Field(None, description="what it made beyond an id: a compare's rows, "
                                                            "an apply's checkpoint")
    attempts: int = Field(description="times a worker took it (more than 1: resumed after a worker died)")
    cancel_requested: bool
    started_at: datetime | None = None
    finished_at: datetime | None = None


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list, newest first; pass `next_cursor` as `cursor` for the next (null: the last)."""

    items: list[T]
    next_cursor: str | None = None


class ErrorDocument(BaseModel):
    detail: Any = Field(description="what was wrong with the request, and what to send instead")


ERRORS = {status: {"model": ErrorDocument} for status in (401, 403, 404, 413, 422)}
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="items per page")]
Cursor = Annotated[str | None, Query(description="`next_cursor` of the page before")]


def create_app(db_url: str | None = None, token: str | None = None, *, roots: str | None = None,
               max_body: int | None = None, max_queued: int = MAX_QUEUED, solvers: int = SOLVERS,
               solve_in: Literal["threads", "processes"] | None = None):
    """The app over the store at `db_url` (default: `$BITPLAN_DB` or the user data dir), wrapped in its
    `Guard`.  `token`, `roots` and `max_body` default to `$BITPLAN_TOKEN`, `$BITPLAN_ROOTS` and
    `$BITPLAN_MAX_BODY`; quick plans are solved by `solvers` threads, or processes (`solve_in`)."""
    workspace = Workspace(Store(db_url), progress=False)
    token = token if token is not None else os.environ.get("BITPLAN_TOKEN")
    max_body = max_body if max_body is not None else int(os.environ.get("BITPLAN_MAX_BODY") or MAX_BODY)
    allowed = allowed_roots(roots)
    solve_in = solve_in or os.environ.get("BITPLAN_SOLVE_IN") or SOLVE_IN
    if solve_in == "processes":
        # a solve holds the GIL for most of its time: in processes of their own, reads never wait for it
        solver = ProcessPoolExecutor(max_workers=solvers, mp_context=multiprocessing.get_context("spawn"))
    else:
        solver = ThreadPoolExecutor(max_workers=solvers, thread_name_prefix="bitplan-solve")
    _WORKSPACES[db_url] = workspace  # a thread solves with the server's own workspace

    def get_workspace() -> Workspace:
        return workspace

    WorkspaceDep = Annotated[Workspace, Depends(get_workspace)]
    app = FastAPI(title="bitplan", version="0.2.0", responses=ERRORS,
                  description="Mixed-precision quantization plans for LLMs under a memory budget.")
    app.state.workspace, app.state.roots = workspace, allowed

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

    @app.get("/v1/server")
    def server_info() -> ServerInfo:
        """This server's version, allowed roots and export formats (the page shows the roots)."""
        from importlib.metadata import version

        return ServerInfo(version=version("bitplan"), roots=[str(r) for r in allowed],
                          database=workspace.store.engine.dialect.name,
                          export_formats=list(EXPORT_FORMATS))

    # ------------------------------------------------------------------------------------ profiles

    @app.get("/v1/profiles")
    def list_profiles(ws: WorkspaceDep, limit: Limit = DEFAULT_PAGE, cursor: Cursor = None) -> Page[ProfileSummary]:
        """Stored profiles, newest first, without their modules and matrices."""
        items, next_cursor = ws.store.page_profiles(limit=limit, cursor=cursor)
        return Page[ProfileSummary](items=items, next_cursor=next_cursor)

    @app.get("/v1/profiles/{profile_id}")
    def get_profile(profile_id: str, ws: WorkspaceDep) -> ProfileDocument:
        """A stored profile in the interchange format."""
        return ProfileDocument.model_validate(ws.store.get_profile(profile_id).to_dict())

    @app.get("/v1/profiles/{profile_id}/validation")
    def get_profile_validation(profile_id: str, ws: WorkspaceDep) -> ProfileValidation:
        """How well the profile's predicted error ranked what was measured: Spearman's rho between each
        evaluated plan's predicted error and its measured KL and perplexity, per evaluation text."""
        return profile_validation(ws.store, profile_id)

    # --------------------------------------------------------------------------------------- plans

    @app.post("/v1/plans", status_code=201, response_model=PlanDocument)
    async def create_plan(body: PlanBody):
        """Plan a stored profile for a memory budget with one allocator; the plan is stored.  Quick
        allocators only in practice: the evolutionary search is a job (`POST /v1/jobs`, kind plan)."""
        request = body.model_dump(exclude={"profile_id"})
        kind, status, text = await asyncio.wrap_future(solver.submit(_solve, db_url, body.profile_id, request))
        if kind == "refused":
            raise _Refused(text, status)
        return Response(text, status_code=201, media_type="application/json")

    @app.get("/v1/plans/{plan_id}")
    def get_plan(plan_id: str, ws: WorkspaceDep) -> PlanDocument:
        """A stored plan, with its assignment."""
        return PlanDocument.model_validate(ws.store.get_plan(plan_id).to_dict())

    @app.get("/v1/plans")
    def list_plans(ws: WorkspaceDep, profile_id: str | None = None, limit: Limit = DEFAULT_PAGE,
                   cursor: Cursor = None) -> Page[PlanSummary]:
        """Stored plans, newest first, optionally of one profile, without their assignments."""
        items, next_cursor = ws.store.page_plans(limit=limit, cursor=cursor, profile_id=profile_id)
        return Page[PlanSummary](items=items, next_cursor=next_cursor)

    @app.get("/v1/evaluations")
    def list_evaluations(ws: WorkspaceDep, plan_id: str | None = None, limit: Limit = DEFAULT_PAGE,
                         cursor: Cursor = None) -> Page[Evaluation]:
        """Stored evaluations, newest first, optionally of one plan."""
        items, next_cursor = ws.store.page_evaluations(limit=limit, cursor=cursor, plan_id=plan_id)
        return Page[Evaluation](items=items, next_cursor=next_cursor)

    @app.get("/v1/evaluations/{evaluation_id}")
    def get_evaluation(evaluation_id: str, ws: WorkspaceDep) -> Evaluation:
        """A stored evaluation."""
        return ws.store.get_evaluation(evaluation_id)

    # ---------------------------------------------------------------------------------------- jobs

    @app.post("/v1/jobs", status_code=202)
    def create_job(body: JobBody, ws: WorkspaceDep) -> JobDocument:
        """Queue a profile, apply, eval, compare or plan job; a worker runs it.  `params` take the CLI's
        argument and flag names; every path must lie inside the allowed roots (403 otherwise)."""
        return JobDocument.model_validate(submit(ws.store, body.kind, body.params, allowed, max_queued=max_queued))

    @app.get("/v1/jobs")
    def list_jobs(ws: WorkspaceDep, state: JobState | None = None, limit: Limit = DEFAULT_PAGE,
                  cursor: Cursor = None) -> Page[JobSummary]:
        """Jobs, newest first, optionally in one state."""
        items, next_cursor = ws.store.page_jobs(limit=limit, cursor=cursor, state=state)
        return Page[JobSummary](items=items, next_cursor=next_cursor)

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str, ws: WorkspaceDep) -> JobDocument:
        """A job: its state, progress, error and result."""
        return JobDocument.model_validate(ws.store.get_job(job_id))

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, ws: WorkspaceDep) -> JobDocument:
        """Cancel a job: a queued one at once, a running one within a heartbeat of its worker (409 when
        it is over already)."""
        return JobDocument.model_validate(ws.store.cancel_job(job_id))

    @app.get("/v1/jobs/{job_id}/output", response_model=None,
             responses={200: {"description": "the checkpoint an apply job wrote: a .gguf file as it is, a "
                                             "folder as an uncompressed tar streamed as it is read",
                              "content": {t: {"schema": {"type": "string", "format": "binary"}}
                                          for t in ("application/x-tar", "application/octet-stream")}}})
    def job_output(job_id: str, ws: WorkspaceDep) -> Response:
        """Download what a succeeded apply job wrote (409 before it has succeeded; 404 once it is gone)."""
        return _output_response(ws.store.get_job(job_id), allowed)

    @app.get("/v1/jobs/{job_id}/events", response_model=None, response_class=StreamingResponse,
             responses={200: {"description": "server-sent events: one `progress` event (a JobDocument) per "
                                             "change, the last one when the job is over",
                              "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/JobDocument"}}}}})
    async def job_events(job_id: str, request: Request, interval: Annotated[float, Query(ge=0.1, le=10)] = 0.5):
        """The job's progress as server-sent events, until it is over."""
        first = await run_in_threadpool(workspace.store.get_job, job_id)  # 404 before the stream starts

        async def events():
            job, last = first, None
            while True:
                shown = JobDocument.model_validate(job).model_dump_json()
                if shown != last:
                    yield f"event: progress\ndata: {shown}\n\n"
                    last = shown
                if job["state"] in JOB_FINAL or await request.is_disconnected():
                    return
                await asyncio.sleep(interval)
                job = await run_in_threadpool(workspace.store.get_job, job_id)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -------------------------------------------------------------------------------------- the page

    @app.get("/", include_in_schema=False)
    def web_page() -> Response:
        """The web page: profiles, the plan form and its heat map, compare, jobs (docs/web.md)."""
        return _web_file("/web/index.html")

    @app.get("/web/{name}", include_in_schema=False)
    def web_file(name: str) -> Response:
        """The page's script and style sheet."""
        return _web_file(f"/web/{name}")

    return Guard(app, token=token, max_body=max_body)


def _output_response(job: dict, roots: tuple[Path, ...]) -> Response:
    from fastapi.responses import FileResponse

    from bitplan.db.types import NotFound

    if job["kind"] != "apply":
        raise NotFound(f"job {job['id']} is a {job['kind']} job: only apply jobs write a checkpoint to download")
    if job["state"] != "succeeded":
        raise JobConflict(f"job {job['id']} is {job['state']}: its checkpoint can be downloaded once it has succeeded")
    # the roots may have narrowed since the job ran
    path = Path(inside_roots((job.get("result") or {}).get("checkpoint", ""), "the job's checkpoint", roots))
    if path.is_file():
        return FileResponse(path, filename=path.name, media_type="application/octet-stream")
    if not path.is_dir():
        raise NotFound(f"the checkpoint of job {job['id']} is no longer where the job wrote it: run the apply again")
    return StreamingResponse(_tar_stream(path), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{path.name}.tar"'})


def _tar_stream(folder: Path, chunk: int = 2**20):
    """`folder` as an uncompressed tar (safetensors do not compress), written by a thread into a pipe and
    read out as it is written: memory stays at a chunk whatever the checkpoint's size.  A client that goes
    away closes the pipe, and the writer stops on the broken pipe."""
    import tarfile
    import threading

    read_fd, write_fd = os.pipe()

    def write():
        try:
            with os.fdopen(write_fd, "wb") as pipe, tarfile.open(fileobj=pipe, mode="w|") as tar:
                tar.add(folder, arcname=folder.name)
        except (BrokenPipeError, ValueError):
            pass

    writer = threading.Thread(target=write, name=f"tar {folder.name}", daemon=True)
    writer.start()
    with os.fdopen(read_fd, "rb") as pipe:
        while data := pipe.read(chunk):
            yield data
    writer.join()


WEB_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
             ".css": "text/css; charset=utf-8"}
# the page talks to this server only, and runs no script it did not ship
WEB_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
              "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def _web_file(path: str) -> Response:
    from bitplan.db.types import NotFound

    file = WEB_FILES.get(path)
    if file is None or file.suffix not in WEB_TYPES:
        raise NotFound(f"no file {path[:60]!r} here: the page is at /")
    # no-cache: a page upgraded with the service is never mixed with an old script
    return Response(file.read_bytes(), media_type=WEB_TYPES[file.suffix],
                    headers={"Cache-Control": "no-cache", "Content-Security-Policy": WEB_POLICY,
                             "X-Content-Type-Options": "nosniff"})


_WORKSPACES: dict[str | None, Workspace] = {}  # per process: the workspace each database is solved with


def _solve(db_url: str | None, profile_id: str, request: dict) -> tuple[str, int, str]:
    """Solve and store one plan, in a solver thread or process: `("plan", 201, its JSON)`, or
    `("refused", status, message)` (a library error crosses a process boundary as its status and text).
    The serialization of a plan of any size happens here too, off the event loop."""
    ws = _WORKSPACES.get(db_url)
    if ws is None:
        ws = _WORKSPACES[db_url] = Workspace(Store(db_url), progress=False)
    try:
        plan = run_plan(ws, profile_id, PlanRequest(**request))
    except BitplanError as e:
        return "refused", e.status_code, str(e)
    return "plan", 201, json.dumps(plan.to_dict())


class _Refused(BitplanError):
    """A library error of a solver, with its status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status_code = status


class Guard:
    """ASGI middleware in front of the app: the bearer token (from the headers alone, in constant time)
    and the body limit (Content-Length, then the bytes as they come), before FastAPI reads anything.

    The body is read here, up to the limit, and handed on whole: FastAPI turns an error raised while it
    reads a body into a 400, so the limit must be enforced before the app starts."""

    def __init__(self, app: FastAPI, *, token: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.expected = f"Bearer {token}".encode() if token else None

    def __getattr__(self, name: str):  # `openapi()`, `state`, `routes`: the app's
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await _reply(send, 401, "missing or wrong bearer token: send 'Authorization: Bearer "
                                              "<BITPLAN_TOKEN>'", {b"www-authenticate": b"Bearer"})
        too_large = (f"the request body is larger than this service takes ({self.max_body} bytes, "
                     f"BITPLAN_MAX_BODY): send less")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _reply(send, 400, "Content-Length is not a number")
            if int(length) > self.max_body:
                return await _reply(send, 413, too_large)
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE") and length is None \
                and b"chunked" not in headers.get(b"transfer-encoding", b""):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                return await _reply(send, 413, too_large)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return whole
            return await receive()  # later: the client's disconnect, as it comes

        return await self.app(scope, replay, send)


async def _reply(send, status: int, detail: str, headers: dict[bytes, bytes] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), *(headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
