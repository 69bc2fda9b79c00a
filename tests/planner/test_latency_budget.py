"""Latency budgets and objectives: `ilp` against exact enumeration with both rows, infeasible budgets,
refusals, parsing, and `bitplan plan --latency-budget` end to end."""

import itertools
import json

import numpy as np
import pytest

from bitplan.db.store import Store
from bitplan.db.types import InfeasibleBudget, InvalidInput
from bitplan.planner.allocators import ALLOCATORS, ilp
from bitplan.planner.latency import LatencyBudget, Objective
from bitplan.planner.plan import allocate
from bitplan.planner.request import PlanRequest
from bitplan.planner.problem import AllocationProblem, InfeasibleLatency
from bitplan.planner.synthetic import random_problem, synthetic_profile
from bitplan.profiler.latency import roofline_latency, with_latency

BACKENDS = ilp.BACKENDS


def timed_problem(seed: int, objective: float = 0.0) -> AllocationProblem:
    """random_problem with random latencies (1 to 100 µs, unrelated to size on odd seeds) and a latency
    budget anywhere from below the fastest plan to the slowest; `objective` adds λ·latency to the error."""
    p = random_problem(seed, max_units=6, max_options=4)
    rng = np.random.default_rng([seed, 7])
    lat = rng.uniform(1e-6, 1e-4, p.error.shape)
    if seed % 2 == 0:
        lat = np.sort(lat, axis=1)  # more size, more time, as on a roofline
    fast = np.where(p.allowed, lat, np.inf).min(axis=1).sum()
    slow = np.where(p.allowed, lat, -np.inf).max(axis=1).sum()
    budget = float(rng.uniform(0.95 * fast, slow))
    return AllocationProblem(p.error + objective * lat * 1e3, p.size, p.allowed, p.budget, latency=lat,
                             latency_budget=budget)


def enumerate_plans(p: AllocationProblem) -> tuple[float, np.ndarray] | None:
    """The exact optimum with both rows by trying every plan (None: no plan meets both), and the least
    latency (ps) of the plans within the memory budget."""
    U, O = p.error.shape
    rows = np.arange(U)
    best, fastest = None, None
    for c in itertools.product(range(O), repeat=U):
        c = np.array(c)
        if not p.allowed[rows, c].all() or p.total_size(c) > p.budget:
            continue
        ps = p.total_latency_ps(c)
        fastest = ps if fastest is None else min(fastest, ps)
        if ps <= p.latency_budget_ps and (best is None or p.total_error(c) < best[0]):
            best = (p.total_error(c), c)
    return best, fastest


@pytest.mark.parametrize("backend", BACKENDS)
def test_ilp_with_a_latency_budget_equals_enumeration(backend):
    solved = infeasible = 0
    for seed in range(80):
        p = timed_problem(seed)
        best, fastest = enumerate_plans(p)
        if best is None:
            with pytest.raises(InfeasibleLatency) as e:
                ilp.solve(p, backend=backend)
            assert e.value.smallest_seconds == pytest.approx(fastest * 1e-12, rel=1e-12)  # names the fastest plan
            infeasible += 1
            continue
        a = ilp.solve(p, backend=backend, reduce=bool(seed % 2))
        assert a.status == "optimal", (seed, a.status)
        assert p.total_size(a.choice) <= p.budget and p.total_latency_ps(a.choice) <= p.latency_budget_ps
        assert p.allowed[np.arange(p.n_units), a.choice].all()
        slack = 2 * a.info.get("rounding_bound", 0.0) + 1e-9 * abs(best[0]) + 1e-12
        assert abs(p.total_error(a.choice) - best[0]) <= slack, (seed, p.total_error(a.choice), best[0])
        assert a.info["bound"] <= best[0] + 1e-9
        solved += 1
    assert solved > 40 and infeasible > 3  # both kinds of case were met


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_plus_latency_objective_equals_enumeration(backend):
    for seed in range(30):
        p = timed_problem(seed, objective=0.3)  # 0.3 error per ms: latency matters as much as error here
        best, _ = enumerate_plans(p)
        if best is None:
            continue
        a = ilp.solve(p, backend=backend)
        assert abs(p.total_error(a.choice) - best[0]) <= 2 * a.info.get("rounding_bound", 0.0) + 1e-9 * best[0]


