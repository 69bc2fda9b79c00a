"""Backend `cbc`: the reduced knapsack as a 0/1 program for CBC through PuLP, warm-started from greedy.

PuLP cannot report CBC's best bound, so a run stopped by `gap_rel` or by the time limit gets its
bound from `gap_rel` (on the normalised objective) or from greedy's LP bound. PuLP says "Optimal"
for a run stopped by its time limit too: `sol_status` tells proven optima from mere feasible plans.
"""

from __future__ import annotations

import numpy as np

from bitplan.planner.solvers.mck import Model, Outcome, pick

PREPROCESS_MIN_UNITS = 32  # free units above which CBC preprocesses (see `solve`)


def solve(model: Model, *, time_limit: float | None = None, gap_rel: float = 1e-9,
          threads: int = 1) -> Outcome:
    """CBC's plan for the free units; single-threaded by default, so its search is deterministic."""
    import pulp  # lazily: planning with another backend never loads it

    # Data: pairs (free unit, option), integer steps, normalised costs (see mck).
    P = len(model.pu)

    # Model and variables: x[p] = 1 when pair p's unit takes pair p's option.
    prob = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
    x = [pulp.LpVariable(f"x_{u}_{o}", cat=pulp.LpBinary) for u, o in zip(model.pu.tolist(), model.po.tolist())]

    # Constraint: each free unit takes exactly one of its remaining options.
    bounds = np.r_[0, np.flatnonzero(np.diff(model.pu)) + 1, P]
    for f, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        prob += pulp.lpSum(x[a:b]) == 1, f"one_option_{f}"

    # Constraint: the free units' sizes fit what the fixed units leave of the budget (steps of q bits).
    used = [(x[p], w) for p, w in enumerate(model.w.tolist()) if w]
    if used:
        prob += pulp.LpAffineExpression(used) <= model.cap, "budget"

    # Constraint (with a latency budget): the free units' latencies fit what is left of it, in
    # picoseconds scaled to [0, 1] for CBC's tolerances; `ilp` re-checks the plan in exact integers.
    if model.lw is not None and model.lw.any():
        scale = float(model.lw.max())
        prob += pulp.LpAffineExpression([(x[p], w / scale) for p, w in enumerate(model.lw.tolist()) if w]) \
            <= model.lcap / scale, "latency"

    # Objective: least total normalised error above each unit's least remaining option.
    prob += pulp.LpAffineExpression([(x[p], c) for p, c in enumerate(model.c.tolist()) if c])

    # Warm start: greedy's plan, always feasible.
    for p in model.pairs_of(model.hint).tolist():
        x[p].setInitialValue(1)
    for var in x:
        if var.varValue is None:
            var.setInitialValue(0)

    # Solve.
    # CBC's preprocessing returned worse plans labelled optimal on a few small problems (random_problem
    # seeds 372 and 2896 of 3,000, against the exact DP); without it every one of them is optimal.  On
    # larger models it is what proves optimality in time (201 free units of a 3,000-module MoE problem:
    # 0.09 s with it, no proof in 30 s without), so it stays on there.
    preprocess = len(bounds) - 1 > PREPROCESS_MIN_UNITS
    solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap_rel, threads=threads,
                               warmStart=True, options=[] if preprocess else ["preprocess off"])
    prob.solve(solver)

    # Check status: no integer plan at all (time limit before one was found) keeps greedy's.
    info = {"sol_status": pulp.LpSolution[prob.sol_status], "preprocess": preprocess}
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return Outcome(None, False, None, True, info)

    # Read values: each free unit's option is its pair with x = 1.
    sub = pick(model, np.array([var.value() or 0.0 for var in x]))
    if prob.sol_status != pulp.LpSolutionOptimal:
        return Outcome(sub, False, None, True, info)
    # proven within gap_rel on the normalised objective; the constant part has no gap
    value = float(model.c[model.pairs_of(sub)].sum())
    bound = model.const + model.norm * value * (1 - gap_rel) if gap_rel > 1e-9 else None
    return Outcome(sub, gap_rel <= 1e-9, bound, False, info)
