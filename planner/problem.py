"""The allocation problem every allocator solves, and the Assignment every allocator returns.

A multiple-choice knapsack: each of U units takes exactly one of O options; option o of unit u
costs `size[u, o]` bits and adds `error[u, o]` (additive error model); the chosen sizes must sum
to at most `budget` bits; only `allowed[u, o]` pairs may be chosen (pins, missing options).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bitplan.db.types import InfeasibleBudget, InvalidInput


@dataclass(frozen=True, eq=False)
class AllocationProblem:
    """`error [U, O]` float64, `size [U, O]` int64 bits, `allowed [U, O]` bool, `budget` bits;
    optional `numel [U]` weights per unit, so an allocator can speak bits per weight."""

    error: np.ndarray
    size: np.ndarray
    allowed: np.ndarray
    budget: int
    numel: np.ndarray | None = None

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


def relative_gap(value: float, bound: float) -> float:
    """(value - bound) / value, 0 when both are 0; the gap every status string reports."""
    if value <= 0:
        return 0.0
    return max(value - bound, 0.0) / value


def format_gap(gap: float) -> str:
    """A gap as a percentage rounded *up* (so "gap ≤ x%" stays true): 0.01234 -> '1.24%'."""
    return f"{math.ceil(gap * 1e4 - 1e-9) / 1e2:g}%"
