"""What the search measures candidates with: the `FitnessOracle` protocol, the `SearchContext` that
carries one into `allocate`, the pure-numpy `AdditiveOracle`, and `OnModules`, which lets an oracle of
modules score the problem's units."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from bitplan.planner.problem import AllocationProblem


class FitnessOracle(Protocol):
    """What the search measures candidates with.  `choice` is `[U]` option per unit of the problem
    (after `solve`'s `unit` lifting: per module); lower fitness is better.

    Optional: `prepare(choice, rows)` — called with each generation's parent and all its rows before
    any `fitness` call of that generation, so an oracle can cache the parent's work; `fitness_rows(choice,
    rows)` — the fitness of each row, whose mean is `fitness` (else the search asks row by row); `describe()`
    — a JSON-able dict of what the oracle measures on (recorded in plans and search states);
    `fitness_rows_many(choices, rows)` and `fitness_many(choices, rows)` — several candidates at once (an
    oracle on a cluster scores them in parallel), each what `fitness_rows` and `fitness` give.
    """

    n_rows: int  # fitness rows (sequences) available to stages: row indices 0..n_rows-1
    row_tokens: int  # tokens per row
    tokens_used: int  # every token fed through a forward pass so far

    def fitness(self, choice: np.ndarray, rows: Sequence[int]) -> float: ...

    def heldout(self, choice: np.ndarray) -> float: ...


@dataclass
class SearchContext:
    """What `allocate(..., context=)` hands the evolutionary allocator: the oracle, where to keep the
    resumable search state (None: nowhere), and whether to show a progress bar."""

    oracle: FitnessOracle
    state_path: str | Path | None = None
    progress: bool = False

    def describe(self) -> dict:
        describe = getattr(self.oracle, "describe", None)
        return describe() if describe else {"oracle": type(self.oracle).__name__}


class AdditiveOracle:
    """Pure numpy: fitness = the problem's additive error + `noise` x (mean of one seeded N(0, 1) draw
    per (choice, row)), so more rows mean less noise, as with real tokens.  Held-out rows are
    `n_rows..n_rows+heldout_rows-1`.  With `noise=0` the fitness *is* the estimator."""

    def __init__(self, problem: AllocationProblem, *, n_rows: int = 8, row_tokens: int = 64,
                 heldout_rows: int = 4, noise: float = 0.0, seed: int = 0):
        self.problem, self.n_rows, self.row_tokens = problem, n_rows, row_tokens
        self.heldout_rows, self.noise, self.seed = heldout_rows, noise, seed
        self.tokens_used = 0

    def fitness_rows(self, choice: np.ndarray, rows: Sequence[int]) -> list[float]:
        self.tokens_used += len(rows) * self.row_tokens
        value = self.problem.total_error(choice)
        key = zlib.crc32(np.asarray(choice, dtype=np.int64).tobytes())
        return [value + (self.noise * float(np.random.default_rng([self.seed, key, int(r)]).standard_normal())
                         if self.noise else 0.0) for r in rows]

    def _score(self, choice: np.ndarray, rows: Sequence[int]) -> float:
        return float(np.mean(self.fitness_rows(choice, rows)))

    def fitness(self, choice: np.ndarray, rows: Sequence[int]) -> float:
        return self._score(choice, rows)

    def heldout(self, choice: np.ndarray) -> float:
        return self._score(choice, range(self.n_rows, self.n_rows + self.heldout_rows))

    def describe(self) -> dict:
        return {"oracle": "additive", "noise": self.noise, "seed": self.seed, "n_rows": self.n_rows,
                "row_tokens": self.row_tokens, "heldout_rows": self.heldout_rows}


class OnModules:
    """Lifts a module-level oracle to the problem's units: unit u's option goes to every module m with
    `unit[m] == u`."""

    def __init__(self, oracle: FitnessOracle, unit: np.ndarray):
        self.oracle, self.unit = oracle, np.asarray(unit, dtype=np.int64)
        self.n_rows, self.row_tokens = oracle.n_rows, oracle.row_tokens

    @property
    def tokens_used(self) -> int:
        return self.oracle.tokens_used

    def fitness(self, choice, rows):
        return self.oracle.fitness(choice[self.unit], rows)

    def fitness_rows(self, choice, rows):
        from bitplan.planner.allocators.evolutionary.search import fitness_rows
        return fitness_rows(self.oracle, choice[self.unit], rows)

    def heldout(self, choice):
        return self.oracle.heldout(choice[self.unit])

    def prepare(self, choice, rows):
        if hasattr(self.oracle, "prepare"):
            self.oracle.prepare(choice[self.unit], rows)
