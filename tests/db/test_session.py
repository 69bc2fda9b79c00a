"""Opening the database: where it lives, SQLite pragmas, and migrations that match the tables."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from bitplan.db import session as db_session
from bitplan.db.session import database_url, make_engine
from bitplan.db.store import Store
from bitplan.db.tables import Base


def test_migrations_match_tables(tmp_path):
    engine = make_engine(str(tmp_path / "m.db"))
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []
    engine.dispose()


def test_schema_comes_from_migrations_only(tmp_path):
    engine = make_engine(str(tmp_path / "m.db"), migrate=False)
    assert inspect(engine).get_table_names() == []
    db_session.upgrade(engine)
    tables = set(inspect(engine).get_table_names())
    assert tables == set(Base.metadata.tables) | {"alembic_version"}
    engine.dispose()


def test_downgrade_to_base_and_back(tmp_path):
    engine = make_engine(str(tmp_path / "m.db"))
    cfg = db_session.alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    db_session.upgrade(engine)
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_file_db_is_wal_with_foreign_keys(tmp_path):
    engine = make_engine(str(tmp_path / "w.db"))
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_memory_db_works(make_profile):
    with Store("sqlite://") as s:
        p = s.save_profile(make_profile())
        assert s.get_profile(p.id).id == p.id


def test_opening_twice_is_a_no_op_upgrade(tmp_path, make_profile):
    path = str(tmp_path / "twice.db")
    a, b = Store(path), Store(path)  # the second open runs `upgrade head` on an up-to-date schema
    p = a.save_profile(make_profile())
    assert b.get_profile(p.id).id == p.id
    with b.engine.connect() as conn:
        head = ScriptDirectory.from_config(db_session.alembic_config()).get_current_head()
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == [head]
    a.close(), b.close()


def test_database_url_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("BITPLAN_DB", raising=False)
    monkeypatch.setattr(db_session.platformdirs, "user_data_dir", lambda app: str(tmp_path / "data" / app))
    assert database_url() == f"sqlite:///{tmp_path / 'data' / 'bitplan' / 'bitplan.db'}"
    assert (tmp_path / "data" / "bitplan").is_dir()
    monkeypatch.setenv("BITPLAN_DB", str(tmp_path / "env.db"))
    assert database_url() == f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("BITPLAN_DB", "postgresql://u:p@h/db")
    assert database_url() == "postgresql://u:p@h/db"
    assert database_url("sqlite:///explicit.db") == "sqlite:///explicit.db"


def test_store_honours_bitplan_db(tmp_path, monkeypatch, make_profile):
    monkeypatch.setenv("BITPLAN_DB", str(tmp_path / "env.db"))
    with Store() as s:
        s.save_profile(make_profile())
    assert (tmp_path / "env.db").exists()
    with Store(str(tmp_path / "env.db")) as s:
        assert len(s.list_profiles()) == 1
