"""Greedy: climb every unit's convex hull, best error-per-bit segment first (the Lagrangian order).

Exact whenever the budget lands on a segment boundary; otherwise the LP relaxation gives a lower
bound (all segments before the first one that does not fit, plus that one's fitting fraction), and
the reported gap is measured against it. O(U·O²) numpy for the hulls, one sort, and a Python loop
only over the few segments left after the first one that does not fit.
"""

from __future__ import annotations

import numpy as np

from bitplan.planner.hull import lower_hull
from bitplan.planner.problem import (AllocationProblem, Assignment, format_gap, refuse_latency, relative_gap,
                                     require_feasible)

OPTIMAL_GAP = 1e-12  # relative; below this the bound and the value agree up to float rounding


def solve(problem: AllocationProblem, *, seed: int = 0, time_limit: float | None = None) -> Assignment:
    """Hull greedy with the Lagrangian lower bound in `info`; deterministic (no randomness: seed unused)."""
    refuse_latency(problem, "greedy")
    require_feasible(problem)

    # Data: every hull segment, as flat arrays in Lagrangian order.
    hull = lower_hull(problem)
    U = problem.n_units
    unit, step = np.nonzero(hull.to >= 0)  # row-major: by unit, then step
    gain = hull.gain[unit, step]
    # largest error removed per bit first; the stable sort keeps each unit's steps in order on ties
    order = np.argsort(-gain, kind="stable")
    unit, step, gain = unit[order], step[order], gain[order]
    d_size, d_error = hull.d_size[unit, step], hull.d_error[unit, step]
    slack = problem.budget - problem.smallest()  # bits left once every unit sits at its start

    # The prefix of segments that fits whole is taken in one go: its units' steps are contiguous.
    used = np.cumsum(d_size)
    n_fit = int(np.searchsorted(used, slack, side="right"))
    steps = np.bincount(unit[:n_fit], minlength=U)
    prefix = hull.choice(steps)
    left = slack - (int(used[n_fit - 1]) if n_fit else 0)

    if n_fit == len(unit):
        # every unit reached the top of its hull: nothing is left to trade, the plan is optimal
        return Assignment(prefix, "optimal", {"bound": problem.total_error(prefix), "gap": 0.0,
                                              "lam": 0.0, "segments": n_fit})

    # LP bound: the prefix plus the fitting fraction of the first segment that does not fit (bits).
    lam = float(gain[n_fit])
    bound = problem.total_error(prefix) + float(left / d_size[n_fit] * d_error[n_fit])

    # The rest, in order: a segment is taken if its unit has taken all earlier ones and it fits; one
    # that does not fit freezes its unit, since its later segments would start from a missing step.
    rest = np.arange(n_fit + 1, len(unit))
    rest = rest[d_size[rest] <= left]  # the others can never fit: the bits left only shrink
    taken = steps.tolist()
    for u, k, ds in zip(unit[rest].tolist(), step[rest].tolist(), d_size[rest].tolist()):
        if taken[u] == k and ds <= left:
            taken[u] += 1
            left -= ds
    choice = hull.choice(np.asarray(taken))

    error = problem.total_error(choice)
    gap = float(relative_gap(error, bound))
    status = "optimal" if gap <= OPTIMAL_GAP else f"heuristic (gap ≤ {format_gap(gap)})"
    return Assignment(choice, status, {"bound": bound, "gap": gap, "lam": lam,
                                       "segments": n_fit + int(np.sum(taken) - steps.sum())})
