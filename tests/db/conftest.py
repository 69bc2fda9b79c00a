"""Small profiles, plans and evaluations; and the databases the store's tests run on: a fresh SQLite file
and a fresh database on a PostgreSQL server that this test session starts (`db_url`, `store`)."""

from __future__ import annotations

import glob
import importlib.util
import itertools
import os
import shutil
import subprocess
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from bitplan.db.types import (CalibrationRef, Evaluation, ModelRef, Module, Plan, Profile,
                              content_id, parse_options)


@pytest.fixture
def make_profile():
    """`make_profile(seed, **overrides)`: a 5-module x 4-option profile with random matrices."""

    def make(seed: int = 0, **overrides) -> Profile:
        rng = np.random.default_rng(seed)
        options = parse_options("2,4,8,16", group_sizes=64)
        shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
        modules = [Module(name=f"model.layers.{i}.proj", shape=s, layer=i, role="mlp")
                   for i, s in enumerate(shapes)]
        modules[-1] = Module(name="lm_head", shape=shapes[-1], role="head")
        fields = dict(
            id=f"prof-{seed:016x}",
            model=ModelRef(name="SmolLM2-135M", fingerprint=f"fp-model-{seed % 2}", source="/ckpt/smol"),
            calibration=CalibrationRef(name="shakespeare", fingerprint="fp-cal", n_tokens=4096),
            estimator="hessian", device="cpu", options=options, modules=modules,
            error=rng.exponential(size=(len(modules), len(options))),
            size_bits=np.array([[o.size_bits(*m.shape) for o in options] for m in modules]),
            fixed_bits=123_456_789, seconds=1.25,
            created_at=datetime(2025, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seed),
        )
        fields.update(overrides)
        return Profile(**fields)

    return make


@pytest.fixture
def make_plan():
    """`make_plan(profile, **overrides)`: every module of `profile` at its 4-bit option."""

    def make(profile: Profile, **overrides) -> Plan:
        o = profile.options[1]
        total = int(profile.size_bits[:, 1].sum())
        fields = dict(
            id=content_id(profile.id, "3.5bpw", prefix="plan-"), profile_id=profile.id, model=profile.model,
            budget="3.5bpw", budget_bits=2**40 + 7, allocator="ilp", params={"backend": "highs", "gap": 1e-4},
            pins=["lm_head>=8"], assignment={m.name: o for m in profile.modules}, total_bits=total,
            fixed_bits=profile.fixed_bits, n_params=profile.n_params,
            bits_per_weight=total / profile.n_params,
            predicted_error=float(profile.error[:, 1].sum()), status="optimal", solve_seconds=0.1 + 0.2,
            created_at=datetime.now(timezone.utc),
        )
        fields.update(overrides)
        return Plan(**fields)

    return make


@pytest.fixture
def make_evaluation():
    def make(plan_id: str | None, **overrides) -> Evaluation:
        fields = dict(plan_id=plan_id, checkpoint="/tmp/ckpt-q", corpus="shakespeare-eval", n_tokens=8192,
                      window=512, perplexity=37.812345678901234, bytes_on_disk=98_765_432, seconds=17.0)
        fields.update(overrides)
        return Evaluation(**fields)

    return make


# ------------------------------------------------------------------------------------- PostgreSQL

REQUIRE_POSTGRES = "BITPLAN_REQUIRE_POSTGRES"
PG_USER = "bitplan"


def _pg_bin() -> Path | None:
    """The newest installed PostgreSQL's programs (Debian's package puts them off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


@pytest.fixture(scope="session")
def postgres(free_port):
    """A PostgreSQL server of its own for this test session (Debian's package: `make sysdeps` installs it):
    a new cluster in a temporary folder, on a free loopback port, trusting local connections, stopped and
    removed at the end; its base URL (`postgresql://bitplan@127.0.0.1:PORT`).  initdb refuses to run as
    root, so as root the server runs as the `postgres` user (made by the package), else `nobody`.  Where
    the programs are missing the test is skipped, except under $BITPLAN_REQUIRE_POSTGRES (`make test` sets
    it): it fails."""
    bin_dir = _pg_bin()
    missing = None
    if bin_dir is None:
        missing = "PostgreSQL's server programs are not installed (apt-get install postgresql; `make sysdeps`)"
    elif importlib.util.find_spec("psycopg") is None:
        missing = "the PostgreSQL driver is not installed (pip install 'bitplan[postgres]')"
    if missing:
        if os.environ.get(REQUIRE_POSTGRES):
            pytest.fail(f"{REQUIRE_POSTGRES} is set and {missing}")
        pytest.skip(missing)
    # not pytest's tmp_path: its folders are private to root, and the server may run as another user
    home = Path(tempfile.mkdtemp(prefix="bitplan-pg-"))
    run_as: dict = {}
    if os.geteuid() == 0:
        account = next((a for a in ("postgres", "nobody") if _has_user(a)), None)
        if account is None:
            pytest.fail("running as root and neither a postgres nor a nobody user exists to run PostgreSQL as")
        import pwd

        entry = pwd.getpwnam(account)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        run_as = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    port = free_port()

    def pg(*argv: str) -> None:
        done = subprocess.run([str(bin_dir / argv[0]), *argv[1:]], cwd=home, capture_output=True, text=True,
                              timeout=120, **run_as)
        if done.returncode:
            pytest.fail(f"{argv[0]} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-800:]}")

    data = home / "data"
    # no fsync: a test server that crashes is thrown away anyway, and the tests run faster without it
    pg("initdb", "-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync")
    options = (f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
               f"-c full_page_writes=off -c max_connections=200")
    pg("pg_ctl", "-D", str(data), "-l", str(home / "server.log"), "-o", options, "-w", "-t", "60", "start")
    try:
        yield f"postgresql://{PG_USER}@127.0.0.1:{port}"
    finally:
        subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], cwd=home,
                       capture_output=True, timeout=60, **run_as)
        shutil.rmtree(home, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="session")
def new_pg_database(postgres):
    """`new_pg_database()`: the URL of a new, empty database on the session's server."""
    import psycopg

    count = itertools.count()

    def make() -> str:
        name = f"t{os.getpid()}_{next(count)}"
        with psycopg.connect(f"{postgres}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"{postgres}/{name}"

    return make


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """A fresh, empty database: a SQLite file, then a PostgreSQL database (tests taking it run on both)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bitplan.db'}"
    return request.getfixturevalue("new_pg_database")()


@pytest.fixture
def store(db_url):
    """A store over `db_url` (on SQLite and on PostgreSQL), closed after the test."""
    from bitplan.db.store import Store

    s = Store(db_url)
    yield s
    s.close()
