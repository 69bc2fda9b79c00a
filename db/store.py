"""Saving and loading the vocabulary (`db/types.py`) to the database: the only code that touches rows.

Every method opens its own short session; every write is one transaction. Saves are idempotent
by id: saving what is already stored returns the stored object and changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import uuid
import zlib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import Engine, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from bitplan.db.session import make_engine
from bitplan.db.tables import (JOB_FINAL, JOB_STATES, Base, CalibrationRow, EvaluationRow, JobRow, ModelRow,
                               PlanRow, ProfileRow, utcnow)
from bitplan.db.types import (BitplanError, CalibrationRef, Evaluation, InvalidInput, Kind, ModelRef, Module,
                              NotFound, Option, Plan, Profile, Quantizer, content_id)

_NPY_MAGIC = b"\x93NUMPY"
_Row = TypeVar("_Row", bound=Base)


# ----------------------------------------------------------------------------------- encodings


def pack_array(a: np.ndarray, *, compress: bool = False) -> bytes:
    """np.save bytes (dtype and shape included, no pickle), zlib'd if `compress`."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    raw = buf.getvalue()
    return zlib.compress(raw, 1) if compress else raw


def unpack_array(blob: bytes) -> np.ndarray:
    """Inverse of `pack_array`; the npy magic tells compressed from raw."""
    raw = bytes(blob)
    if not raw.startswith(_NPY_MAGIC):
        raw = zlib.decompress(raw)
    a = np.load(io.BytesIO(raw), allow_pickle=False)
    # np.load over bytes gives a read-only view; profiles built in memory are writable, keep it so.
    return a if a.flags.writeable else a.copy()


def _pack_json(obj: Any) -> bytes:
    return zlib.compress(json.dumps(obj, separators=(",", ":")).encode(), 6)


def _unpack_json(blob: bytes) -> Any:
    return json.loads(zlib.decompress(bytes(blob)))


def _model_key(ref: ModelRef) -> str:
    # A profile read from a file may lack a fingerprint; key it by what names it instead.
    return ref.fingerprint or content_id(ref.name, ref.source, prefix="nofp-")


def content_profile_id(p: Profile) -> str:
    """The content id of a profile that came without one: same measurements, same id."""
    digest = hashlib.sha256()
    for a in (p.error, p.size_bits):
        digest.update(np.ascontiguousarray(a).tobytes())
    latency = None if p.latency is None else hashlib.sha256(np.ascontiguousarray(p.latency).tobytes()).hexdigest()
    return content_id(p.model.model_dump(), p.calibration.model_dump(), p.estimator, p.quantizer.model_dump(),
                      p.device, [o.model_dump() for o in p.options], [m.model_dump() for m in p.modules],
                      p.fixed_bits, digest.hexdigest(), p.latency_source, list(p.latency_batches), latency,
                      sorted(p.estimated.items()), prefix="prof-")


# ---------------------------------------------------------------------------------- row <-> type


def _profile_row(p: Profile) -> ProfileRow:
    return ProfileRow(
        id=p.id, model_id=_model_key(p.model), calibration_id=p.calibration.fingerprint or None,
        model_ref=p.model.model_dump(), calibration_ref=p.calibration.model_dump(),
        estimator=p.estimator, quantizer=p.quantizer.model_dump(), device=p.device,
        options=[o.model_dump() for o in p.options],
        # `estimated` rides in the modules blob, as an "estimated" key of those modules (Module ignores
        # the key, so a reader that does not know it reads the rows all the same).
        modules=_pack_json([{**m.model_dump(mode="json"), **({"estimated": p.estimated[m.name]}
                                                             if m.name in p.estimated else {})}
                            for m in p.modules]),
        # float errors barely compress; the int sizes repeat per shape and shrink ~10x.
        error=pack_array(p.error), size_bits=pack_array(p.size_bits, compress=True),
        fixed_bits=p.fixed_bits, seconds=p.seconds, created_at=p.created_at,
        latency=None if p.latency is None else pack_array(p.latency),
        latency_batches=list(p.latency_batches) or None, latency_source=p.latency_source or None,
    )


