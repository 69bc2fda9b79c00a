"""Closed form: BAQ's rate–distortion allocation, lifted from columns of one matrix to units of a model.

Model: unit u stored at b bits per weight (its size over its `n_u` weights, scales and zeros
included) loses e_u(b) = s_u · 2^(−θ_u·b); one more bit halves the RTN step and quarters the squared
error, so θ ≈ 2. (s_u, θ_u) are fitted by least squares of log2 e against b over the allowed options
with e > 0.

Continuous problem: minimise Σ_u e_u(b_u) subject to Σ_u n_u·b_u ≤ B bits. Stationarity of the
Lagrangian Σ e_u(b_u) + λ·(Σ n_u·b_u − B) gives e_u'(b_u) = −λ·n_u, i.e. s_u·θ_u·ln2·2^(−θ_u·b_u) = λ·n_u:

    b_u(λ) = clamp(log2(s_u·θ_u·ln2 / (λ·n_u)) / θ_u, b_min_u, b_max_u)

(reverse water-filling: every unit not at a bound loses the same λ error per bit). Σ n_u·b_u(λ) falls
as λ grows, so bisection on log2 λ finds the λ that spends B. Rounding keeps the optimality condition,
not the widths: each unit takes its allowed option of least e + λ·size on its *profiled* errors (the
option where its own curve's marginal loss crosses λ; with an exact fit, the continuous b_u rounded
along the unit's convex hull). A knapsack repair then makes the plan exact: while over budget,
downgrade the moves that add least error per needed freed bit; then, while some single move fits
and lowers the error, take such moves, most error removed per bit first. The gap is measured against greedy's LP
bound (a lower bound on the optimum).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitplan.planner.allocators import greedy
from bitplan.planner.problem import (AllocationProblem, Assignment, format_gap, refuse_latency, relative_gap,
                                     require_feasible)

OPTIMAL_GAP = 1e-12  # relative, as greedy's: below this the bound and the value agree up to rounding
BISECT_STEPS = 100  # halvings of the log2 λ bracket; each is one O(U) pass


@dataclass(frozen=True, eq=False)
class Fit:
    """Per-unit curve e(b) = 2^log2_s · 2^(−theta·b), b in bits per weight; `ok` where it was fitted."""

    log2_s: np.ndarray  # [U]
    theta: np.ndarray  # [U] error halvings per bit per weight; <= 0 or not `ok`: bits do not help
    ok: np.ndarray  # [U] bool: >= 2 points of distinct b with error > 0
    r2: np.ndarray  # [U] coefficient of determination in log space (nan below 3 points)
    rms_log2: np.ndarray  # [U] RMS residual in log2 error (0.1 = about 7% relative)


def weights(problem: AllocationProblem) -> np.ndarray:
    """[U] weights per unit; without `problem.numel`, 1 (then b is a size in bits, θ per bit)."""
    return np.ones(problem.n_units) if problem.numel is None else problem.numel.astype(np.float64)


def fit_curves(problem: AllocationProblem) -> Fit:
    """Least squares of log2 error against bits per weight, every unit at once."""
    b = problem.size / weights(problem)[:, None]
    # The plan is the same if a unit's errors all move by a constant; the curve needs e -> 0 from above,
    # so a unit with negative errors is lifted until its least allowed error is 0 (not a fitted point).
    floor = np.minimum(np.where(problem.allowed, problem.error, np.inf).min(axis=1), 0.0)
    error = problem.error - floor[:, None]
    w = (problem.allowed & (error > 0)).astype(np.float64)
    y = np.log2(np.where(w > 0, error, 1.0))
    k = w.sum(axis=1)
    kk = np.maximum(k, 1)
    b_mean = (w * b).sum(axis=1) / kk
    y_mean = (w * y).sum(axis=1) / kk
    db, dy = (b - b_mean[:, None]) * w, (y - y_mean[:, None]) * w
    sbb, sby, syy = (db * db).sum(axis=1), (db * dy).sum(axis=1), (dy * dy).sum(axis=1)
    ok = (k >= 2) & (sbb > 0)
    slope = np.where(ok, sby / np.where(ok, sbb, 1), 0.0)
    ss_res = np.maximum(syy - slope * sby, 0.0)  # least squares: residual = total − explained
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ok & (k >= 3) & (syy > 0), 1 - ss_res / syy, np.nan)
    return Fit(log2_s=y_mean - slope * b_mean, theta=-slope, ok=ok, r2=r2, rms_log2=np.sqrt(ss_res / kk))


def continuous(fit: Fit, n: np.ndarray, b_min: np.ndarray, b_max: np.ndarray,
               budget: float) -> tuple[np.ndarray, float]:
    """([U] bits per weight, log2 λ): the water-filling optimum of the fitted curves within `budget` bits."""
    b = b_min.copy()
    live = np.flatnonzero(fit.ok & (fit.theta > 0))  # units whose error falls with bits; the rest stay at b_min
    if live.size == 0:
        return b, -np.inf
    inv_theta, lo_b, hi_b, n_live = 1 / fit.theta[live], b_min[live], b_max[live], n[live]
    # b_u(λ) = (c_u − log2 λ) / θ_u with c_u = log2(s_u·θ_u·ln2 / n_u)
    c = fit.log2_s[live] + np.log2(fit.theta[live] * np.log(2) / n_live)
    # sums as sum(x * y), not x @ y: a BLAS dot spins up threads, 100x slower on a busy 2-core machine
    fixed = float(np.sum(n * b_min)) - float(np.sum(n_live * lo_b))  # bits of the units that stay at b_min

    def bits(log2_lam: float) -> np.ndarray:
        return np.minimum(np.maximum((c - log2_lam) * inv_theta, lo_b), hi_b)

    lo = float(np.min(c - hi_b / inv_theta))  # every live unit at b_max: the most it can spend
    hi = float(np.max(c - lo_b / inv_theta))  # every live unit at b_min
    if fixed + float(np.sum(n_live * bits(lo))) > budget:
        for _ in range(BISECT_STEPS):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if fixed + float(np.sum(n_live * bits(mid))) <= budget else (mid, hi)
            if hi - lo <= 1e-12 * max(1.0, abs(hi)):
                break
        lo = hi  # hi always spends within budget
    b[live] = bits(lo)
    return b, lo


def round_lagrangian(problem: AllocationProblem, lam: float) -> np.ndarray:
    """[U] each unit's allowed option of least error + λ·size: the integer point where the unit's own
    curve has the continuous optimum's marginal loss λ (error per bit)."""
    return np.argmin(np.where(problem.allowed, problem.error + lam * problem.size, np.inf), axis=1)


