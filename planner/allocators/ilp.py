"""ILP: the multiple-choice knapsack solved exactly, on a choice of solver stacks (`backend`).

Every backend solves the same model (`planner/solvers/mck.py`): greedy's plan and its LP /
Lagrangian bound first, then reduced-cost fixing drops every option that cannot be in a plan better
than greedy's, and the solver proves the few units left. Backends:

- `cbc` (default): PuLP + CBC, warm-started with greedy's plan. Params `gap_rel`, `threads`.
- `cpsat`: OR-Tools CP-SAT on integer-scaled errors, greedy's plan as a hint. Params `num_workers`
  (default 2), `rounding_rel` (objective resolution relative to greedy's error, default 1e-10).
- `highs`: HiGHS inside `scipy.optimize.milp`, sparse rows. Param `gap_rel`.

With a latency budget on the problem, every backend adds the latency row (integer picoseconds) and the
reduction stays exact with two rows (mck's docstring): the anchor is greedy's plan when it meets the
latency budget; otherwise the best plan meeting both rows among the fastest plan (`fastest`) and greedy's
plans on error + μ·latency, μ found by a doubling-then-bisection search that also keeps the best
Lagrangian bound L(λ, μ). A latency budget below the fastest plan within the memory budget raises
InfeasibleLatency naming that plan's latency.

`reduce=False` hands the solver the whole model (for benchmarks; slower, same optimum). Status:
`optimal` when the solver proved it (on CP-SAT: on scaled errors, within a rounding bound ≤ 1e-9
of the error, else the status says how much); otherwise `feasible (gap ≤ x%)` (with `time limit; `
when that stopped it), the gap from the better of the solver's bound and greedy's LP bound.
"""

from __future__ import annotations

import importlib
import math
import time

import numpy as np

from bitplan.db.types import InvalidInput
from bitplan.planner.allocators import greedy
from bitplan.planner.problem import (PS, AllocationProblem, Assignment, InfeasibleLatency, format_gap,
                                     relative_gap, require_feasible)
from bitplan.planner.solvers import mck

BACKENDS = ("cbc", "cpsat", "highs")
OPTIMAL_GAP = 1e-9  # relative; a proven optimum within this of its bound is "optimal"
PARAMS = {"gap_rel": ("cbc", "highs"), "threads": ("cbc",), "num_workers": ("cpsat",),
          "rounding_rel": ("cpsat",)}
MU_DOUBLINGS = 60  # x8 each, from the error/latency exchange rate: far past any scale that matters
MU_BISECTIONS = 30  # halvings of the log μ bracket; each is one greedy pass


def solve(problem: AllocationProblem, *, seed: int = 0, time_limit: float | None = None,
          backend: str = "cbc", reduce: bool = True, gap_rel: float | None = None,
          threads: int | None = None, num_workers: int | None = None,
          rounding_rel: float | None = None) -> Assignment:
    """Optimum on `backend` (or the best plan within `time_limit` s, with an honest gap)."""
    t0 = time.perf_counter()
    if backend not in BACKENDS:
        raise InvalidInput(f"ilp has no backend {backend!r}; known: {list(BACKENDS)}")
    given = {"gap_rel": gap_rel, "threads": threads, "num_workers": num_workers, "rounding_rel": rounding_rel}
    wrong = sorted(k for k, v in given.items() if v is not None and backend not in PARAMS[k])
    if wrong:
        raise InvalidInput(f"ilp backend {backend!r} takes no parameter {wrong}")
    require_feasible(problem)

    # Greedy's plan and bound (on the memory row alone: a relaxation), the anchor, the reduced model.
    start = greedy.solve(problem.memory_only())
    anchor = _anchor(problem, start, backend)
    model = mck.build(problem, anchor, reduce=reduce)
    info = {"backend": backend, **model.info, "lp_bound": model.lp_bound,
            "greedy_error": problem.total_error(start.choice), "anchor_error": model.incumbent}
    if model.n_free == 0:
        # no option left that could beat the anchor's plan: the bound proves it optimal
        return Assignment(model.base, "optimal", {**info, "bound": model.incumbent, "gap": 0.0,
                                                  "solver_seconds": 0.0})

    # Solve the free units on the chosen stack, within what is left of the time limit.
    left = None if time_limit is None else max(time_limit - (time.perf_counter() - t0), 0.01)
    kwargs = {k: v for k, v in given.items() if v is not None}
    if backend == "cpsat":
        kwargs["seed"] = seed
    t1 = time.perf_counter()
    out = importlib.import_module(f"bitplan.planner.solvers.{backend}").solve(model, time_limit=left, **kwargs)
    info.update(out.info, solver_seconds=time.perf_counter() - t1)

    # The better of the solver's plan and the anchor's; the better of the solver's bound and greedy's.
    choice, value = model.base, model.incumbent
    if out.sub is not None and not mck.latency_ok(model, out.sub):
        # within the solver's tolerance, over in exact picoseconds: not a plan, and not a proof
        info["latency_row_violated"] = True
        out.sub, out.optimal = None, False
    if out.sub is not None:
        cand = mck.expand(model, model.base, out.sub)
        if problem.total_size(cand) > problem.budget:  # solver tolerance: never trust, check
            raise RuntimeError(f"ilp backend {backend!r} returned a plan over budget")
        if problem.total_error(cand) <= value:
            choice, value = cand, problem.total_error(cand)
    bound = model.lp_bound
    if out.bound is not None:
        bound = max(bound, min(out.bound, model.incumbent))  # the optimum is this, or greedy's plan
    elif out.optimal:
        bound = value
    gap = relative_gap(value, bound)
    info.update(bound=bound, gap=gap)

    # Status in words (the module docstring).
    if out.optimal and gap <= OPTIMAL_GAP:
        status = "optimal"
    elif out.optimal and backend == "cpsat":
        status = f"optimal on integer-scaled errors (rounding gap ≤ {format_gap(gap)})"
    else:
        status = f"feasible ({'time limit; ' if out.timed_out else ''}gap ≤ {format_gap(gap)})"
    return Assignment(np.asarray(choice, dtype=np.int64), status, info)