def _profile(r: ProfileRow) -> Profile:
    mods = _unpack_json(r.modules)
    estimated = {m["name"]: m.pop("estimated") for m in mods if "estimated" in m}
    return Profile(
        id=r.id, model=ModelRef(**r.model_ref), calibration=CalibrationRef(**r.calibration_ref),
        estimator=r.estimator, quantizer=Quantizer(**r.quantizer), device=r.device,
        options=[Option(**o) for o in r.options],
        modules=[Module(**m) for m in mods], estimated=estimated,
        error=unpack_array(r.error), size_bits=unpack_array(r.size_bits),
        fixed_bits=r.fixed_bits, seconds=r.seconds, created_at=r.created_at,
        latency=None if r.latency is None else unpack_array(r.latency),
        latency_batches=r.latency_batches or [], latency_source=r.latency_source or "",
    )


def _plan_row(p: Plan) -> PlanRow:
    d = p.model_dump(exclude={"model", "assignment"})
    return PlanRow(**d, model_ref=p.model.model_dump(),
                   assignment={k: o.model_dump() for k, o in p.assignment.items()})


def _plan(r: PlanRow) -> Plan:
    fields = {c: getattr(r, c) for c in Plan.model_fields if c not in ("model", "assignment")}
    return Plan(**fields, model=ModelRef(**r.model_ref),
                assignment={k: Option(**o) for k, o in r.assignment.items()})


def _evaluation(r: EvaluationRow) -> Evaluation:
    return Evaluation(**{c: getattr(r, c) for c in Evaluation.model_fields})


JOB_FIELDS = ("id", "kind", "state", "progress", "message", "error", "params", "result_id", "created_at",
              "updated_at", "worker", "heartbeat_at", "started_at", "finished_at", "attempts", "cancel_requested",
              "eta_seconds", "result")


def _job(r: JobRow) -> dict:
    return {c: getattr(r, c) for c in JOB_FIELDS}


class QueueFull(BitplanError):
    """More jobs are waiting than the service takes (`max_queued`): the client retries later."""

    status_code = 429


class JobConflict(BitplanError):
    """The job is not in a state that allows what was asked (cancelling a finished job)."""

    status_code = 409


DEFAULT_PAGE = 50
MAX_PAGE = 500


