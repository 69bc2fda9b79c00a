"""The store on PostgreSQL (a server this test session starts, tests/db/conftest.py): URLs, one-line errors,
migrations raced by several processes, workers claiming jobs from several connections, copying a SQLite store
into PostgreSQL, and the service over PostgreSQL, two replicas on one database.  The store's other tests run
on both databases through `db_url`."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from sqlalchemy import inspect

from bitplan.db.session import _sa_url, make_engine
from bitplan.db.store import Store, copy_store
from bitplan.db.tables import Base
from bitplan.db.types import InvalidInput

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize("given,driver", [
    ("postgresql://u:p@h/db", "postgresql+psycopg"),
    ("postgres://u:p@h/db", "postgresql+psycopg"),
    ("postgresql+psycopg://u@h/db", "postgresql+psycopg"),
    ("sqlite:///x.db", "sqlite"),
], ids=["postgresql", "postgres", "explicit", "sqlite"])
def test_postgres_urls_take_psycopg(given, driver):
    assert _sa_url(given).drivername == driver


def test_a_server_that_is_not_there_is_one_line(postgres):
    dead = postgres.rsplit(":", 1)[0] + ":1/none"  # port 1: nothing listens
    with pytest.raises(InvalidInput, match=r"^cannot open the database postgresql\+psycopg://bitplan@127.0.0.1:1/none: ") as e:
        Store(dead)
    assert "\n" not in str(e.value)


def test_a_url_of_no_known_database_is_one_line():
    with pytest.raises(InvalidInput, match="no driver for nosuchdb"):
        make_engine("nosuchdb://x/y")


def test_processes_opening_a_fresh_database_at_once_migrate_it_once(new_pg_database):
    import subprocess
    import sys

    url = new_pg_database()
    code = "import sys; from bitplan.db.store import Store; Store(sys.argv[1]).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    engine = make_engine(url, migrate=False)
    assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1
    engine.dispose()


def test_workers_on_several_connections_never_claim_one_job(new_pg_database):
    url = new_pg_database()
    stores = [Store(url) for _ in range(4)]
    ids = {stores[0].create_job("plan", {"i": i}) for i in range(40)}
    claimed: list[str] = []
    lock = threading.Lock()

    def work(store: Store, name: str) -> None:
        while (job := store.claim_job(name)) is not None:
            with lock:
                claimed.append(job["id"])

    threads = [threading.Thread(target=work, args=(s, f"w{i}")) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(claimed) == sorted(ids)  # each once
    assert {j["attempts"] for j in stores[0].list_jobs("running")} == {1}
    for s in stores:
        s.close()


# ------------------------------------------------------------------------------------------ copy


@pytest.fixture
def sqlite_store(tmp_path, make_profile, make_plan, make_evaluation):
    """A SQLite store with two profiles, a plan of each, an evaluation, and a finished and a queued job."""
    store = Store(str(tmp_path / "team.db"))
    for seed in (0, 1):
        profile = store.save_profile(make_profile(seed))
        plan = store.save_plan(make_plan(profile))
    store.save_evaluation(make_evaluation(plan.id))
    done = store.create_job("profile", {"model": "smollm2-135m"})
    store.update_job(done, state="succeeded", progress=1.0, result_id="prof-0000000000000000")
    store.create_job("apply", {"plan": plan.id, "out": "/srv/out/q"})
    yield store
    store.close()


def _everything(store: Store) -> dict:
    return {"profiles": [p.to_dict() for p in store.list_profiles()], "plans": store.list_plans(),
            "evaluations": store.list_evaluations(), "jobs": store.list_jobs(),
            "models": [store.get_model(p.model.fingerprint) for p in store.list_profiles()]}


def test_copy_sqlite_into_postgres(sqlite_store, new_pg_database):
    target = Store(new_pg_database())
    counts = copy_store(sqlite_store, target)
    assert counts["profiles"] == {"copied": 2, "present": 0} and counts["jobs"]["copied"] == 2
    assert _everything(target) == _everything(sqlite_store)
    assert target.get_profile("prof-0000000000000001").error.tobytes() == \
        sqlite_store.get_profile("prof-0000000000000001").error.tobytes()
    # again: nothing new to copy; a row added since is the one copied
    assert all(c["copied"] == 0 for c in copy_store(sqlite_store, target).values())
    sqlite_store.create_job("eval", {"checkpoint": "smollm2-135m"})
    assert copy_store(sqlite_store, target)["jobs"] == {"copied": 1, "present": 2}
    target.close()


def test_copy_into_itself_is_refused(sqlite_store):
    with pytest.raises(InvalidInput, match="both the source and the target"):
        copy_store(sqlite_store, Store(sqlite_store.url))


def test_db_copy_command(sqlite_store, new_pg_database, capsys):
    from bitplan.planner.app.cli import main

    url = new_pg_database()
    assert main(["db", "copy", "--from", sqlite_store.url, "--to", url, "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tables"]["plans"] == {"copied": 2, "present": 0} and out["to"].startswith("postgresql+psycopg://")
    assert main(["db", "copy", "--db", sqlite_store.url, "--to", url, "-q"]) == 0
    assert "plans                    0 copied        2 there already" in capsys.readouterr().out
    # bad input: one line, exit 2, no traceback
    dead = url.rsplit(":", 1)[0] + ":1/none"
    for argv, message in [(["--to", dead], "cannot open the database"), (["--to", "nosuchdb://x"], "no driver"),
                          (["--to", sqlite_store.url], "both the source and the target")]:
        assert main(["db", "copy", "--from", sqlite_store.url, *argv, "-q"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


# --------------------------------------------------------------------------------------- service


@pytest.fixture
def replicas(new_pg_database):
    """Two apps over one PostgreSQL database (two service replicas), the database holding one profile."""
    from fastapi.testclient import TestClient

    from bitplan.planner import synthetic
    from bitplan.planner.app.service import create_app

    url = new_pg_database()
    with Store(url) as store:
        store.save_profile(synthetic.synthetic_profile())
    with TestClient(create_app(url, token="")) as a, TestClient(create_app(url, token="")) as b:
        yield a, b, url


def test_two_replicas_share_one_database(replicas):
    a, b, url = replicas
    made = []
    for i, c in enumerate((a, b) * 3):
        r = c.post("/v1/plans", json={"profile_id": "prof-synthetic", "budget": f"{3 + i / 4}bpw",
                                      "allocator": "greedy"})
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
    for c in (a, b):  # each replica sees every plan, page by page
        seen, cursor = [], None
        while True:
            page = c.get("/v1/plans", params={"limit": 4, **({"cursor": cursor} if cursor else {})}).json()
            seen += [p["id"] for p in page["items"]]
            if not (cursor := page["next_cursor"]):
                break
        assert sorted(seen) == sorted(made) and len(seen) == len(set(seen))
        assert c.get(f"/v1/plans/{made[0]}").json()["id"] == made[0]
    job = a.post("/v1/jobs", json={"kind": "plan", "params": {"profile": "prof-synthetic", "budget": "3bpw"}})
    assert job.status_code == 202, job.text
    assert b.post(f"/v1/jobs/{job.json()['id']}/cancel").json()["state"] == "cancelled"
    assert a.get(f"/v1/jobs/{job.json()['id']}").json()["state"] == "cancelled"
    # bad input is the same 4xx as on SQLite, and names no server
    r = b.post("/v1/plans", json={"profile_id": "prof-nope", "budget": "3bpw"})
    assert r.status_code == 404 and "127.0.0.1" not in r.text and "the store" in r.text


def test_a_long_budget_string_is_refused_not_truncated(replicas):
    a, _, _ = replicas
    # PostgreSQL enforces String(128) where SQLite does not: the request must be refused before the insert
    r = a.post("/v1/plans", json={"profile_id": "prof-synthetic", "budget": "3." + "0" * 300 + "bpw"})
    assert r.status_code in (201, 422), r.text
    if r.status_code == 201:
        assert len(r.json()["budget"]) <= 128


def test_httpx_reaches_a_live_server_over_postgres(new_pg_database, live_server):
    """uvicorn on a real socket, as test_service.py runs it, over PostgreSQL."""
    from bitplan.planner import synthetic
    from bitplan.planner.app.service import create_app

    url = new_pg_database()
    Store(url).save_profile(synthetic.synthetic_profile())
    with live_server(create_app(url, token="")) as base:
        with httpx.Client(base_url=base, timeout=30) as c:
            r = c.post("/v1/plans", json={"profile_id": "prof-synthetic", "budget": "3.5bpw", "allocator": "ilp"})
            assert r.status_code == 201 and r.json()["status"] == "optimal", r.text
            assert c.get("/v1/profiles").json()["items"][0]["n_modules"] == 211
