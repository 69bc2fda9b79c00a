"""Uniform: the single best option that fits, the baseline every comparison starts from.

Candidate o puts every unit at option o; a unit that may not take o (a pin) takes its allowed
option whose size is closest to its own size at o (sizes grow with bits, so: the closest bit
width), the larger one on a tie. Among candidates that fit, the one of least total error wins.
"""

from __future__ import annotations

import numpy as np

from bitplan.db.types import InfeasibleBudget
from bitplan.planner.problem import AllocationProblem, Assignment, refuse_latency


def candidates(problem: AllocationProblem) -> np.ndarray:
    """[O, U] the choice of candidate o: option o everywhere, the nearest allowed one where pinned."""
    size, allowed = problem.size, problem.allowed
    out = np.empty((problem.n_options, problem.n_units), dtype=np.int64)
    for o in range(problem.n_options):
        # distance in bits to the size this unit would have at option o; disallowed ones never win
        dist = np.where(allowed, np.abs(size - size[:, [o]]), np.iinfo(np.int64).max)
        # nearest first, then the larger size, then o itself among equal sizes (last key is primary)
        away = np.broadcast_to(np.abs(np.arange(problem.n_options) - o), size.shape)
        out[o] = np.lexsort((away, -size, dist), axis=1)[:, 0]
    return out


def solve(problem: AllocationProblem, *, seed: int = 0, time_limit: float | None = None) -> Assignment:
    """Best uniform candidate within budget; raises InfeasibleBudget naming the smallest uniform size."""
    refuse_latency(problem, "uniform")
    # Data: every candidate's total size (bits) and total error.
    choices = candidates(problem)
    rows = np.arange(problem.n_units)
    bits = problem.size[rows, choices].sum(axis=1)
    error = problem.error[rows, choices].sum(axis=1)

    # Constraint: the candidate fits the budget.
    fits = bits <= problem.budget
    if not fits.any():
        smallest = int(bits.min())
        raise InfeasibleBudget(f"budget {problem.budget} bits is below the smallest uniform plan, "
                               f"{smallest} bits", smallest_bits=smallest)

    # Objective: least total error among those that fit (the first, i.e. smallest option, on a tie).
    o = int(np.argmin(np.where(fits, error, np.inf)))
    return Assignment(choices[o], "heuristic (uniform)", {"option": o, "candidate_bits": bits.tolist()})