def encode_cursor(created_at: datetime, id: str) -> str:
    """The opaque cursor after the row (`created_at`, `id`): base64 of both, meaningless to a client."""
    raw = json.dumps([created_at.isoformat(), id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Inverse of `encode_cursor`; InvalidInput for anything it did not make."""
    try:
        created_at, id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created_at), str(id)
    except (ValueError, TypeError):
        raise InvalidInput("the cursor is not one this service gave: pass a list's next_cursor as it came, or "
                           "none for the first page") from None


def _npy_rows(head: bytes) -> int:
    """Rows of the np.save array whose first bytes are `head` (its header), without reading the rest."""
    f = io.BytesIO(bytes(head))
    read = {(1, 0): np.lib.format.read_array_header_1_0}.get(np.lib.format.read_magic(f),
                                                              np.lib.format.read_array_header_2_0)
    shape, _, _ = read(f)
    return int(shape[0])


# ---------------------------------------------------------------------------------------- store


class Store:
    """Profiles, plans, evaluations and jobs in one database (`database_url(url)`), migrated on open."""

    def __init__(self, url: str | None = None, *, engine: Engine | None = None):
        self.engine = engine if engine is not None else make_engine(url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def url(self) -> str:
        """Where the data lives (password hidden), for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def close(self) -> None:
        """Release the engine's connections."""
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def work_dir(self, key: str) -> Path:
        """Where unfinished work named `key` (a profile id) keeps what it finished: `<db file>.work/<key>`
        beside a SQLite file, else under the user data dir."""
        url = self.engine.url
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            db = Path(url.database)
            return db.with_name(db.name + ".work") / key
        import platformdirs
        return Path(platformdirs.user_data_dir("bitplan")) / "work" / key

    # ------------------------------------------------------------------------- models, calibration

    def save_model(self, ref: ModelRef, *, n_params: int = 0, config: dict | None = None) -> str:
        """Record a model (keyed by fingerprint) and return its key; fills in, never overwrites."""
        with self._session.begin() as s:
            return self._upsert_model(s, ref, n_params, config)

    def save_calibration(self, ref: CalibrationRef, description: str = "") -> str:
        """Record a calibration set (keyed by fingerprint) and return its key; fills in, never overwrites."""
        if not ref.fingerprint:
            raise InvalidInput("a calibration set needs a fingerprint to be stored")
        with self._session.begin() as s:
            return self._upsert_calibration(s, ref, description)

    def get_model(self, fingerprint: str) -> dict:
        """The stored model row as a dict (id, name, source, n_params, config, created_at)."""
        with self._session() as s:
            r = self._get(s, ModelRow, fingerprint, "model")
            return {c: getattr(r, c) for c in ("id", "name", "source", "n_params", "config", "created_at")}

    @staticmethod
    def _upsert_model(s: Session, ref: ModelRef, n_params: int = 0, config: dict | None = None) -> str:
        key = _model_key(ref)
        row = s.get(ModelRow, key)
        if row is None:
            s.add(ModelRow(id=key, name=ref.name, source=ref.source, n_params=n_params, config=config))
        else:
            # The first name wins (profiles keep their own ref); later calls may add what was unknown.
            if not row.n_params and n_params:
                row.n_params = n_params
            if row.config is None and config is not None:
                row.config = config
            if not row.source and ref.source:
                row.source = ref.source
        return key

    @staticmethod
    def _upsert_calibration(s: Session, ref: CalibrationRef, description: str = "") -> str:
        row = s.get(CalibrationRow, ref.fingerprint)
        if row is None:
            s.add(CalibrationRow(id=ref.fingerprint, name=ref.name, n_tokens=ref.n_tokens,
                                 description=description))
        elif not row.description and description:
            row.description = description
        return ref.fingerprint

    # ------------------------------------------------------------------------------------ profiles

    def save_profile(self, profile: Profile) -> Profile:
        """Store a profile (upserting its model and calibration); a stored id returns the stored one."""
        if not profile.id:
            profile = profile.model_copy(update={"id": content_profile_id(profile)})
        def write() -> Profile:
            with self._session.begin() as s:
                if (row := s.get(ProfileRow, profile.id)) is not None:
                    return _profile(row)
                self._upsert_model(s, profile.model)
                if profile.calibration.fingerprint:
                    self._upsert_calibration(s, profile.calibration)
                s.add(_profile_row(profile))
            return profile

        return self._idempotent(write, lambda: self.get_profile(profile.id))

    def get_profile(self, id: str) -> Profile:
        """The stored profile `id`; NotFound says how to list what is stored."""
        with self._session() as s:
            return _profile(self._get(s, ProfileRow, id, "profile"))

    def list_profiles(self, model_fingerprint: str | None = None) -> list[Profile]:
        """Stored profiles, newest first, optionally of one model."""
        q = select(ProfileRow).order_by(ProfileRow.created_at.desc(), ProfileRow.id.desc())
        if model_fingerprint is not None:
            q = q.where(ProfileRow.model_id == model_fingerprint)
        with self._session() as s:
            return [_profile(r) for r in s.scalars(q)]

    # --------------------------------------------------------------------------------------- plans

    def save_plan(self, plan: Plan) -> Plan:
        """Store a plan of a stored profile; an id already stored returns the stored one."""
        def write() -> Plan:
            with self._session.begin() as s:
                if (row := s.get(PlanRow, plan.id)) is not None:
                    return _plan(row)
                if s.get(ProfileRow, plan.profile_id) is None:
                    raise NotFound(f"plan {plan.id!r} refers to profile {plan.profile_id!r}, which is not "
                                   f"stored in {self.url}: save the profile first")
                s.add(_plan_row(plan))
            return plan

        return self._idempotent(write, lambda: self.get_plan(plan.id))

    def get_plan(self, id: str) -> Plan:
        """The stored plan `id`; NotFound says how to list what is stored."""
        with self._session() as s:
            return _plan(self._get(s, PlanRow, id, "plan"))

    def list_plans(self, profile_id: str | None = None) -> list[Plan]:
        """Stored plans, newest first, optionally of one profile."""
        q = select(PlanRow).order_by(PlanRow.created_at.desc(), PlanRow.id.desc())
        if profile_id is not None:
            q = q.where(PlanRow.profile_id == profile_id)
        with self._session() as s:
            return [_plan(r) for r in s.scalars(q)]

    # --------------------------------------------------------------------------------- evaluations

    def save_evaluation(self, ev: Evaluation) -> Evaluation:
        """Store an evaluation, giving it the id `eval-<16 hex>` of its content when it has none."""
        if not ev.id:
            ev = ev.model_copy(update={"id": content_id(ev.model_dump(mode="json", exclude={"id"}),
                                                        prefix="eval-")})
        def write() -> Evaluation:
            with self._session.begin() as s:
                if (row := s.get(EvaluationRow, ev.id)) is not None:
                    return _evaluation(row)
                if ev.plan_id is not None and s.get(PlanRow, ev.plan_id) is None:
                    raise NotFound(f"evaluation refers to plan {ev.plan_id!r}, which is not stored in "
                                   f"{self.url}: save the plan first")
                s.add(EvaluationRow(**ev.model_dump()))
            return ev

        return self._idempotent(write, lambda: self.get_evaluation(ev.id))

    def get_evaluation(self, id: str) -> Evaluation:
        """The stored evaluation `id`; NotFound says how to list what is stored."""
        with self._session() as s:
            return _evaluation(self._get(s, EvaluationRow, id, "evaluation"))

    def list_evaluations(self, plan_id: str | None = None) -> list[Evaluation]:
        """Stored evaluations, newest first, optionally of one plan."""
        q = select(EvaluationRow).order_by(EvaluationRow.created_at.desc(), EvaluationRow.id.desc())
        if plan_id is not None:
            q = q.where(EvaluationRow.plan_id == plan_id)
        with self._session() as s:
            return [_evaluation(r) for r in s.scalars(q)]

    # ---------------------------------------------------------------------------------------- find

    def find(self, id_or_prefix: str) -> tuple[Kind, Profile | Plan | Evaluation]:
        """Resolve a full id or a unique prefix across profiles, plans and evaluations."""
        prefix = id_or_prefix.strip()
        if not prefix:
            raise InvalidInput("give an id or an id prefix (see `bitplan ls`)")
        kinds: tuple[tuple[Kind, type], ...] = (("profile", ProfileRow), ("plan", PlanRow),
                                                 ("evaluation", EvaluationRow))
        with self._session() as s:
            # LIKE narrows the rows (case-insensitively on SQLite); startswith keeps ids exact.
            hits = [(kind, i) for kind, T in kinds
                    for i in s.scalars(select(T.id).where(T.id.startswith(prefix, autoescape=True)))
                    if i.startswith(prefix)]
        exact = [h for h in hits if h[1] == prefix]
        hits = exact or hits
        if not hits:
            raise NotFound(f"no profile, plan or evaluation id starts with {prefix!r} in {self.url}; "
                           "run `bitplan ls` to see the stored ids")
        if len(hits) > 1:
            names = ", ".join(f"{k} {i}" for k, i in hits[:10]) + (", ..." if len(hits) > 10 else "")
            raise InvalidInput(f"{prefix!r} is ambiguous, it matches {len(hits)} ids: {names}; "
                               "give more characters")
        kind, id = hits[0]
        getter = {"profile": self.get_profile, "plan": self.get_plan, "evaluation": self.get_evaluation}
        return kind, getter[kind](id)

    # ---------------------------------------------------------------------------------------- jobs

    def create_job(self, kind: str, params: dict | None = None) -> str:
        """A queued job of `kind` with JSON-able `params`; returns its id `job-<16 hex>`."""
        id = f"job-{uuid.uuid4().hex[:16]}"
        now = utcnow()
        with self._session.begin() as s:
            s.add(JobRow(id=id, kind=kind, state="queued", progress=0.0, message="", params=params or {},
                         created_at=now, updated_at=now))
        return id

    def update_job(self, id: str, *, state: str | None = None, progress: float | None = None,
                   message: str | None = None, error: str | None = None,
                   result_id: str | None = None) -> dict:
        """Change the given fields of job `id` (others stay) and return it; progress is a fraction 0..1."""
        if state is not None and state not in JOB_STATES:
            raise InvalidInput(f"job state must be one of {JOB_STATES}, got {state!r}")
        if progress is not None and not 0.0 <= progress <= 1.0:
            raise InvalidInput(f"job progress is a fraction in [0, 1], got {progress!r}")
        changes = {k: v for k, v in dict(state=state, progress=progress, message=message, error=error,
                                         result_id=result_id).items() if v is not None}
        with self._session.begin() as s:
            row = self._get(s, JobRow, id, "job")
            for k, v in changes.items():
                setattr(row, k, v)
            row.updated_at = utcnow()
            s.flush()
            return _job(row)

    def get_job(self, id: str) -> dict:
        """Job `id` as a dict of its columns (state, progress, message, error, params, result_id, times)."""
        with self._session() as s:
            return _job(self._get(s, JobRow, id, "job"))

    def list_jobs(self, state: str | None = None) -> list[dict]:
        """Jobs, newest first, optionally in one state (a restarted service looks for `running` ones)."""
        q = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id.desc())
        if state is not None:
            q = q.where(JobRow.state == state)
        with self._session() as s:
            return [_job(r) for r in s.scalars(q)]

    def create_job_checked(self, kind: str, params: dict, *, max_queued: int | None = None) -> dict:
        """`create_job`, refused with QueueFull while `max_queued` jobs wait already; returns the job."""
        if max_queued is not None:
            with self._session() as s:
                waiting = s.scalar(select(func.count()).select_from(JobRow).where(JobRow.state == "queued"))
            if waiting >= max_queued:
                raise QueueFull(f"{waiting} jobs are waiting already (the service takes {max_queued}): retry when "
                                f"some have run")
        return self.get_job(self.create_job(kind, params))

    def claim_job(self, worker: str) -> dict | None:
        """The oldest queued job, now `running` under `worker`, or None when none waits.  Two workers never
        claim one job: the update that takes it requires it still queued, and one of them loses."""
        for _ in range(5):
            with self._session.begin() as s:
                id = s.scalar(select(JobRow.id).where(JobRow.state == "queued")
                              .order_by(JobRow.created_at, JobRow.id).limit(1))
                if id is None:
                    return None
                now = utcnow()
                taken = s.execute(update(JobRow).where(JobRow.id == id, JobRow.state == "queued").values(
                    state="running", worker=worker, heartbeat_at=now, updated_at=now, attempts=JobRow.attempts + 1,
                    started_at=func.coalesce(JobRow.started_at, now), error=None)).rowcount
            if taken:
                return self.get_job(id)
        return None

    def heartbeat_job(self, id: str, worker: str, *, progress: float | None = None, message: str | None = None,
                      eta_seconds: float | None = None) -> bool | None:
        """`worker` still runs job `id` (with its progress, when given): whether a cancel was asked for, or
        None when the job is no longer this worker's (it was recovered after a missed lease)."""
        values: dict = {"heartbeat_at": utcnow(), "updated_at": utcnow(), "eta_seconds": eta_seconds}
        if progress is not None:
            values["progress"] = min(max(float(progress), 0.0), 1.0)
        if message is not None:
            values["message"] = message[:500]
        with self._session.begin() as s:
            held = s.execute(update(JobRow).where(JobRow.id == id, JobRow.worker == worker,
                                                  JobRow.state == "running").values(**values)).rowcount
            if not held:
                return None
            return bool(s.scalar(select(JobRow.cancel_requested).where(JobRow.id == id)))

    def finish_job(self, id: str, worker: str | None, state: str, *, error: str | None = None,
                   result_id: str | None = None, message: str | None = None, result: dict | None = None) -> bool:
        """Job `id` ends in `state` (succeeded, failed, cancelled), if `worker` still holds it (None: whoever
        does); False when it did not (another worker took it over, or it was over already)."""
        if state not in JOB_FINAL:
            raise InvalidInput(f"a job ends {' or '.join(JOB_FINAL)}, not {state!r}")
        now = utcnow()
        values: dict = dict(state=state, error=error, result_id=result_id, finished_at=now, updated_at=now,
                            eta_seconds=None, result=result)
        if state == "succeeded":
            values["progress"] = 1.0
        if message is not None:
            values["message"] = message[:500]
        q = update(JobRow).where(JobRow.id == id, JobRow.state.in_(("queued", "running")))
        if worker is not None:
            q = q.where(JobRow.worker == worker)
        with self._session.begin() as s:
            return bool(s.execute(q.values(**values)).rowcount)

    def cancel_job(self, id: str) -> dict:
        """Cancel job `id`: a queued one is cancelled at once, a running one when its worker next reports
        (it sees `cancel_requested`); JobConflict for a job that is over."""
        with self._session.begin() as s:
            row = self._get(s, JobRow, id, "job")
            if row.state in JOB_FINAL:
                raise JobConflict(f"job {id} is {row.state} already: there is nothing to cancel")
            row.cancel_requested, row.updated_at = True, utcnow()
            if row.state == "queued":
                row.state, row.finished_at, row.message = "cancelled", utcnow(), "cancelled before it started"
            s.flush()
            return _job(row)

    def release_job(self, id: str, worker: str, *, requeue: bool, reason: str) -> bool:
        """Take job `id` from `worker`, which is gone: back to the queue (to be resumed), or failed with
        `reason`; a job whose cancel was asked for is cancelled instead.  False when `worker` no longer
        held it (someone else recovered it first)."""
        now = utcnow()
        with self._session.begin() as s:
            row = s.get(JobRow, id)
            if row is None or row.state != "running" or row.worker != worker:
                return False
            if row.cancel_requested:
                row.state, row.finished_at, row.message = "cancelled", now, reason
            elif requeue:
                row.state, row.worker, row.heartbeat_at, row.message = "queued", None, None, reason
            else:
                row.state, row.finished_at, row.error = "failed", now, reason
            row.updated_at, row.eta_seconds = now, None
        return True

    def stale_jobs(self, lease: timedelta) -> list[dict]:
        """Running jobs, each with `stale` set when its worker has not reported within `lease`."""
        cutoff = utcnow() - lease
        return [dict(j, stale=j["heartbeat_at"] is None or j["heartbeat_at"] < cutoff)
                for j in self.list_jobs("running")]

    # --------------------------------------------------------------------------------------- pages

    def page_jobs(self, *, limit: int = DEFAULT_PAGE, cursor: str | None = None,
                  state: str | None = None) -> tuple[list[dict], str | None]:
        """One page of jobs, newest first, and the cursor of the next page (None after the last)."""
        q = select(JobRow)
        if state is not None:
            q = q.where(JobRow.state == state)
        with self._session() as s:
            rows = self._page(s, q, JobRow, limit, cursor)
            return [_job(r) for r in rows[:limit]], self._next(rows, limit)

    def page_plans(self, *, limit: int = DEFAULT_PAGE, cursor: str | None = None,
                   profile_id: str | None = None) -> tuple[list[dict], str | None]:
        """One page of plan summaries (every column but the assignment, which is never read), newest first,
        and the next page's cursor."""
        columns = [c for c in PlanRow.__table__.columns if c.name != "assignment"]
        q = select(*columns)
        if profile_id is not None:
            q = q.where(PlanRow.profile_id == profile_id)
        with self._session() as s:
            rows = self._page(s, q, PlanRow, limit, cursor, scalars=False)
            out = []
            for r in rows[:limit]:
                d = dict(r._mapping)
                d["model"] = d.pop("model_ref")
                d["size_mib"] = (d["total_bits"] + d["fixed_bits"]) / 8 / 2**20
                out.append(d)
            return out, self._next(rows, limit)

    def page_profiles(self, *, limit: int = DEFAULT_PAGE, cursor: str | None = None) -> tuple[list[dict], str | None]:
        """One page of profile summaries, newest first (the matrices stay unread: the module count comes from
        the error matrix's header), and the next page's cursor."""
        skip = {"modules", "error", "size_bits", "latency"}
        columns = [c for c in ProfileRow.__table__.columns if c.name not in skip]
        q = select(*columns, func.substr(ProfileRow.error, 1, 256).label("error_head"),
                   (ProfileRow.latency.is_not(None)).label("has_latency"))
        with self._session() as s:
            rows = self._page(s, q, ProfileRow, limit, cursor, scalars=False)
            out = []
            for r in rows[:limit]:
                d = dict(r._mapping)
                d["n_modules"] = _npy_rows(d.pop("error_head"))
                d["model"], d["calibration"] = d.pop("model_ref"), d.pop("calibration_ref")
                out.append(d)
            return out, self._next(rows, limit)

    def page_evaluations(self, *, limit: int = DEFAULT_PAGE, cursor: str | None = None,
                         plan_id: str | None = None) -> tuple[list[Evaluation], str | None]:
        """One page of evaluations, newest first, and the next page's cursor."""
        q = select(EvaluationRow)
        if plan_id is not None:
            q = q.where(EvaluationRow.plan_id == plan_id)
        with self._session() as s:
            rows = self._page(s, q, EvaluationRow, limit, cursor)
            return [_evaluation(r) for r in rows[:limit]], self._next(rows, limit)

    @staticmethod
    def _page(s: Session, q, table, limit: int, cursor: str | None, *, scalars: bool = True) -> list:
        # keyset pagination on (created_at, id), newest first: a page costs the same at any depth, and rows
        # added meanwhile neither repeat nor skip one; one row more than asked tells whether a next page exists
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        if cursor:
            created_at, id = decode_cursor(cursor)
            q = q.where(or_(table.created_at < created_at, (table.created_at == created_at) & (table.id < id)))
        q = q.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)
        return list(s.scalars(q) if scalars else s.execute(q))

    @staticmethod
    def _next(rows: list, limit: int) -> str | None:
        if len(rows) <= limit:
            return None
        last = rows[limit - 1]
        return encode_cursor(last.created_at, last.id)

    # ------------------------------------------------------------------------------------- helpers

    def _get(self, s: Session, table: type[_Row], id: str, what: str) -> _Row:
        row = s.get(table, id)
        if row is None:
            hint = "" if what == "job" else "; run `bitplan ls` to see the stored ids"
            raise NotFound(f"no {what} with id {id!r} in {self.url}{hint}")
        return row

    @staticmethod
    def _idempotent(write, get):
        # Check-then-insert races with another writer of the same id (or the same new model row):
        # on a conflict, the stored row wins; if there is none, the conflict was a parent row, try again.
        for attempt in range(2):
            try:
                return write()
            except IntegrityError as conflict:
                try:
                    return get()
                except NotFound:
                    if attempt:
                        raise conflict from None


# ----------------------------------------------------------------------------------------- copy


def copy_store(source: Store, target: Store, *, batch: int = 200) -> dict[str, dict[str, int]]:
    """Copy every row of `source` that `target` lacks (by primary key) into `target`, parents before
    children, in one transaction: `{table: {"copied": n, "present": n}}`.  Both are migrated to head when
    opened, so a SQLite store of any age goes into a new PostgreSQL database whole; run again, it copies
    only what was added since.  Rows are copied as stored (blobs as bytes, times as UTC): ids, plans'
    content ids included, stay what they were."""
    if source.engine.url == target.engine.url:
        raise InvalidInput(f"{source.url} is both the source and the target: name another database to copy into")
    counts: dict[str, dict[str, int]] = {}
    with source.engine.connect() as src, target.engine.begin() as dst:
        for table in Base.metadata.sorted_tables:
            key = table.c.id
            present = set(dst.scalars(select(key)))
            copied = 0
            rows = src.execution_options(yield_per=batch).execute(select(table).order_by(key))
            for part in rows.partitions():
                new = [dict(r._mapping) for r in part if r.id not in present]
                if new:
                    dst.execute(table.insert(), new)
                    copied += len(new)
            counts[table.name] = {"copied": copied, "present": len(present)}
    return counts
