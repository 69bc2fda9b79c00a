"""Where the database lives and how to open it: URL resolution, SQLite pragmas, migrations on open.

The schema is made only by the alembic migrations in `bitplan.db.migrations`, run by
`make_engine` on every open (a no-op when the database is already at head).

SQLite is the default; PostgreSQL (`postgresql://user:password@host/db`, the driver from the `postgres`
extra: psycopg 3) serves a team: several service replicas and workers on several hosts.  The same
migrations run on both, each open under a lock (a file beside SQLite, an advisory lock on PostgreSQL),
so processes starting at once on a fresh database do not create its tables twice.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.pool import StaticPool

from bitplan.db.types import InvalidInput

ENV_VAR = "BITPLAN_DB"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# pg_advisory_xact_lock's key for "migrating bitplan's schema": any constant that other applications
# sharing the server are unlikely to use
PG_MIGRATE_LOCK = 0x6269_7470_6C61_6E  # "bitplan"


def database_url(url: str | None = None) -> str:
    """The SQLAlchemy URL to use: `url`, else `$BITPLAN_DB` (URL or file path), else the user data dir."""
    url = url or os.environ.get(ENV_VAR) or None
    if url is None:
        data_dir = Path(platformdirs.user_data_dir("bitplan"))
        data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{data_dir / 'bitplan.db'}"
    # "://" tells a URL from a path; a bare path (relative, ~, Windows drive) becomes a SQLite file.
    if "://" in url:
        return url
    return f"sqlite:///{Path(url).expanduser().resolve()}"


def _sa_url(url: str) -> URL:
    """The parsed URL, PostgreSQL's driver named: `postgres://` (as many hosts write it) and a bare
    `postgresql://` mean psycopg 3, the driver the `postgres` extra installs (SQLAlchemy 2.0 would take
    psycopg2 for the bare name)."""
    try:
        sa_url = make_url(url)
    except ArgumentError:
        raise InvalidInput(f"{url[:60]!r} is neither a SQLite file nor a database URL (sqlite:///FILE, "
                           "postgresql://USER:PASSWORD@HOST/DB)") from None
    if sa_url.drivername in ("postgres", "postgresql"):
        sa_url = sa_url.set(drivername="postgresql+psycopg")
    return sa_url


def _is_memory(url) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def alembic_config(url: str | None = None) -> Config:
    """An alembic Config built in code, pointing at the installed migrations (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolates '%'; URLs with escaped passwords contain it.
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database behind `engine` to `revision`, on one of its connections.  Processes opening
    one new SQLite file at once migrate it one after the other (a file lock beside it): each would
    otherwise read "no tables" and create them twice."""
    database = engine.url.database
    if engine.url.get_backend_name() == "sqlite" and database not in (None, "", ":memory:"):
        from bitplan.db.files import exclusive

        with exclusive(f"{database}.migrate.lock"):
            _upgrade(engine, revision)
    else:
        _upgrade(engine, revision)


def _upgrade(engine: Engine, revision: str) -> None:
    cfg = alembic_config()
    try:
        conn = engine.connect()
    except OperationalError as e:
        where = engine.url.render_as_string(hide_password=True)
        reason = str(e.orig or e).strip().splitlines()[0][:200]
        raise InvalidInput(f"cannot open the database {where}: {reason}") from None
    with conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            # Batch migrations recreate tables; with foreign keys on, dropping a referenced table
            # fails or cascades. The pragma is ignored inside a transaction, so set it first.
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        try:
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    # held until this transaction ends: a second process waits, then finds the schema
                    # at head (PostgreSQL's DDL is transactional, so it sees all of it or none)
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_MIGRATE_LOCK})")
                # Passing the connection (not the URL) is what makes an in-memory database work.
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration to {revision} broke foreign keys: {broken[:5]}")
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


def make_engine(url: str | None = None, *, migrate: bool = True) -> Engine:
    """An engine for `database_url(url)`, SQLite tuned (WAL, foreign keys), migrated to head."""
    sa_url = _sa_url(database_url(url))
    kwargs: dict = {}
    if _is_memory(sa_url):
        # One shared connection, or each checkout would see its own empty database.
        kwargs = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
    elif sa_url.get_backend_name() != "sqlite":
        # a server restarts or drops idle connections: test each one before handing it out
        kwargs = {"pool_pre_ping": True}
    try:
        engine = create_engine(sa_url, **kwargs)
    except (ImportError, NoSuchModuleError) as e:
        extra = " (pip install 'bitplan[postgres]')" if sa_url.get_backend_name() == "postgresql" else ""
        raise InvalidInput(f"no driver for {sa_url.drivername} databases here{extra}: {e}"[:300]) from None
    if sa_url.get_backend_name() == "sqlite":
        memory = _is_memory(sa_url)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            if not memory:
                # WAL: readers (a polling client) never block the writer (a running job).
                cur.execute("PRAGMA journal_mode=WAL")
            # SQLite leaves foreign keys off unless asked, on every connection.
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    if migrate:
        upgrade(engine)
    return engine