def test_latency_row_is_whole_picoseconds_rounded_safely():
    lat = np.array([[1.5e-6, 2.0e-6], [1.0e-6, 3.0e-6]])
    p = AllocationProblem(np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2), bool), 4, latency=lat,
                          latency_budget=0.0000035)
    assert p.latency_budget_ps == 3_500_000  # the decimal the user wrote, not one ps less
    assert np.all(p.latency_ps * 1e-12 >= lat) and np.all(p.latency_ps * 1e-12 - lat < 1e-12)


@pytest.mark.parametrize("name", ["greedy", "dp", "closed_form", "uniform"])
def test_other_allocators_refuse_a_latency_budget(name):
    p = timed_problem(0)
    with pytest.raises(InvalidInput, match=f"allocator '{name}' cannot honour a latency budget: use --allocator ilp"):
        ALLOCATORS[name](p)


# ------------------------------------------------------------------------------------ on a profile


@pytest.fixture(scope="module")
def timed_profile():
    p = synthetic_profile(n_layers=4)
    return with_latency(p, roofline_latency(p.modules, p.options, [1, 16, 256], "H100"))


def test_plans_meet_both_budgets_and_record_their_latency(timed_profile):
    free = allocate(timed_profile, PlanRequest(budget="3.5bpw"))
    assert set(free.predicted_latency) == {1, 16, 256} and free.latency_source == "roofline:H100"
    fastest = allocate(timed_profile, PlanRequest(budget="3.5bpw", objective="latency")).predicted_latency[1]
    for frac in (0.25, 0.5, 0.9):
        target = fastest + frac * (free.predicted_latency[1] - fastest)
        budget = LatencyBudget.parse(f"{target * 1e6:.3f}us@batch1")
        plan = allocate(timed_profile, PlanRequest(budget="3.5bpw", latency_budget=budget))
        assert plan.bits_per_weight <= 3.5 and plan.predicted_latency[1] <= budget.seconds
        assert plan.predicted_error >= free.predicted_error and plan.status == "optimal"
        assert plan.params["latency_budget"] == str(budget) and plan.id != free.id


def test_granularity_layer_with_a_latency_budget(timed_profile):
    free = allocate(timed_profile, PlanRequest(budget="3.5bpw", granularity="layer"))
    plan = allocate(timed_profile, PlanRequest(budget="3.5bpw", granularity="layer", latency_budget=f"{free.predicted_latency[16] * 1e6 - 0.5:.3f}us@batch16"))
    assert plan.predicted_latency[16] < free.predicted_latency[16] and plan.bits_per_weight <= 3.5


def test_infeasible_latency_names_the_fastest_plan(timed_profile):
    fastest = allocate(timed_profile, PlanRequest(budget="3.5bpw", objective="latency")).predicted_latency[1]
    with pytest.raises(InfeasibleBudget, match=r"latency budget 10us@batch1 is below the fastest plan within "
                                               r"3.5bpw: [0-9.]+us at batch 1; ask for at least that") as e:
        allocate(timed_profile, PlanRequest(budget="3.5bpw", latency_budget="10us@batch1"))
    # the problem's row is whole picoseconds, rounded up: at most 1 ps per module above the table's sum
    assert 0 <= e.value.smallest_seconds - fastest <= len(timed_profile.modules) * 1e-12
    need = str(e.value).split(": ")[1].split("us")[0]
    allocate(timed_profile, PlanRequest(budget="3.5bpw", latency_budget=f"{need}us@batch1"))  # what it names is feasible


def test_clear_errors(timed_profile):
    with pytest.raises(InvalidInput, match="has batches 1, 16, 256"):
        allocate(timed_profile, PlanRequest(budget="3.5bpw", latency_budget="1ms@batch8"))
    with pytest.raises(InvalidInput, match="bitplan profile MODEL --latency roofline:GPU"):
        allocate(synthetic_profile(n_layers=1), PlanRequest(budget="3.5bpw", latency_budget="1ms@batch1"))
    with pytest.raises(InvalidInput, match="use --allocator ilp"):
        allocate(timed_profile, PlanRequest(budget="3.5bpw", allocator="greedy", objective="error+1*latency"))
    for bad in ("8ms", "8 ms at batch 1", "-1ms@batch1", "8ms@batch0", "8h@batch1"):
        with pytest.raises(InvalidInput, match="8ms@batch1"):
            LatencyBudget.parse(bad)


