"""`bitplan compare` / `run_compare`: every (budget, allocator) pair solved and stored, infeasible ones in their rows;
`--granularity` through the CLI and the service."""

import json
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from bitplan.db.store import Store
from bitplan.db.types import InvalidInput
from bitplan.planner.app.cli import main
from bitplan.planner.app.service import create_app
from bitplan.planner.app.usecases import run_compare
from bitplan.planner.app.workspace import Workspace
from bitplan.planner.request import PlanRequest
from bitplan.planner.budgets import parse_budgets


def test_parse_budgets():
    assert parse_budgets("2.5:4.5:0.25") == [f"{b:g}bpw" for b in (2.5, 2.75, 3, 3.25, 3.5, 3.75, 4, 4.25, 4.5)]
    assert parse_budgets("3bpw, 3.5bpw,900MiB") == ["3bpw", "3.5bpw", "900MiB"]
    assert parse_budgets("3:3.2:0.1,60MiB,3bpw") == ["3bpw", "3.1bpw", "3.2bpw", "60MiB"]  # each once
    assert parse_budgets(["3bpw", "1GiB"]) == ["3bpw", "1GiB"]
    for bad in ("4:3:0.5", "3:4:0", "3:4", "a:b:c", "", "3 parsecs", "nan:4:0.5", "2:inf:1"):
        with pytest.raises(InvalidInput):
            parse_budgets(bad)
    with pytest.raises(InvalidInput, match="makes 9,999,999,975,001 budgets; at most 200"):
        parse_budgets("2.5:1e9:0.0001")  # refused at once, not planned without end


def test_every_pair_is_solved_and_stored(store, make_profile):
    profile = make_profile()
    allocators = ["ilp", "closed_form", "greedy", "uniform"]
    rows = [r.model_dump() for r in run_compare(Workspace(store), profile, "2bpw,3:4:0.5,60MiB", allocators)]
    assert [(r["budget"], r["allocator"]) for r in rows] == [
        (b, a) for b in ("2bpw", "3bpw", "3.5bpw", "4bpw", "60MiB") for a in allocators]
    for r in rows:
        if r["budget"] == "2bpw":  # below the smallest plan (2.282 bpw): the message, no plan
            assert r["plan_id"] is None and r["status"] == "infeasible"
            assert "smallest feasible plan: 2.282bpw" in r["error"]
            continue
        plan = store.get_plan(r["plan_id"])
        assert r["error"] is None and plan.allocator == r["allocator"] and plan.budget == r["budget"]
        assert r["predicted_error"] == plan.predicted_error and r["status"] == plan.status
        assert plan.total_bits <= plan.budget_bits
    by = {(r["budget"], r["allocator"]): r for r in rows}
    for b in ("3bpw", "3.5bpw", "4bpw", "60MiB"):
        assert by[b, "ilp"]["status"] == "optimal"
        assert by[b, "ilp"]["predicted_error"] <= min(by[b, a]["predicted_error"] for a in allocators) + 1e-12
    assert len(store.list_plans(profile.id)) == 16


def test_bad_input_fails_before_solving(store, make_profile):
    for kwargs, match in (({"allocators": ["ilp", "simplex"]}, "unknown allocator 'simplex'"),
                          ({"request": PlanRequest(granularity="row")}, "unknown granularity"),
                          ({"budgets": "3bpw,lots"}, "bad budget")):
        with pytest.raises(InvalidInput, match=match):
            run_compare(Workspace(store), make_profile(), **{"budgets": "3bpw", "allocators": ["ilp"], **kwargs})
    assert store.list_plans() == []


def test_cli_compare_table_json_and_output(tmp_path, profile_file, capsys, monkeypatch):
    monkeypatch.setenv("BITPLAN_DB", str(tmp_path / "cli.db"))
    out_file = tmp_path / "sweep.json"
    argv = ["compare", "--profile-file", str(profile_file), "--allocators", "ilp,closed_form,uniform",
            "--budgets", "2bpw,3.5bpw", "--granularity", "layer", "--output", str(out_file)]
    assert main(argv + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads(out_file.read_text())
    assert len(doc["rows"]) == 6 and {r["granularity"] for r in doc["rows"]} == {"layer"}
    assert [r["error"] is None for r in doc["rows"]] == [False] * 3 + [True] * 3
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "budget 2bpw is below the smallest feasible plan" in table and "closed_form" in table
    assert all(r["plan_id"] in table for r in doc["rows"][3:])
    assert main(["compare", "--profile-file", str(profile_file), "--allocators", "ilp,nope"]) == 2
    assert "unknown allocator 'nope'" in capsys.readouterr().err


def test_cli_compare_help():
    r = subprocess.run([sys.executable, "-m", "bitplan.planner.app.cli", "compare", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "--granularity" in r.stdout and "START:STOP:STEP" in r.stdout


def test_service_plan_with_granularity(tmp_path, make_profile):
    url = str(tmp_path / "svc.db")
    Store(url).save_profile(make_profile())
    with TestClient(create_app(url, token="")) as c:
        r = c.post("/v1/plans", json={"profile_id": "prof-synthetic", "budget": "3.5bpw", "granularity": "layer"})
        assert r.status_code == 201, r.text
        plan = r.json()
        assert plan["params"] == {"granularity": "layer"}
        assert len({json.dumps(o) for n, o in plan["assignment"].items() if n.startswith("model.layers.3.")}) == 1
        r = c.post("/v1/plans", json={"profile_id": "prof-synthetic", "granularity": "row"})
        assert r.status_code == 422 and "unknown granularity" in r.json()["detail"]
