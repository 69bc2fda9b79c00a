"""ILP: the multiple-choice knapsack solved exactly, on a choice of solver stacks (`backend`).

Every backend solves the same model (`planner/solvers/mck.py`): greedy's plan and its LP /
Lagrangian bound first, then reduced-cost fixing drops every option that cannot be in a plan better
than greedy's, and the solver proves the few units left. Backends:

- `cbc` (default): PuLP + CBC, warm-started with greedy's plan. Params `gap_rel`, `threads`.
- `cpsat`: OR-Tools CP-SAT on integer-scaled errors, greedy's plan as a hint. Params `num_workers`
  (default 2), `rounding_rel` (objective resolution relative to greedy's error, default 1e-10).
- `highs`: HiGHS inside `scipy.optimize.milp`, sparse rows. Param `gap_rel`.

`reduce=False` hands the solver the whole model (for benchmarks; slower, same optimum). Status:
`optimal` when the solver proved it (on CP-SAT: on scaled errors, within a rounding bound ≤ 1e-9
of the error, else the status says how much); otherwise `feasible (gap ≤ x%)` (with `time limit; `
when that stopped it), the gap from the better of the solver's bound and greedy's LP bound.
"""

from __future__ import annotations

import importlib
import time

import numpy as np

from bitplan.db.types import InvalidInput
from bitplan.planner.allocators import greedy
from bitplan.planner.problem import AllocationProblem, Assignment, format_gap, relative_gap, require_feasible
from bitplan.planner.solvers import mck

BACKENDS = ("cbc", "cpsat", "highs")
OPTIMAL_GAP = 1e-9  # relative; a proven optimum within this of its bound is "optimal"
PARAMS = {"gap_rel": ("cbc", "highs"), "threads": ("cbc",), "num_workers": ("cpsat",),
          "rounding_rel": ("cpsat",)}


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

    # Greedy's plan and bound, then the reduced model (mck's docstring).
    start = greedy.solve(problem)
    model = mck.build(problem, start, reduce=reduce)
    info = {"backend": backend, **model.info, "lp_bound": model.lp_bound, "greedy_error": model.incumbent}
    if model.n_free == 0:
        # no option left that could beat greedy's plan: the bound proves it optimal
        return Assignment(start.choice, "optimal", {**info, "bound": model.incumbent, "gap": 0.0,
                                                    "solver_seconds": 0.0})

    # Solve the free units on the chosen stack, within what is left of the time limit.
    left = None if time_limit is None else max(time_limit - (time.perf_counter() - t0), 0.01)
    kwargs = {k: v for k, v in given.items() if v is not None}
    if backend == "cpsat":
        kwargs["seed"] = seed
    t1 = time.perf_counter()
    out = importlib.import_module(f"bitplan.planner.solvers.{backend}").solve(model, time_limit=left, **kwargs)
    info.update(out.info, solver_seconds=time.perf_counter() - t1)

    # The better of the solver's plan and greedy's; the better of the solver's bound and greedy's.
    choice, value = start.choice, model.incumbent
    if out.sub is not None:
        cand = mck.expand(model, start.choice, out.sub)
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