def downgrade(problem: AllocationProblem, choice: np.ndarray) -> tuple[np.ndarray, int]:
    """Within budget by the moves that add least error per *needed* freed bit; (choice, moves taken).

    Bits freed beyond the excess are worth nothing here, so a move's loss is divided by
    min(bits it frees, bits still over): a small cheap move that covers the excess beats a big one.
    """
    rows, moves = np.arange(problem.n_units), 0
    choice = choice.copy()
    while (over := problem.total_size(choice) - problem.budget) > 0:
        freed = problem.size[rows, choice][:, None] - problem.size  # bits freed, > 0 on a downgrade
        added = problem.error - problem.error[rows, choice][:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            loss = np.where(problem.allowed & (freed > 0), added / np.minimum(freed, over), np.inf)
        best = np.argmin(loss, axis=1)
        units = np.flatnonzero(np.isfinite(loss[rows, best]))  # never empty: the budget is feasible
        units = units[np.argsort(loss[units, best[units]], kind="stable")]
        # cheapest first, until the bits freed cover the excess (one move per unit per round)
        k = int(np.searchsorted(np.cumsum(freed[units, best[units]]), over)) + 1
        choice[units[:k]] = best[units[:k]]
        moves += min(k, len(units))
    return choice, moves


def improve(problem: AllocationProblem, choice: np.ndarray) -> tuple[np.ndarray, int]:
    """Single moves that fit and lower the error, most error removed per bit first, until none is left."""
    rows, moves = np.arange(problem.n_units), 0
    choice = choice.copy()
    while True:
        left = problem.budget - problem.total_size(choice)
        cost = problem.size - problem.size[rows, choice][:, None]  # bits a move adds (<= 0: frees)
        saved = problem.error[rows, choice][:, None] - problem.error
        can = problem.allowed & (saved > 0) & (cost <= left)
        if not can.any():
            return choice, moves
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.where(can, np.where(cost > 0, saved / cost, np.inf), -np.inf)
        best = np.argmax(gain, axis=1)
        units = np.flatnonzero(can.any(axis=1))
        units = units[np.argsort(-gain[units, best[units]], kind="stable")]
        # each unit's best move, in order, taken while it still fits; the next round re-plans the rest
        for u, o, c in zip(units.tolist(), best[units].tolist(), cost[units, best[units]].tolist()):
            if c <= left:
                choice[u] = o
                left -= c
                moves += 1


def solve(problem: AllocationProblem, *, seed: int = 0, time_limit: float | None = None) -> Assignment:
    """Fitted water-filling, rounded and repaired to the exact budget; deterministic (seed unused)."""
    refuse_latency(problem, "closed_form")
    require_feasible(problem)

    # Data: every unit's curve, in bits per weight, and its range of allowed sizes.
    n = weights(problem)
    fit = fit_curves(problem)
    b_min = problem.min_size() / n
    b_max = np.where(problem.allowed, problem.size, 0).max(axis=1) / n

    # The continuous optimum, then each unit's option at its λ, then the repair to the exact budget.
    b, log2_lam = continuous(fit, n, b_min, b_max, float(problem.budget))
    lam = float(2.0 ** log2_lam)  # error per bit (0 when no unit gains from bits)
    rounded = round_lagrangian(problem, lam)
    choice, down = downgrade(problem, rounded)
    choice, up = improve(problem, choice)

    # Gap to greedy's LP bound (a lower bound on the optimum, so the gap is an upper bound).
    error = problem.total_error(choice)
    bound = float(greedy.solve(problem).info["bound"])
    gap = float(relative_gap(error, bound))
    status = "optimal" if gap <= OPTIMAL_GAP else f"heuristic (gap ≤ {format_gap(gap)})"
    live = fit.ok & (fit.theta > 0)
    return Assignment(choice, status, {
        "bound": bound, "gap": gap, "lam": lam,
        "theta_median": _median(fit.theta[fit.ok]), "fit_r2_median": _median(fit.r2),
        "fit_rms_log2_median": _median(fit.rms_log2[fit.ok]), "units_fitted": int(live.sum()),
        "continuous_bits": float(np.sum(n * b)), "continuous_error": _model_error(fit, b, live),
        "rounded_error": problem.total_error(rounded), "moves_down": down, "moves_up": up,
    })


def _model_error(fit: Fit, b: np.ndarray, live: np.ndarray) -> float:
    """Σ s·2^(−θ·b) over the fitted units: what the curves predict for the continuous optimum."""
    return float(np.sum(2.0 ** (fit.log2_s - fit.theta * b)[live]))


def _median(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else None
