"""`ilp` on every solver stack (cbc, cpsat, highs) against `dp`, honest statuses, and the stacks in one process."""

import subprocess
import sys

import numpy as np
import pytest

from bitplan.db.types import InvalidInput
from bitplan.planner.allocators import dp, ilp
from bitplan.planner.problem import AllocationProblem
from bitplan.planner.synthetic import random_problem

BACKENDS = ilp.BACKENDS


def moe_problem(U: int, seed: int = 0) -> AllocationProblem:
    """U modules of three MoE-like shapes x 7 options (2-8 bits g128, 16 bits), convex curves, 3.25 bpw."""
    rng = np.random.default_rng(seed)
    bits = np.array([2, 3, 4, 5, 6, 8, 16])
    shp = np.array([(2048, 7168), (7168, 2048), (1536, 7168)])[rng.integers(0, 3, U)]
    numel, groups = shp[:, 0] * shp[:, 1], shp[:, 0] * -(-shp[:, 1] // 128)
    size = numel[:, None] * bits + np.where(bits < 16, groups[:, None] * (16 + bits), 0)
    error = (rng.lognormal(0, 1.5, (U, 1)) * np.exp2(-rng.uniform(1.6, 2.2, (U, 1)) * bits)
             * (1 + 0.05 * rng.random((U, 7))))
    return AllocationProblem(error, size, np.ones((U, 7), dtype=bool), int(3.25 * numel.sum()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_equals_dp_on_200_problems(backend, assert_valid):
    """Both with the Lagrangian reduction and on the whole model; cpsat within its reported rounding."""
    for seed in range(200):
        p = random_problem(seed)
        opt = p.total_error(dp.solve(p).choice)
        a = ilp.solve(p, backend=backend, reduce=bool(seed % 2))
        assert_valid(p, a.choice)
        assert a.status == "optimal", (seed, a.status)
        slack = 2 * a.info.get("rounding_bound", 0.0) + 1e-9 * abs(opt) + 1e-12
        assert abs(p.total_error(a.choice) - opt) <= slack, (seed, p.total_error(a.choice), opt)
        assert a.info["bound"] <= opt + 1e-12


@pytest.mark.parametrize("seed", [372, 2896])
def test_cbc_preprocessing_cannot_hide_the_optimum(seed):
    """Problems on which CBC's preprocessing returned a worse plan labelled optimal (found by sweeping
    3,000 random problems against dp); CBC runs without it."""
    p = random_problem(seed)
    opt = p.total_error(dp.solve(p).choice)
    for reduce in (True, False):
        assert p.total_error(ilp.solve(p, backend="cbc", reduce=reduce).choice) == pytest.approx(opt, rel=1e-9, abs=1e-12)


def test_cpsat_coarse_scale_reports_its_rounding(assert_valid):
    """A coarse objective resolution is still optimal on scaled errors, says so, and stays within the bound."""
    for seed in range(20):
        p = random_problem(seed)
        opt = p.total_error(dp.solve(p).choice)
        a = ilp.solve(p, backend="cpsat", reduce=False, rounding_rel=0.05)
        assert_valid(p, a.choice)
        assert p.total_error(a.choice) <= opt + 2 * a.info["rounding_bound"] + 1e-12
        if a.status != "optimal":
            assert a.status.startswith("optimal on integer-scaled errors (rounding gap ≤ ")


@pytest.fixture(scope="module")
def mid():
    """3,000 MoE-like modules, and its optimum (reduced model, CBC)."""
    p = moe_problem(3000)
    a = ilp.solve(p)
    assert a.status == "optimal"
    return p, p.total_error(a.choice)


@pytest.mark.parametrize("backend", BACKENDS)
def test_time_limited_run_reports_an_honest_gap(mid, backend, assert_valid):
    """The whole model with a short time limit: a plan within budget, and its gap brackets the optimum."""
    p, opt = mid
    a = ilp.solve(p, backend=backend, reduce=False, time_limit=0.3)
    assert_valid(p, a.choice)
    value = p.total_error(a.choice)
    assert a.info["bound"] <= opt * (1 + 1e-12) <= value * (1 + 1e-12)
    assert a.info["gap"] == pytest.approx((value - a.info["bound"]) / value, rel=1e-9, abs=1e-15)
    if backend == "cpsat":  # CP-SAT does not prove 3,000 x 7 in 0.3 s
        assert a.status.startswith("feasible (time limit; gap ≤ "), a.status
    else:
        assert a.status == "optimal" or a.status.startswith("feasible ("), a.status
        assert a.status != "optimal" or a.info["gap"] <= ilp.OPTIMAL_GAP


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduced_model_is_exact_at_scale(mid, backend, assert_valid):
    """The default (Lagrangian reduction) proves the 3,000-module optimum on every stack but HiGHS, which
    may stop at its limit: then its plan is at least greedy's and its gap honest."""
    p, opt = mid
    a = ilp.solve(p, backend=backend, time_limit=5)
    assert_valid(p, a.choice)
    assert a.info["free_units"] < p.n_units // 2
    if a.status == "optimal":
        assert p.total_error(a.choice) == pytest.approx(opt, rel=1e-9)
    else:
        assert backend == "highs" and a.info["bound"] <= opt * (1 + 1e-12)


def test_unknown_backend_and_foreign_params_are_rejected():
    p = random_problem(0)
    with pytest.raises(InvalidInput, match="no backend 'gurobi'"):
        ilp.solve(p, backend="gurobi")
    with pytest.raises(InvalidInput, match="num_workers"):
        ilp.solve(p, backend="cbc", num_workers=4)
    with pytest.raises(InvalidInput, match="gap_rel"):
        ilp.solve(p, backend="cpsat", gap_rel=0.1)


def test_stacks_share_one_process_without_highspy():
    """PuLP (CBC), OR-Tools (CP-SAT) and scipy's HiGHS imported and run in one fresh process, in both orders."""
    code = (
        "import sys, numpy as np\n"
        "from bitplan.planner.allocators import ilp\n"
        "from bitplan.planner.problem import AllocationProblem\n"
        "import {first}, {second}\n"
        "p = AllocationProblem(np.array([[3.0, 1, 0], [4, 2, 1]]), np.array([[2, 3, 5], [2, 4, 6]]),\n"
        "                      np.ones((2, 3), bool), 8)\n"
        "print([ilp.solve(p, backend=b, reduce=False).status for b in ilp.BACKENDS],\n"
        "      'highspy' in sys.modules, 'pulp' in sys.modules, 'ortools.sat.python.cp_model' in sys.modules)\n"
    )
    for first, second in (("pulp", "ortools.sat.python.cp_model"), ("ortools.sat.python.cp_model", "pulp")):
        out = subprocess.run([sys.executable, "-c", code.format(first=first, second=second)], check=True,
                             capture_output=True, text=True, cwd="/").stdout.strip()
        assert out == "['optimal', 'optimal', 'optimal'] False True True", out