def test_parsing():
    assert str(LatencyBudget.parse(" 8 ms @ batch 1")) == "8ms@batch1"
    assert LatencyBudget.parse("250µs@batch16").seconds == pytest.approx(250e-6)
    assert LatencyBudget.parse("0.5s@batch256").describe(0.0081234) == "0.009s"
    assert Objective.parse("error+0.5*latency") == Objective(1.0, 0.5)
    assert Objective.parse("error + 2·latency").per_ms == 2.0 and str(Objective.parse("latency")) == "latency"
    with pytest.raises(InvalidInput, match="nats per millisecond"):
        Objective.parse("latency+error")


def test_objective_trades_error_for_latency(timed_profile):
    plans = [allocate(timed_profile, PlanRequest(budget="4bpw", objective=f"error+{lam}*latency")) for lam in (0, 1, 30, 1000)]
    lat = [p.predicted_latency[1] for p in plans]
    err = [p.predicted_error for p in plans]
    assert lat == sorted(lat, reverse=True) and err == sorted(err) and lat[-1] < lat[0]


# ------------------------------------------------------------------------------------------ CLI


def test_cli_plan_with_a_latency_budget(db, tmp_path, run_cli, timed_profile):
    f = tmp_path / "profile.json"
    f.write_text(json.dumps(timed_profile.to_dict()))
    free = allocate(timed_profile, PlanRequest(budget="3.5bpw"))
    fastest = allocate(timed_profile, PlanRequest(budget="3.5bpw", objective="latency"))
    budget = f"{(free.predicted_latency[1] + fastest.predicted_latency[1]) / 2 * 1e6:.3f}us@batch1"
    code, out, _ = run_cli("plan", "--profile-file", str(f), "--budget", "3.5bpw", "--latency-budget",
                           budget, "--json", "-q")
    assert code == 0
    plan = json.loads(out)
    assert plan["predicted_latency"]["1"] <= LatencyBudget.parse(budget).seconds and plan["bits_per_weight"] <= 3.5
    assert plan["params"]["latency_budget"] == budget and plan["latency_source"] == "roofline:H100"
    code, out, _ = run_cli("show", plan["id"])
    assert code == 0 and "latency " in out and "at batch 256" in out and f"budget {budget}" in out

    # bad requests: one line, exit 2, nothing stored
    for extra, needle in ((["--latency-budget", "1us@batch1"], "ask for at least"),
                          (["--latency-budget", "1ms@batch3"], "has batches 1, 16, 256"),
                          (["--latency-budget", budget, "--allocator", "dp"], "use --allocator ilp"),
                          (["--objective", "speed"], "nats per millisecond")):
        code, out, err = run_cli("plan", "--profile-file", str(f), *extra)
        assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1 and needle in err
    assert [p.id for p in Store(db).list_plans()] == [plan["id"]]


def test_cli_profile_latency_help():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "bitplan.planner.app.cli", "profile", "--help"], capture_output=True,
                       text=True)
    assert "--latency SOURCE" in r.stdout and "roofline:GPU" in r.stdout and "--latency-batches" in r.stdout
    r = subprocess.run([sys.executable, "-m", "bitplan.planner.app.cli", "plan", "--help"], capture_output=True, text=True)
    text = " ".join(r.stdout.split())  # argparse wraps lines anywhere
    assert "--latency-budget" in text and "nats per millisecond" in text


def test_cli_profile_with_a_roofline_then_plan(db, run_cli, tiny_checkpoint, text_file):
    argv = ["profile", str(tiny_checkpoint), "--calib", str(text_file), "--tokens", "128", "--seq-len", "64",
            "--latency", "roofline:h100", "--latency-batches", "16,1", "--json", "-q"]
    code, out, _ = run_cli(*argv)
    assert code == 0
    profile = json.loads(out)
    assert profile["latency_source"] == "roofline:H100" and profile["latency_batches"] == [1, 16]
    assert len(profile["modules"][0]["latency"]) == 4 and len(profile["modules"][0]["latency"][0]) == 2
    code, out, _ = run_cli(*argv)  # stored: reused, same id
    assert code == 0 and json.loads(out)["id"] == profile["id"]
    stored = Store(db).list_profiles()
    assert sorted(p.latency is not None for p in stored) == [False, True]  # the error profile and this one
    code, out, _ = run_cli("plan", profile["id"][:12], "--budget", "8bpw", "--latency-budget", "1s@batch16",
                           "--json", "-q")
    assert code == 0 and json.loads(out)["predicted_latency"]["16"] < 1
    code, _, err = run_cli("profile", str(tiny_checkpoint), "--latency", "roofline:TPU")
    assert code == 2 and "H100, H200, A100, L40S, RTX4090" in err
