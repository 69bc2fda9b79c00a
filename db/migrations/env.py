"""Alembic environment for bitplan's schema; run by `bitplan.db.session.upgrade` and by the `alembic` CLI.

The application passes its open connection in `config.attributes["connection"]` (so an
in-memory database is migrated in place); the CLI gives none and the URL is used instead:
`sqlalchemy.url` from the ini file, else `$BITPLAN_DB`, else the user data dir.

Writing the next revision (from the repository root):

    BITPLAN_DB=/tmp/dev.db alembic -c db/alembic.ini upgrade head
    # edit db/tables.py, then:
    BITPLAN_DB=/tmp/dev.db alembic -c db/alembic.ini revision --autogenerate --rev-id 0002 -m "add latency"

Read the generated `db/migrations/versions/0002_add_latency.py` before keeping it (autogenerate
misses renames and check constraints); `tests/db/test_store.py` fails until migrations and
`tables.py` agree.
"""

from __future__ import annotations

import logging.config

from alembic import context
from sqlalchemy import create_engine, pool

from bitplan.db import tables
from bitplan.db.session import database_url

config = context.config
target_metadata = tables.Base.metadata

if config.config_file_name is not None and "connection" not in config.attributes:
    # Only the CLI configures logging; the application keeps its own.
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def _render_item(type_, obj, autogen_context):
    """Write UTCDateTime as a plain SQLAlchemy type, so revisions never import bitplan code."""
    if type_ == "type" and isinstance(obj, tables.UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: batch mode recreates the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        render_item=_render_item,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    """`alembic upgrade --sql`: print the DDL instead of running it."""
    url = config.get_main_option("sqlalchemy.url") or database_url()
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=url.startswith("sqlite"), render_item=_render_item)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or database_url()
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
