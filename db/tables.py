"""The database schema: one table per stored kind, as SQLAlchemy 2 typed declarative classes.

These classes are the target of the migrations, never a way to create the schema: only
`db/migrations/versions/` creates tables, and a test checks that the two agree.
Rows are storage; `db/store.py` converts them to and from the types in `db/types.py`.
Every integer is 64-bit: a 671B-parameter model's sizes in bits pass 2**31 by far.
Floats are doubles (plain `Float` is single precision on MySQL) so values come back exactly.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, CheckConstraint, DateTime, Double, ForeignKey, Index,
                        LargeBinary, MetaData, String, Text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Named constraints let SQLite batch migrations (which recreate tables) find them again later.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
JOB_FINAL = ("succeeded", "failed", "cancelled")


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC on every backend: SQLite drops offsets, so store UTC and re-attach it."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        # A naive datetime is taken to be UTC: the vocabulary only ever makes aware ones.
        value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # the model's fingerprint
    name: Mapped[str] = mapped_column(String(512))
    source: Mapped[str] = mapped_column(Text, default="")
    n_params: Mapped[int] = mapped_column(BigInteger, default=0)
    config: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class CalibrationRow(Base):
    __tablename__ = "calibration_sets"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # the calibration set's fingerprint
    name: Mapped[str] = mapped_column(String(512), default="")
    n_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ProfileRow(Base):
    __tablename__ = "profiles"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    calibration_id: Mapped[str | None] = mapped_column(ForeignKey("calibration_sets.id"), index=True,
                                                       nullable=True)
    # The refs exactly as the profile gave them: the same fingerprint may be loaded from another
    # source (path vs embedded name), and `apply` must load what this profile measured.
    model_ref: Mapped[dict[str, Any]] = mapped_column(JSON)
    calibration_ref: Mapped[dict[str, Any]] = mapped_column(JSON)
    estimator: Mapped[str] = mapped_column(String(64))
    quantizer: Mapped[dict[str, Any]] = mapped_column(JSON)  # Quantizer's dump, e.g. {"method": "rtn"}
    device: Mapped[str] = mapped_column(String(64), default="cpu")
    options: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # zlib(JSON list of Module dicts): 45k MoE modules are megabytes of repetitive text.
    modules: Mapped[bytes] = mapped_column(LargeBinary)
    # [M, O] matrices in np.save format (dtype and shape travel with the bytes), possibly zlib'd.
    error: Mapped[bytes] = mapped_column(LargeBinary)
    size_bits: Mapped[bytes] = mapped_column(LargeBinary)
    fixed_bits: Mapped[int] = mapped_column(BigInteger, default=0)
    seconds: Mapped[float] = mapped_column(Double, default=0.0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # Optional [M, O, B] latency seconds (np.save format), its batch sizes and source (migration 0002).
    latency: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    latency_batches: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    latency_source: Mapped[str | None] = mapped_column(String(256), nullable=True)


class PlanRow(Base):
    __tablename__ = "plans"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    profile_id: Mapped[str] = mapped_column(ForeignKey("profiles.id"), index=True)
    model_ref: Mapped[dict[str, Any]] = mapped_column(JSON)
    budget: Mapped[str] = mapped_column(String(128))
    budget_bits: Mapped[int] = mapped_column(BigInteger)
    allocator: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    pins: Mapped[list[str]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(128))
    total_bits: Mapped[int] = mapped_column(BigInteger)
    fixed_bits: Mapped[int] = mapped_column(BigInteger, default=0)
    n_params: Mapped[int] = mapped_column(BigInteger)
    bits_per_weight: Mapped[float] = mapped_column(Double)
    predicted_error: Mapped[float] = mapped_column(Double)
    solve_seconds: Mapped[float] = mapped_column(Double)
    assignment: Mapped[dict[str, dict[str, Any]]] = mapped_column(JSON)  # module name -> Option dict
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    predicted_latency: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)  # batch -> s
    latency_source: Mapped[str | None] = mapped_column(String(256), nullable=True)


class EvaluationRow(Base):
    __tablename__ = "evaluations"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    plan_id: Mapped[str | None] = mapped_column(ForeignKey("plans.id"), index=True, nullable=True)
    checkpoint: Mapped[str] = mapped_column(Text)
    corpus: Mapped[str] = mapped_column(String(512))
    n_tokens: Mapped[int] = mapped_column(BigInteger)
    window: Mapped[int] = mapped_column(BigInteger)
    perplexity: Mapped[float] = mapped_column(Double)
    bytes_on_disk: Mapped[int] = mapped_column(BigInteger, default=0)
    device: Mapped[str] = mapped_column(String(64), default="cpu")
    seconds: Mapped[float] = mapped_column(Double, default=0.0)
    speed: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    engine: Mapped[str] = mapped_column(String(32), default="bitplan", server_default="bitplan")
    kl_divergence: Mapped[float | None] = mapped_column(Double, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="state"),
        Index("ix_jobs_created_at_id", "created_at", "id"),  # pages of the newest first (migration 0006)
    )

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress: Mapped[float] = mapped_column(Double, default=0.0)  # 0..1
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    result_id: Mapped[str | None] = mapped_column(String(128), nullable=True)  # a profile, plan or evaluation
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # Who runs it (migration 0006): `host:pid:start` of the worker process, and when it last said it was
    # alive; a running job whose worker is gone (dead pid, or no heartbeat within the lease) is recovered.
    worker: Mapped[str | None] = mapped_column(String(256), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    attempts: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # claims so far
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    eta_seconds: Mapped[float | None] = mapped_column(Double, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # what result_id cannot hold