def fastest(problem: AllocationProblem, backend: str = "cbc") -> np.ndarray:
    """[U] the plan of least latency within the memory budget; InfeasibleLatency if it is over the latency budget.

    Each unit's fastest option (the smallest among equally fast ones) when those fit the memory
    budget, as they do when latency grows with size (the roofline); otherwise the exact knapsack with
    latency as the objective, solved on `backend`.
    """
    big = np.iinfo(np.int64).max
    lat = np.where(problem.allowed, problem.latency_ps, big)
    choice = np.lexsort((np.where(problem.allowed, problem.size, big), lat), axis=1)[:, 0]
    if problem.total_size(choice) > problem.budget:
        relaxed = AllocationProblem(problem.latency_ps.astype(np.float64), problem.size, problem.allowed,
                                    problem.budget, problem.numel)
        choice = solve(relaxed, backend=backend).choice
    need = problem.total_latency_ps(choice)
    if problem.latency_budget_ps is not None and need > problem.latency_budget_ps:
        raise InfeasibleLatency(f"latency budget {problem.latency_budget_ps * PS:.6g} s is below the fastest plan "
                                f"within the memory budget, {need * PS:.6g} s", smallest_seconds=need * PS)
    return choice


def _anchor(problem: AllocationProblem, start, backend: str) -> mck.Anchor:
    """A plan meeting both rows, with multipliers and a bound for the two-row fixing (mck's docstring)."""
    anchor = mck.Anchor.of_greedy(problem, start)
    cap = problem.latency_budget_ps
    if cap is None or problem.total_latency_ps(start.choice) <= cap:
        return anchor  # greedy's plan meets the latency budget too: μ = 0 keeps the one-row fixing exact
    fast = fastest(problem, backend)  # feasible, or InfeasibleLatency
    best = mck.Anchor(fast, problem.total_error(fast), anchor.lam, 0.0, anchor.bound)
    lat = problem.latency_ps.astype(np.float64)

    def probe(mu: float) -> bool:
        """Greedy on error + μ·latency; keep its plan if it meets the budget, and the best μ's multipliers."""
        nonlocal best
        g = greedy.solve(AllocationProblem(problem.error + mu * lat, problem.size, problem.allowed,
                                           problem.budget, problem.numel))
        value = problem.total_error(g.choice)
        ok = problem.total_latency_ps(g.choice) <= cap
        choice, value = (g.choice, value) if ok and value < best.value else (best.choice, best.value)
        bound = float(g.info["bound"]) - mu * cap  # the Lagrangian dual at μ: a lower bound
        lam, mu_, bound = ((float(g.info.get("lam", 0.0)), mu, bound) if bound > best.bound
                           else (best.lam, best.mu, best.bound))
        best = mck.Anchor(choice, value, lam, mu_, bound)
        return ok

    # The exchange rate: spread of error over spread of latency; then double up, then bisect in log μ.
    def spread(a: np.ndarray) -> float:
        return float(np.sum(np.where(problem.allowed, a, -np.inf).max(axis=1)
                            - np.where(problem.allowed, a, np.inf).min(axis=1)))

    lo, hi, mu = 0.0, None, max(spread(problem.error), 1e-300) / max(spread(lat), 1.0)
    for _ in range(MU_DOUBLINGS):
        if probe(mu):
            hi = mu
            break
        lo, mu = mu, mu * 8
    if hi is not None:
        for _ in range(MU_BISECTIONS):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 8
            if probe(mid):
                hi = mid
            else:
                lo = mid
            if relative_gap(best.value, best.bound) <= OPTIMAL_GAP:
                break
    return best
