"""The multiple-choice knapsack every `ilp` backend solves, reduced by the Lagrangian bound first.

Structure exploited: the LP relaxation of a multiple-choice knapsack has at most two fractional
variables, and `greedy` (the hull walk in Lagrangian order) finds both its optimum, the *bound* L,
and an integer plan, the *incumbent* UB, with UB - L tiny (1e-5 relative at DeepSeek-V3 scale).
With greedy's multiplier λ (error per bit), every plan x obeys

    error(x) >= L(λ) + Σ_u rc_u(x_u),   rc_u(o) = c_u(o) + λ·w_u(o) - min_o' (c_u(o') + λ·w_u(o')) >= 0

(`L(λ) = Σ_u min_o (c + λw) - λ·cap` is the Lagrangian dual, the LP bound at greedy's λ). So an
option with rc_u(o) > UB - L(λ) is in no plan better than greedy's and is dropped (reduced-cost
fixing); a unit left with one option keeps greedy's. Usually a few hundred of 45,000 units stay
free, and any backend proves the rest in well under a second. The answer is exact: the optimum of
the reduced model is either better than greedy's plan (then it is the optimum) or greedy's plan is.

Coefficients for the solvers: sizes as integer steps of q bits above each unit's smallest option
(q = gcd of the steps and the slack, so the budget row is exact); costs as error above each free
unit's least *remaining* option, `cost` in error units and `norm`alised to [0, 1] in `c` (CBC's and
HiGHS's tolerances are absolute; raw errors ~1e-6 and raw bits ~1e9 would mislead them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bitplan.planner.problem import AllocationProblem, Assignment

FIX_TOL = 1e-9  # relative slack on UB - L before an option is dropped: float sums of 45k terms are far finer


@dataclass
class Model:
    """The reduced knapsack. Pairs (unit `pu` in 0..F-1, option `po`) with `w` steps, `cost`, `c`."""

    free: np.ndarray  # [F] original unit index of each free unit
    pu: np.ndarray  # [P] free-unit index of each pair (sorted by unit, then option)
    po: np.ndarray  # [P] option of each pair
    w: np.ndarray  # [P] int64 size in steps of q bits above the unit's smallest option
    cost: np.ndarray  # [P] error above the free unit's least remaining option (error units, >= 0)
    c: np.ndarray  # [P] cost / norm, in [0, 1]
    norm: float  # error units per unit of c
    cap: int  # steps the free units may use in all
    const: float  # error of the fixed units plus every free unit's least remaining error
    hint: np.ndarray  # [F] greedy's option for each free unit (a feasible plan)
    lp_bound: float  # greedy's LP / Lagrangian lower bound on the whole problem's error
    incumbent: float  # greedy's plan's error (UB)
    info: dict = field(default_factory=dict)

    @property
    def n_free(self) -> int:
        return len(self.free)

    def pairs_of(self, sub: np.ndarray) -> np.ndarray:
        """[F] pair index of option `sub[f]` of each free unit f (pairs are sorted by unit, then option)."""
        O = int(self.po.max(initial=0)) + 1
        return np.searchsorted(self.pu * O + self.po, np.arange(self.n_free) * O + np.asarray(sub))


def build(problem: AllocationProblem, start: Assignment, reduce: bool = True) -> Model:
    """The reduced model of `problem` around greedy's answer `start` (reduce=False keeps every option)."""
    allowed, error = problem.allowed, problem.error
    U = problem.n_units
    rows = np.arange(U)
    q = problem.quantum()
    steps = (problem.size - problem.min_size()[:, None]) // q
    cap = (problem.budget - problem.smallest()) // q
    incumbent = problem.total_error(start.choice)

    # Reduced-cost fixing (module docstring): keep o when rc_u(o) <= UB - L(λ), and greedy's option always.
    keep = allowed.copy()
    lagrange = None
    if reduce:
        lam = float(start.info.get("lam", 0.0)) * q  # error per step
        pen = np.where(allowed, error + lam * steps, np.inf)
        best = pen.min(axis=1)
        lagrange = float(best.sum() - lam * cap)
        room = incumbent - lagrange
        keep &= (pen - best[:, None]) <= room + FIX_TOL * (abs(incumbent) + abs(lagrange))
        keep[rows, start.choice] = True

    # Units left with one option are fixed at it (greedy's); the others are the model.
    n_keep = keep.sum(axis=1)
    free = np.flatnonzero(n_keep > 1)
    fixed = np.flatnonzero(n_keep == 1)
    cap_free = int(cap - steps[fixed, start.choice[fixed]].sum())
    base = np.where(keep[free], error[free], np.inf).min(axis=1)
    pu, po = np.nonzero(keep[free])
    cost = error[free][pu, po] - base[pu]
    norm = float(cost.max()) if cost.size and cost.max() > 0 else 1.0
    return Model(
        free=free, pu=pu, po=po, w=steps[free][pu, po].astype(np.int64), cost=cost, c=cost / norm,
        norm=norm, cap=cap_free, const=float(error[fixed, start.choice[fixed]].sum() + base.sum()),
        hint=start.choice[free], lp_bound=float(start.info["bound"]), incumbent=incumbent,
        info={"free_units": int(len(free)), "pairs": int(len(pu)), "quantum_bits": int(q),
              "lagrangian_bound": lagrange})


def expand(model: Model, start: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """The whole plan: greedy's choice with the free units' options replaced by `sub`."""
    choice = np.array(start, dtype=np.int64, copy=True)
    choice[model.free] = sub
    return choice


def pick(model: Model, x: np.ndarray) -> np.ndarray:
    """[F] option per free unit from a 0/1 vector over pairs (the largest x of each unit wins)."""
    order = np.lexsort((-x, model.pu))  # by unit, then largest x first
    first = np.r_[0, np.flatnonzero(np.diff(model.pu[order])) + 1]
    return model.po[order[first]]


@dataclass
class Outcome:
    """A backend's answer on the reduced model: options of the free units (None: no solution found),
    whether the solver proved it optimal on its model, a lower bound in error units on the whole
    problem (None: none known), whether it stopped on the time limit, and what it reports."""

    sub: np.ndarray | None
    optimal: bool
    bound: float | None
    timed_out: bool
    info: dict = field(default_factory=dict)
