"""`bitplan COMMAND --server URL`: the command runs as a job of a real `bitplan serve` (its own process,
one worker), the CLI follows it to the end and prints what it made; what the server refuses, and a
server that is not there, are one line and a non-zero exit."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from bitplan.db.store import Store


@pytest.fixture()
def server(tmp_path, make_profile, free_port):
    """`bitplan serve` on a free port with one worker, its roots `tmp_path/root`, one stored profile."""
    root = tmp_path / "root"
    root.mkdir()
    url = str(tmp_path / "served.db")
    profile = Store(url).save_profile(make_profile())
    port = free_port()
    env = dict(os.environ, PYTHONSAFEPATH="1", BITPLAN_ROOTS=str(root), BITPLAN_TOKEN="s3cret")
    proc = subprocess.Popen([sys.executable, "-m", "bitplan.planner.app.cli", "serve", "--db", url, "--port",
                             str(port), "--workers", "1", "-q"], env=env)
    address = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(address + "/docs", timeout=1)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "bitplan serve did not start"
            time.sleep(0.2)
    yield address, url, profile, root
    proc.terminate()
    proc.wait(timeout=30)


def test_a_plan_runs_on_the_server(server, run_cli, monkeypatch):
    address, url, profile, _ = server
    monkeypatch.setenv("BITPLAN_TOKEN", "s3cret")
    code, out, err = run_cli("plan", profile.id, "--budget", "3.5bpw", "--allocator", "greedy", "--server", address,
                             "--json", "-q")
    assert code == 0, err
    job = json.loads(out)
    assert job["state"] == "succeeded" and job["kind"] == "plan"
    plan = Store(url).get_plan(job["result_id"])
    assert plan.allocator == "greedy" and plan.bits_per_weight <= 3.5


def test_what_the_server_refuses_is_one_line(server, run_cli, monkeypatch, tmp_path):
    address, _, profile, _ = server
    monkeypatch.setenv("BITPLAN_TOKEN", "wrong")
    code, _, err = run_cli("plan", profile.id, "--server", address, "-q")
    assert code == 2 and "401" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("BITPLAN_TOKEN", "s3cret")
    outside = tmp_path / "outside.txt"
    outside.write_text("not inside the roots")
    code, _, err = run_cli("eval", "smollm2-135m", "--text", str(outside), "--server", address, "-q")
    assert code == 2 and "403" in err and str(tmp_path) not in err.replace(str(outside), "")
    code, _, err = run_cli("plan", profile.id, "--search-state", "s.json", "--server", address, "-q")
    assert code == 2 and "--search-state runs locally only" in err


def test_no_server_there_is_one_line(run_cli, free_port):
    port = free_port()  # nothing listens there
    code, _, err = run_cli("plan", "prof-x", "--server", f"http://127.0.0.1:{port}", "-q")
    assert code == 2 and "cannot reach the server" in err and "Traceback" not in err
    code, _, err = run_cli("plan", "prof-x", "--server", "localhost:8000", "-q")
    assert code == 2 and "give the service's address" in err
