"""Dynamic programming over a discretised budget: the exact answer the other allocators are tested against.

Every unit first sits at its smallest allowed option; the DP then spends the *slack* (budget minus
that smallest plan, bits) in cells of `q` bits. With `q` the gcd of every size step and of the slack
the DP is exact. When units × cells would exceed `max_cells`, `q` grows and size steps are rounded
*up* to whole cells, so the plan still fits the real budget, and the status says so.
"""

from __future__ import annotations

import numpy as np

from bitplan.planner.problem import AllocationProblem, Assignment, refuse_latency, require_feasible


def solve(problem: AllocationProblem, *, seed: int = 0, time_limit: float | None = None,
          max_cells: float = 2e8) -> Assignment:
    """Exact DP (discretised above `max_cells` table cells); deterministic: seed and time_limit unused."""
    refuse_latency(problem, "dp")
    require_feasible(problem)

    # Data: size steps above each unit's smallest option, in bits, then in cells of q bits.
    U, O = problem.error.shape
    extra = problem.size - problem.min_size()[:, None]
    slack = problem.budget - problem.smallest()
    q = problem.quantum()
    exact = U * (slack // q + 1) <= max_cells
    if not exact:
        cells_per_unit = max(int(max_cells // U), 2)
        q = slack // (cells_per_unit - 1) + 1  # so that slack // q + 1 <= cells_per_unit
    w = -(-extra // q)  # cells, rounded up: a plan that fits in cells fits in bits
    C = slack // q  # the whole slack, in cells

    # Table: best[c] = least error of the units so far using at most c cells; arg[u, c] = u's option.
    best = np.zeros(C + 1)
    arg = np.zeros((U, C + 1), dtype=np.int8 if O < 128 else np.int16)
    for u in range(U):
        new = np.full(C + 1, np.inf)
        for o in np.flatnonzero(problem.allowed[u]):
            wo = int(w[u, o])
            if wo > C:
                continue  # this option alone overflows the slack
            # unit u takes option o: it uses wo cells, the earlier units the rest
            cand = best[: C + 1 - wo] + problem.error[u, o]
            better = cand < new[wo:]
            new[wo:][better] = cand[better]
            arg[u, wo:][better] = o
        best = new

    # Traceback from the full slack: each unit's option, then the cells it used.
    choice = np.zeros(U, dtype=np.int64)
    c = C
    for u in range(U - 1, -1, -1):
        choice[u] = arg[u, c]
        c -= int(w[u, choice[u]])

    status = "optimal" if exact else f"feasible (discretised to {q} bits)"
    return Assignment(choice, status, {"quantum_bits": int(q), "cells": int(C + 1), "exact": exact,
                                       "error": float(best[C])})
