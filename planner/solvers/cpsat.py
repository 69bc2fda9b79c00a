"""Backend `cpsat`: the reduced knapsack for OR-Tools CP-SAT, on integer-scaled errors.

CP-SAT takes integer coefficients only. Sizes already are (steps of q bits, exact), and so are
latencies (whole picoseconds, the problem's own rounding: nothing more is rounded here). Errors become
`round(cost / resolution)`: `resolution` is error units per integer step of the objective; by
default `rounding_rel · UB / F` (UB: greedy's error, F: free units), capped from below so the
largest possible objective stays under 2**53. Each plan's scaled objective is then off its true
error by at most F · resolution / 2 (`rounding_bound`, error units), so CP-SAT's optimum on the
scaled problem is within F · resolution of the true optimum; `bound` accounts for it, and the
status names it when it is not negligible. With `num_workers` > 1, CP-SAT's parallel search is not
bit-for-bit reproducible in time, but a proven optimum is the optimum.
"""

from __future__ import annotations

import numpy as np

from bitplan.planner.solvers.mck import Model, Outcome, pick

MAX_OBJECTIVE = 2.0 ** 53  # keep every objective value an exact double (and far from int64 overflow)


def scale(model: Model, rounding_rel: float, resolution: float | None) -> float:
    """Error units per integer objective step (module docstring)."""
    F = max(model.n_free, 1)
    if resolution is None:
        resolution = rounding_rel * max(abs(model.incumbent), 1e-300) / F
    per_unit_max = np.zeros(F)
    np.maximum.at(per_unit_max, model.pu, model.cost)
    return max(float(resolution), float(per_unit_max.sum()) / MAX_OBJECTIVE, 1e-300)


def solve(model: Model, *, time_limit: float | None = None, num_workers: int = 2, seed: int = 0,
          rounding_rel: float = 1e-10, resolution: float | None = None) -> Outcome:
    """CP-SAT's plan for the free units, hinted with greedy's; `bound` in (unscaled) error units."""
    from ortools.sat.python import cp_model  # lazily: planning with another backend never loads it

    # Data: integer steps, integer-scaled costs.
    res = scale(model, rounding_rel, resolution)
    coef = np.rint(model.cost / res).astype(np.int64)
    rounding = 0.5 * model.n_free * res  # |scaled - true| of any plan, error units

    # Model and variables: x[p] = 1 when pair p's unit takes pair p's option.
    m = cp_model.CpModel()
    x = [m.new_bool_var(f"x_{u}_{o}") for u, o in zip(model.pu.tolist(), model.po.tolist())]

    # Constraint: each free unit takes exactly one of its remaining options.
    bounds = np.r_[0, np.flatnonzero(np.diff(model.pu)) + 1, len(x)].tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        m.add_exactly_one(x[a:b])

    # Constraint: the free units' sizes fit what the fixed units leave of the budget (steps of q bits).
    m.add(cp_model.LinearExpr.weighted_sum(x, model.w.tolist()) <= model.cap)

    # Constraint (with a latency budget): integer picoseconds already, so no rounding here either; the
    # only rounding of latency is the problem's own (up, to whole picoseconds: planner/problem.py).
    if model.lw is not None:
        m.add(cp_model.LinearExpr.weighted_sum(x, model.lw.tolist()) <= model.lcap)

    # Objective: least total scaled error above each unit's least remaining option.
    m.minimize(cp_model.LinearExpr.weighted_sum(x, coef.tolist()))

    # Warm start: greedy's plan as a hint (complete, feasible).
    hinted = set(model.pairs_of(model.hint).tolist())
    for p, var in enumerate(x):
        m.add_hint(var, int(p in hinted))

    # Solve.
    solver = cp_model.CpSolver()
    if time_limit is not None:
        solver.parameters.max_time_in_seconds = float(time_limit)
    solver.parameters.num_workers = int(num_workers)
    solver.parameters.random_seed = int(seed)
    status = solver.solve(m)

    # Check status before reading values: UNKNOWN means no plan yet (keep greedy's).
    info = {"cp_status": solver.status_name(status), "resolution": res, "rounding_bound": rounding,
            "scaled_objective": None, "scaled_bound": float(solver.best_objective_bound)}
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return Outcome(None, False, None, status == cp_model.UNKNOWN, info)

    # Read values, then the bound in error units: scaled bound, less the rounding any plan may hide.
    sub = pick(model, np.array([solver.boolean_value(v) for v in x], dtype=float))
    info["scaled_objective"] = float(solver.objective_value)
    bound = model.const + res * float(solver.best_objective_bound) - rounding
    return Outcome(sub, status == cp_model.OPTIMAL, bound, status != cp_model.OPTIMAL, info)
