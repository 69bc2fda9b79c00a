"""The allocation problem every allocator solves, and the Assignment every allocator returns.

A multiple-choice knapsack: each of U units takes exactly one of O options; option o of unit u
costs `size[u, o]` bits and adds `error[u, o]` (additive error model); the chosen sizes must sum
to at most `budget` bits; only `allowed[u, o]` pairs may be chosen (pins, missing options).

Optionally a second knapsack row: option o of unit u takes `latency[u, o]` seconds (at one batch
size) and the chosen latencies must sum to at most `latency_budget` seconds. The row is held in
whole picoseconds (`latency_ps`, each entry rounded *up*; `latency_budget_ps`, rounded down), so
that it is as exact as the size row: a plan within `latency_budget_ps` is within the budget in
seconds too, and the predicted latency over-states the table's by less than 1 ps per unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal

import numpy as np

from bitplan.db.types import InfeasibleBudget, InvalidInput

PS = 1e-12  # seconds per picosecond, the latency row's integer step


@dataclass(frozen=True, eq=False)
class AllocationProblem:
    """`error [U, O]` float64, `size [U, O]` int64 bits, `allowed [U, O]` bool, `budget` bits;
    optional `numel [U]` weights per unit, so an allocator can speak bits per weight; optional
    `latency [U, O]` seconds and `latency_budget` seconds (the module docstring); `objective` names
    what `error` holds when it is not the predicted error alone (e.g. "error+0.5*latency")."""

    error: np.ndarray
    size: np.ndarray
    allowed: np.ndarray
    budget: int
    numel: np.ndarray | None = None
    latency: np.ndarray | None = None
    latency_budget: float | None = None
    objective: str = "error"
    latency_ps: np.ndarray | None = field(default=None, init=False, repr=False)  # [U, O] int64
    latency_budget_ps: int | None = field(default=None, init=False)

    def __post_init__(self):
        # frozen: coerce through object.__setattr__, once, so allocators can trust dtypes and shapes
        error = np.ascontiguousarray(self.error, dtype=np.float64)
        size = np.ascontiguousarray(self.size, dtype=np.int64)
        allowed = np.ascontiguousarray(self.allowed, dtype=bool)
        if error.ndim != 2 or error.shape != size.shape or error.shape != allowed.shape:
            raise InvalidInput(f"error {error.shape}, size {size.shape} and allowed {allowed.shape} "
                               "must all be [units, options]")
        if error.size == 0:
            raise InvalidInput("an allocation problem needs at least one unit and one option")
        if np.any(size <= 0):
            raise InvalidInput("sizes must be > 0 bits")
        if not np.all(np.isfinite(error[allowed])):
            raise InvalidInput("errors of allowed options must be finite")
        empty = np.flatnonzero(~allowed.any(axis=1))
        if empty.size:
            raise InvalidInput(f"units {empty[:5].tolist()} have no allowed option")
        arrays = [("error", error), ("size", size), ("allowed", allowed)]
        if self.numel is not None:
            numel = np.ascontiguousarray(self.numel, dtype=np.int64)
            if numel.shape != (error.shape[0],) or np.any(numel <= 0):
                raise InvalidInput(f"numel {numel.shape} must be [units] positive weight counts")
            arrays.append(("numel", numel))
        if self.latency is not None:
            latency = np.ascontiguousarray(self.latency, dtype=np.float64)
            if latency.shape != error.shape:
                raise InvalidInput(f"latency {latency.shape} must be [units, options] like error {error.shape}")
            if not np.all(np.isfinite(latency[allowed])) or np.any(latency[allowed] < 0):
                raise InvalidInput("latencies of allowed options must be finite and >= 0 seconds")
            # rounded up (module docstring); disallowed pairs get 0 and are never read
            ps = np.where(allowed, np.ceil(np.where(allowed, latency, 0.0) * 1e12), 0).astype(np.int64)
            arrays += [("latency", latency), ("latency_ps", ps)]
        if self.latency_budget is not None:
            if self.latency is None:
                raise InvalidInput("a latency budget needs a latency table")
            if not math.isfinite(self.latency_budget) or self.latency_budget <= 0:
                raise InvalidInput(f"latency budget must be a positive number of seconds, got {self.latency_budget}")
            # Decimal of the shortest repr: 0.008 s is 8,000,000,000 ps, not one less
            object.__setattr__(self, "latency_budget_ps", int(Decimal(repr(float(self.latency_budget))) * 10**12))
        for name, arr in arrays:
            arr = arr.view()  # read-only view: the caller's own array keeps its flags
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "budget", int(self.budget))

    @property
    def n_units(self) -> int:
        return self.error.shape[0]

    @property
    def n_options(self) -> int:
        return self.error.shape[1]

    def min_size(self) -> np.ndarray:
        """[U] smallest allowed size of each unit, bits."""
        return np.where(self.allowed, self.size, np.iinfo(np.int64).max).min(axis=1)

    def smallest(self) -> int:
        """Bits of the smallest plan: every unit at its smallest allowed option."""
        return int(self.min_size().sum())

    def largest(self) -> int:
        """Bits of the largest plan: every unit at its largest allowed option."""
        return int(np.where(self.allowed, self.size, 0).max(axis=1).sum())

    def smallest_choice(self) -> np.ndarray:
        """[U] the option of least size per unit (least error among equal sizes)."""
        big = np.iinfo(np.int64).max
        size = np.where(self.allowed, self.size, big)
        error = np.where(self.allowed, self.error, np.inf)
        # lexsort's last key is the primary one: size first, then error, then option index
        order = np.lexsort((error, size), axis=1)
        return order[:, 0]

    def total_size(self, choice: np.ndarray) -> int:
        """Bits of a choice."""
        return int(self.size[np.arange(self.n_units), choice].sum())

    def total_error(self, choice: np.ndarray) -> float:
        """Predicted error of a choice (additive model)."""
        return float(self.error[np.arange(self.n_units), choice].sum())

    def total_latency_ps(self, choice: np.ndarray) -> int:
        """Latency of a choice in whole picoseconds (the row the latency budget constrains)."""
        return int(self.latency_ps[np.arange(self.n_units), choice].sum())

    def memory_only(self) -> "AllocationProblem":
        """The same problem without the latency row: a relaxation, so its bounds hold for this one."""
        return AllocationProblem(self.error, self.size, self.allowed, self.budget, self.numel)

    def quantum(self) -> int:
        """gcd of every allowed size above the unit's smallest and of the slack: the exact bit step."""
        extra = (self.size - self.min_size()[:, None])[self.allowed]
        slack = max(self.budget - self.smallest(), 0)
        return int(np.gcd.reduce(np.append(extra, slack))) or 1


