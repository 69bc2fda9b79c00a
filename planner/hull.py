"""Per-unit lower convex hull of (size, error): the options a Lagrangian (greedy) allocator can reach.

Along its hull a unit's options form a chain start -> to[:, 0] -> to[:, 1] -> ...; each step (a
*segment*) costs `d_size` more bits and removes `-d_error` error, and the error removed per bit
(`gain`) never increases along the chain. Taking segments in decreasing `gain` is the LP relaxation
of the multiple-choice knapsack, exact up to the one segment that does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitplan.planner.problem import AllocationProblem


@dataclass(frozen=True, eq=False)
class Hull:
    """start [U] option; to, d_size, d_error, gain [U, K]: segment k of unit u (to = -1: none)."""

    start: np.ndarray
    to: np.ndarray
    d_size: np.ndarray  # bits, > 0 on real segments
    d_error: np.ndarray  # < 0 on real segments
    gain: np.ndarray  # -d_error / d_size, error removed per bit; non-increasing along k

    def choice(self, steps: np.ndarray) -> np.ndarray:
        """[U] the option reached after taking the first `steps[u]` segments of each unit."""
        at = self.to[np.arange(len(steps)), np.maximum(steps - 1, 0)]
        return np.where(steps > 0, at, self.start)


def lower_hull(problem: AllocationProblem) -> Hull:
    """Gift-wrap every unit's hull at once: from the smallest option, step to the steepest descent."""
    size, error, allowed = problem.size, problem.error, problem.allowed
    U, O = size.shape
    rows = np.arange(U)
    start = problem.smallest_choice()
    cur = start
    to = np.full((U, max(O - 1, 1)), -1, dtype=np.int64)
    d_size = np.zeros(to.shape, dtype=np.int64)
    d_error = np.zeros(to.shape, dtype=np.float64)
    for k in range(O - 1):  # a chain visits each option at most once
        s0, e0 = size[rows, cur][:, None], error[rows, cur][:, None]
        # only options that are larger *and* better can be on the descending part of the hull
        ahead = allowed & (size > s0) & (error < e0)
        if not ahead.any():
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(ahead, (error - e0) / (size - s0), np.inf)
        # steepest descent first; among equal slopes the nearer option, so collinear points stay steps
        nxt = np.lexsort((size, slope), axis=1)[:, 0]
        go = ahead.any(axis=1)
        to[go, k] = nxt[go]
        d_size[go, k] = size[go, nxt[go]] - size[go, cur[go]]
        d_error[go, k] = error[go, nxt[go]] - error[go, cur[go]]
        cur = np.where(go, nxt, cur)
    valid = to >= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(valid, -d_error / np.where(valid, d_size, 1), -np.inf)
    # rounding can make a collinear later segment look a hair steeper; clamp so each unit's order holds
    gain = np.minimum.accumulate(gain, axis=1)
    return Hull(start=start, to=to, d_size=d_size, d_error=d_error, gain=gain)
