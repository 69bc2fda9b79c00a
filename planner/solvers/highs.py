"""Backend `highs`: the reduced knapsack for HiGHS through `scipy.optimize.milp` (sparse matrices).

scipy ships its own HiGHS, so this never meets `highspy` or OR-Tools' bundled HiGHS (DESIGN.md).
`milp` takes no starting plan: the warm start is the reduction itself (greedy's plan and bound).
HiGHS also stops on an absolute gap of 1e-6 (not settable through scipy), so costs are normalised
to [0, 1] and multiplied by `OBJ_SCALE`, keeping that absolute gap far below any relative one we
report; its dual bound comes back in error units.
"""

from __future__ import annotations

import numpy as np

from bitplan.planner.solvers.mck import Model, Outcome

OBJ_SCALE = 1e6  # objective units per unit of normalised cost (see the module docstring)


def solve(model: Model, *, time_limit: float | None = None, gap_rel: float = 1e-9) -> Outcome:
    """HiGHS's plan for the free units; `bound` from its dual bound, in error units."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # lazily: scipy is cheap, HiGHS is not
    from scipy.sparse import csr_array

    # Data: one column per pair (free unit, option), integer steps, scaled normalised costs.
    P, F = len(model.pu), model.n_free
    cost = model.c * OBJ_SCALE

    # Variables: x[p] in {0, 1}, 1 when pair p's unit takes pair p's option.
    integrality = np.ones(P)
    bounds = Bounds(0, 1)

    # Constraint: each free unit takes exactly one of its remaining options (row f sums unit f's pairs).
    one = LinearConstraint(csr_array((np.ones(P), (model.pu, np.arange(P))), shape=(F, P)), 1, 1)

    # Constraint: the free units' sizes fit what the fixed units leave of the budget (steps of q bits).
    budget = LinearConstraint(csr_array(model.w.astype(float)[None, :]), -np.inf, model.cap)
    rows = [one, budget]

    # Constraint (with a latency budget): the free units' latencies fit what is left of it, in
    # picoseconds scaled to [0, 1] for HiGHS's tolerances; `ilp` re-checks the plan in exact integers.
    if model.lw is not None and model.lw.any():
        scale = float(model.lw.max())
        rows.append(LinearConstraint(csr_array(model.lw.astype(float)[None, :] / scale), -np.inf,
                                     model.lcap / scale))

    # Objective (least total cost) and solve.
    options = {"disp": False, "mip_rel_gap": gap_rel, "presolve": True}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    res = milp(cost, integrality=integrality, bounds=bounds, constraints=rows, options=options)

    # Check status: 0 optimal (within gap_rel), 1 time/iteration limit (x may still hold a plan).
    info = {"milp_status": int(res.status), "message": res.message}
    dual = getattr(res, "mip_dual_bound", None)
    bound = None if dual is None or not np.isfinite(dual) else model.const + model.norm * dual / OBJ_SCALE
    if res.x is None:
        return Outcome(None, False, bound, res.status == 1, info)

    # Read values: each free unit's option is its pair with x = 1.
    x = np.rint(res.x)
    order = np.flatnonzero(x > 0.5)
    sub = np.full(F, -1, dtype=np.int64)
    sub[model.pu[order]] = model.po[order]
    if np.any(sub < 0):
        raise RuntimeError(f"HiGHS returned no option for free units {np.flatnonzero(sub < 0)[:5].tolist()}")
    return Outcome(sub, res.status == 0, bound, res.status == 1, info)