@dataclass
class Assignment:
    """An allocator's answer: `choice [U]` option index per unit, a status in words, free `info`."""

    choice: np.ndarray
    status: str
    info: dict = field(default_factory=dict)


def require_feasible(problem: AllocationProblem) -> None:
    """Raise InfeasibleBudget when even the smallest plan exceeds the budget."""
    smallest = problem.smallest()
    if problem.budget < smallest:
        raise InfeasibleBudget(f"budget {problem.budget} bits is below the smallest plan, {smallest} bits",
                               smallest_bits=smallest)


class InfeasibleLatency(InfeasibleBudget):
    """The latency budget is below the fastest plan within the memory budget (`smallest_seconds`)."""

    def __init__(self, message: str, smallest_seconds: float):
        super().__init__(message, smallest_bits=-1)
        self.smallest_seconds = smallest_seconds


def refuse_latency(problem: AllocationProblem, allocator: str) -> None:
    """For allocators that see one knapsack row and the error alone: refuse what they would ignore."""
    if problem.latency_budget is not None or problem.objective != "error":
        what = "a latency budget" if problem.latency_budget is not None else f"objective {problem.objective!r}"
        raise InvalidInput(f"allocator {allocator!r} cannot honour {what}: use --allocator ilp")


def relative_gap(value: float, bound: float) -> float:
    """(value - bound) / value, 0 when both are 0; the gap every status string reports."""
    if value <= 0:
        return 0.0
    return max(value - bound, 0.0) / value


def format_gap(gap: float) -> str:
    """A gap as a percentage rounded *up* (so "gap ≤ x%" stays true): 0.01234 -> '1.24%'."""
    return f"{math.ceil(gap * 1e4 - 1e-9) / 1e2:g}%"
