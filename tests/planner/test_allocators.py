"""Every allocator against `dp` (the exact answer) on small random problems, plus each one's own promises."""

import numpy as np
import pytest

from bitplan.db.types import InfeasibleBudget
from bitplan.planner.allocators import ALLOCATORS, dp, greedy, ilp, needs_context, uniform
from bitplan.planner.synthetic import large_problem
from bitplan.planner.problem import AllocationProblem

NAMES = sorted(n for n in ALLOCATORS if not needs_context(n))  # evolutionary: test_evolutionary.py


def with_budget(p: AllocationProblem, budget: int) -> AllocationProblem:
    return AllocationProblem(p.error, p.size, p.allowed, budget)


def brute_force(p: AllocationProblem) -> float:
    """Least error over every allowed combination: the reference for `dp` itself."""
    best = np.inf
    for combo in np.ndindex(*(p.n_options,) * p.n_units):
        c = np.array(combo)
        if p.allowed[np.arange(p.n_units), c].all() and p.total_size(c) <= p.budget:
            best = min(best, p.total_error(c))
    return best


@pytest.mark.parametrize("seed", range(30), ids=lambda s: f"seed{s}")
def test_dp_matches_brute_force(seed, random_problem, assert_valid):
    p = random_problem(seed)
    if p.n_options ** p.n_units > 20_000:
        p = AllocationProblem(p.error[:4], p.size[:4], p.allowed[:4], p.budget)
        p = with_budget(p, (p.smallest() + p.largest()) // 2)
    a = dp.solve(p)
    assert a.status == "optimal"
    assert_valid(p, a.choice)
    assert p.total_error(a.choice) == pytest.approx(brute_force(p), rel=1e-12)


@pytest.mark.parametrize("seed", range(200), ids=lambda s: f"seed{s}")
def test_ilp_equals_dp(seed, random_problem, assert_valid):
    p = random_problem(seed)
    exact, found = dp.solve(p), ilp.solve(p)
    assert found.status == "optimal"
    assert_valid(p, exact.choice)
    assert_valid(p, found.choice)
    assert p.total_error(found.choice) == pytest.approx(p.total_error(exact.choice), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(40), ids=lambda s: f"seed{s}")
def test_greedy_exact_at_lagrangian_points(seed, convex_problem, assert_valid):
    """At a budget that ends exactly on a segment boundary (in greedy order) greedy is the optimum."""
    p = convex_problem(seed)
    # segments, independently of the hull code: consecutive options, best error removed per bit first
    d_size = np.diff(p.size, axis=1).ravel()
    gain = (-np.diff(p.error, axis=1) / np.diff(p.size, axis=1)).ravel()
    used = np.cumsum(d_size[np.argsort(-gain, kind="stable")])
    for k in (0, 1, len(used) // 3, len(used) // 2, len(used) - 1):
        q = with_budget(p, p.smallest() + int(used[k]))
        a = greedy.solve(q)
        assert a.status == "optimal"
        assert a.info["gap"] == 0
        assert_valid(q, a.choice)
        assert q.total_error(a.choice) == pytest.approx(q.total_error(dp.solve(q).choice), rel=1e-9)


@pytest.mark.parametrize("seed", range(60), ids=lambda s: f"seed{s}")
def test_greedy_bounds_the_optimum_from_both_sides(seed, random_problem, convex_problem, assert_valid):
    """At any budget: bound <= optimum <= greedy, and greedy within budget."""
    p = random_problem(seed) if seed % 2 else convex_problem(seed)
    if seed % 2 == 0:
        p = with_budget(p, int(np.random.default_rng(seed).integers(p.smallest(), p.largest() + 1)))
    a = greedy.solve(p)
    assert_valid(p, a.choice)
    opt = p.total_error(dp.solve(p).choice)
    assert p.total_error(a.choice) >= opt - 1e-12
    assert a.info["bound"] <= opt + 1e-12
    assert a.status == "optimal" or a.status.startswith("heuristic (gap ≤ ")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", range(25), ids=lambda s: f"seed{s}")
def test_every_allocator_within_budget_and_allowed(name, seed, random_problem, assert_valid):
    p = random_problem(1000 + seed)
    a = ALLOCATORS[name](p, seed=seed)
    assert_valid(p, a.choice)
    assert isinstance(a.status, str) and a.status


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", range(10), ids=lambda s: f"seed{s}")
def test_infeasible_budget_names_the_smallest(name, seed, random_problem):
    p = random_problem(seed)
    p = with_budget(p, p.smallest() - 1)
    with pytest.raises(InfeasibleBudget) as e:
        ALLOCATORS[name](p)
    # columns are sorted by size, so uniform's smallest candidate is the smallest plan too
    assert e.value.smallest_bits == p.smallest()


@pytest.mark.parametrize("name", NAMES)
def test_budget_exactly_smallest_is_feasible(name, random_problem):
    p = random_problem(7)
    p = with_budget(p, p.smallest())
    a = ALLOCATORS[name](p)
    assert p.total_size(a.choice) == p.smallest()


@pytest.mark.parametrize("seed", range(20), ids=lambda s: f"seed{s}")
def test_uniform_is_the_best_fitting_column(seed, random_problem):
    rng = np.random.default_rng(seed)
    p = random_problem(3 * seed)  # seeds divisible by 3: everything allowed
    bits, err = p.size.sum(axis=0), p.error.sum(axis=0)
    p = with_budget(p, int(rng.integers(bits.min(), bits.max() + 1)))
    a = uniform.solve(p)
    best = min(np.flatnonzero(bits <= p.budget), key=lambda o: (err[o], o))
    np.testing.assert_array_equal(a.choice, np.full(p.n_units, best))


def test_uniform_pinned_unit_takes_the_nearest_option_preferring_the_larger():
    # unit 1 may take only options 0 and 2; at option 1 both are 1 bit away, so it takes the larger
    size = np.array([[2, 3, 4], [2, 3, 4]])
    allowed = np.array([[True, True, True], [True, False, True]])
    p = AllocationProblem(np.array([[3.0, 2, 1], [3, 2, 1]]), size, allowed, 7)
    np.testing.assert_array_equal(uniform.candidates(p)[1], [1, 2])
    np.testing.assert_array_equal(uniform.solve(p).choice, [1, 2])


@pytest.mark.parametrize("seed", range(10), ids=lambda s: f"seed{s}")
def test_dp_discretised_stays_within_budget(seed, random_problem, assert_valid):
    p = random_problem(seed)
    jitter = np.random.default_rng(seed).integers(0, 7, p.size.shape)
    p = AllocationProblem(p.error, p.size * 1000 + jitter, p.allowed, 0)  # gcd 1: many exact cells
    p = with_budget(p, (p.smallest() + p.largest()) // 2)
    coarse = dp.solve(p, max_cells=20 * p.n_units)
    assert coarse.status.startswith("feasible (discretised to ")
    assert_valid(p, coarse.choice)
    assert p.total_error(coarse.choice) >= p.total_error(dp.solve(p).choice) - 1e-12


def test_ilp_with_a_loose_gap_says_so(random_problem, assert_valid):
    p = random_problem(4)
    a = ilp.solve(p, gap_rel=0.05)
    assert_valid(p, a.choice)
    # CBC proved 5% on its objective; the status reports the tighter gap the bounds give (greedy's LP too)
    assert a.status.startswith("feasible (gap ≤ ") and a.info["gap"] <= 0.05


def test_greedy_at_scale(assert_valid):
    """45,000 units x 7 options (a large MoE): runs (well under a second here) and fits."""
    p = large_problem()
    a = greedy.solve(p)
    assert_valid(p, a.choice)
    assert a.info["bound"] <= p.total_error(a.choice)
    assert a.info["gap"] < 1e-3
