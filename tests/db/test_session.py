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


def test_migrations_match_tables(db_url):
    engine = make_engine(db_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []
    engine.dispose()


def test_schema_comes_from_migrations_only(db_url):
    engine = make_engine(db_url, migrate=False)
    assert inspect(engine).get_table_names() == []
    db_session.upgrade(engine)
    tables = set(inspect(engine).get_table_names())
    assert tables == set(Base.metadata.tables) | {"alembic_version"}
    engine.dispose()


def test_downgrade_to_base_and_back(db_url):
    engine = make_engine(db_url)
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


def test_opening_twice_is_a_no_op_upgrade(db_url, make_profile):
    a, b = Store(db_url), Store(db_url)  # the second open runs `upgrade head` on an up-to-date schema
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


def test_0004_splits_the_quantizer_off_the_estimator(db_url, make_profile):
    """A database at 0003 with profiles whose estimator carries GPTQ as a suffix opens migrated: the estimator
    alone, the quantizer in its own column (GPTQ with the settings those profiles were made with)."""
    from sqlalchemy import insert, select

    from bitplan.db.store import _profile_row
    from bitplan.db.tables import CalibrationRow, ModelRow, ProfileRow
    from bitplan.db.types import Quantizer

    path = db_url
    engine = make_engine(path, migrate=False)
    db_session.upgrade(engine, "0003")
    assert "quantizer" not in {c["name"] for c in inspect(engine).get_columns("profiles")}
    old = {"prof-gptq": "fisher/gptq", "prof-rtn": "hessian", "prof-imatrix": "imatrix:0123456789abcdef/gptq"}
    with engine.begin() as conn:
        for i, (id, estimator) in enumerate(old.items()):
            p = make_profile(i, id=id)
            row = _profile_row(p)
            if i == 0:
                conn.execute(insert(CalibrationRow.__table__).values(id="fp-cal", name="c", n_tokens=0, description="",
                                                                     created_at=p.created_at))
            if i < 2:
                conn.execute(insert(ModelRow.__table__).values(id=row.model_id, name=p.model.name, source="",
                                                               n_params=0, created_at=p.created_at))
            values = {c.name: getattr(row, c.name) for c in ProfileRow.__table__.columns if c.name != "quantizer"}
            conn.execute(insert(ProfileRow.__table__).values({**values, "estimator": estimator}))
    engine.dispose()

    with Store(path) as store:  # opening migrates to head
        got = {p.id: p for p in store.list_profiles()}
        with store.engine.connect() as conn:
            head = ScriptDirectory.from_config(db_session.alembic_config()).get_current_head()
            assert head == "0006"
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == head
    assert (got["prof-gptq"].estimator, got["prof-gptq"].quantizer) == ("fisher", Quantizer(method="gptq"))
    assert got["prof-gptq"].quantizer.model_dump() == {"method": "gptq", "damp": 0.1, "block_size": 128,
                                                       "act_order": True}
    assert (got["prof-rtn"].estimator, got["prof-rtn"].quantizer) == ("hessian", Quantizer())
    assert got["prof-imatrix"].estimator == "imatrix:0123456789abcdef"
    assert got["prof-imatrix"].quantizer.method == "gptq"
    assert got["prof-rtn"].error.shape == (5, 4)  # the rest of the row is as stored

    # and back: the suffix returns, the column goes
    engine = make_engine(path, migrate=False)
    cfg = db_session.alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0003")
        rows = dict(conn.execute(select(ProfileRow.__table__.c.id, ProfileRow.__table__.c.estimator)).all())
    assert rows == old
    assert "quantizer" not in {c["name"] for c in inspect(engine).get_columns("profiles")}
    engine.dispose()
