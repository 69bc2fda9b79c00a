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

With a latency budget (a second row, integer picoseconds `lw` above each free unit's fastest
remaining option, `lcap` in all) the fixing above is *extended*, not skipped. For any multipliers
λ, μ >= 0 and every plan x that meets both rows,

    error(x) >= L(λ, μ) + Σ_u rc_u(x_u),   rc_u(o) = c + λ·w + μ·ℓ - min_o' (c + λ·w + μ·ℓ)

(`L(λ, μ) = Σ_u min_o (c + λw + μℓ) - λ·cap - μ·lcap`), so dropping options with rc_u(o) > UB - L(λ, μ)
stays exact provided UB is the error of a plan that meets *both* rows. `Anchor` carries that plan
and the multipliers (`ilp` finds them: greedy's plan when it meets the latency budget, with μ = 0;
otherwise the best of the fastest plan and greedy's plans on error + μ·latency over a search on μ).
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
    hint: np.ndarray  # [F] the anchor's option for each free unit (a feasible plan)
    lp_bound: float  # a lower bound on the whole problem's error (LP / Lagrangian)
    incumbent: float  # the anchor plan's error (UB)
    info: dict = field(default_factory=dict)
    base: np.ndarray | None = None  # [U] the anchor plan: every unit's option, fixed units included
    lw: np.ndarray | None = None  # [P] int64 picoseconds above the free unit's fastest remaining option
    lcap: int | None = None  # picoseconds the free units may add in all (None: no latency row)

    @property
    def n_free(self) -> int:
        return len(self.free)

    def pairs_of(self, sub: np.ndarray) -> np.ndarray:
        """[F] pair index of option `sub[f]` of each free unit f (pairs are sorted by unit, then option)."""
        O = int(self.po.max(initial=0)) + 1
        return np.searchsorted(self.pu * O + self.po, np.arange(self.n_free) * O + np.asarray(sub))


@dataclass
class Anchor:
    """A plan that meets every row (`choice`, error `value`), multipliers λ (error per bit) and μ
    (error per picosecond of latency) for the fixing, and a known lower bound on the optimum."""

    choice: np.ndarray
    value: float
    lam: float
    mu: float
    bound: float

    @classmethod
    def of_greedy(cls, problem: AllocationProblem, start: Assignment) -> "Anchor":
        """Greedy's plan and bound (μ = 0): the anchor whenever greedy's plan meets every row."""
        return cls(start.choice, problem.total_error(start.choice), float(start.info.get("lam", 0.0)), 0.0,
                   float(start.info["bound"]))


def build(problem: AllocationProblem, start: Assignment | Anchor, reduce: bool = True) -> Model:
    """The reduced model of `problem` around `start`: greedy's answer, or an Anchor (reduce=False keeps
    every option)."""
    anchor = start if isinstance(start, Anchor) else Anchor.of_greedy(problem, start)
    allowed, error = problem.allowed, problem.error
    U = problem.n_units
    rows = np.arange(U)
    q = problem.quantum()
    steps = (problem.size - problem.min_size()[:, None]) // q
    cap = (problem.budget - problem.smallest()) // q
    incumbent = anchor.value
    timed = problem.latency_budget_ps is not None
    if timed:
        lat = problem.latency_ps
        fastest = np.where(allowed, lat, np.iinfo(np.int64).max).min(axis=1)
        lsteps, lcap = lat - fastest[:, None], problem.latency_budget_ps - int(fastest.sum())

    # Reduced-cost fixing (module docstring): keep o when rc_u(o) <= UB - L(λ, μ), and the anchor's always.
    keep = allowed.copy()
    lagrange = None
    if reduce:
        lam = anchor.lam * q  # error per step
        pen = error + lam * steps
        if timed and anchor.mu:
            pen = pen + anchor.mu * lsteps
        pen = np.where(allowed, pen, np.inf)
        best = pen.min(axis=1)
        lagrange = float(best.sum() - lam * cap - (anchor.mu * lcap if timed else 0.0))
        room = incumbent - lagrange
        keep &= (pen - best[:, None]) <= room + FIX_TOL * (abs(incumbent) + abs(lagrange))
        keep[rows, anchor.choice] = True

    # Units left with one option are fixed at it (the anchor's); the others are the model.
    n_keep = keep.sum(axis=1)
    free = np.flatnonzero(n_keep > 1)
    fixed = np.flatnonzero(n_keep == 1)
    cap_free = int(cap - steps[fixed, anchor.choice[fixed]].sum())
    base = np.where(keep[free], error[free], np.inf).min(axis=1)
    pu, po = np.nonzero(keep[free])
    cost = error[free][pu, po] - base[pu]
    norm = float(cost.max()) if cost.size and cost.max() > 0 else 1.0
    lw = lcap_free = None
    if timed:
        quickest = np.where(keep[free], lat[free], np.iinfo(np.int64).max).min(axis=1)
        lw = (lat[free][pu, po] - quickest[pu]).astype(np.int64)
        lcap_free = int(problem.latency_budget_ps - lat[fixed, anchor.choice[fixed]].sum() - quickest.sum())
    lp_bound = anchor.bound
    if timed and lagrange is not None:
        lp_bound = max(lp_bound, lagrange)  # valid for any λ, μ >= 0 (module docstring)
    return Model(
        free=free, pu=pu, po=po, w=steps[free][pu, po].astype(np.int64), cost=cost, c=cost / norm,
        norm=norm, cap=cap_free, const=float(error[fixed, anchor.choice[fixed]].sum() + base.sum()),
        hint=anchor.choice[free], lp_bound=float(lp_bound), incumbent=incumbent,
        info={"free_units": int(len(free)), "pairs": int(len(pu)), "quantum_bits": int(q),
              "lagrangian_bound": lagrange, **({"mu_per_ps": anchor.mu} if timed else {})},
        base=np.asarray(anchor.choice, dtype=np.int64), lw=lw, lcap=lcap_free)


def latency_ok(model: Model, sub: np.ndarray) -> bool:
    """Whether the free units' options `sub` meet the latency row, in exact integers (solvers' rows
    hold within a tolerance only)."""
    return model.lw is None or int(model.lw[model.pairs_of(sub)].sum()) <= model.lcap


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
