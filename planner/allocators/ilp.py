"""ILP: the multiple-choice knapsack solved exactly by CBC through PuLP, warm-started from greedy.

Coefficients are normalised before CBC sees them: errors minus each unit's least error, divided by
the largest (objective terms in [0, 1]); sizes as steps above each unit's smallest option divided
by their gcd (small exact integers). CBC's tolerances are absolute, so raw bits (~1e9) and raw
errors (~1e-6) would make it stop early or misjudge feasibility.
"""

from __future__ import annotations

import numpy as np
import pulp

from bitplan.planner.allocators import greedy
from bitplan.planner.problem import AllocationProblem, Assignment, format_gap, relative_gap, require_feasible


def solve(problem: AllocationProblem, *, seed: int = 0, time_limit: float | None = None,
          gap_rel: float = 1e-9, threads: int = 1) -> Assignment:
    """CBC optimum (or best found within `time_limit` s, with its gap to greedy's Lagrangian bound)."""
    require_feasible(problem)
    start = greedy.solve(problem)

    # Data: normalised errors and integer size steps (see the module docstring).
    allowed = problem.allowed
    e_min = np.where(allowed, problem.error, np.inf).min(axis=1, keepdims=True)
    cost = np.where(allowed, problem.error - e_min, 0.0)
    cost /= cost.max() or 1.0
    q = problem.quantum()
    step = (problem.size - problem.min_size()[:, None]) // q
    cap = (problem.budget - problem.smallest()) // q
    pairs = [tuple(p) for p in np.argwhere(allowed).tolist()]

    # Model and variables: x[u, o] = 1 when unit u takes option o.
    prob = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
    x = {(u, o): pulp.LpVariable(f"x_{u}_{o}", cat=pulp.LpBinary) for u, o in pairs}

    # Constraint: each unit takes exactly one option.
    by_unit: dict[int, list] = {}
    for (u, o), var in x.items():
        by_unit.setdefault(u, []).append(var)
    for u, vars_u in by_unit.items():
        prob += pulp.lpSum(vars_u) == 1, f"one_option_{u}"

    # Constraint: the chosen sizes fit the budget (in steps of q bits above the smallest plan).
    used = [(x[u, o], int(step[u, o])) for u, o in pairs if step[u, o]]
    if used:
        prob += pulp.LpAffineExpression(used) <= int(cap), "budget"

    # Objective: least total (normalised) error.
    prob += pulp.LpAffineExpression([(x[u, o], float(cost[u, o])) for u, o in pairs if cost[u, o]])

    # Warm start: greedy's plan, always feasible.
    for (u, o), var in x.items():
        var.setInitialValue(int(start.choice[u] == o))

    # Solve (single-threaded by default: CBC's search is then deterministic).
    solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap_rel, threads=threads,
                               warmStart=True)
    prob.solve(solver)

    # Check status: PuLP says "Optimal" for a run stopped by its time limit too; sol_status tells them apart.
    info = {"bound": start.info["bound"], "sol_status": pulp.LpSolution[prob.sol_status]}
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        gap = relative_gap(problem.total_error(start.choice), start.info["bound"])
        return Assignment(start.choice, f"feasible (time limit; greedy start; gap ≤ {format_gap(gap)})",
                          {**info, "gap": gap})

    # Read values: round x to 0/1; each unit's 1 is its option.
    choice = np.full(problem.n_units, -1, dtype=np.int64)
    for (u, o), var in x.items():
        if round(var.value() or 0.0) == 1:
            choice[u] = o
    if np.any(choice < 0):
        raise RuntimeError(f"CBC returned no option for units {np.flatnonzero(choice < 0)[:5].tolist()}")
    if prob.sol_status == pulp.LpSolutionOptimal:
        status = "optimal" if gap_rel <= 1e-9 else f"feasible (gap ≤ {format_gap(gap_rel)})"
        return Assignment(choice, status, {**info, "gap": 0.0 if status == "optimal" else gap_rel})
    gap = relative_gap(problem.total_error(choice), start.info["bound"])
    return Assignment(choice, f"feasible (time limit; gap ≤ {format_gap(gap)})", {**info, "gap": gap})
