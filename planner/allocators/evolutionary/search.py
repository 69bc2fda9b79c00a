"""The search loop: `solve`, one generation (offspring, staged selection, held-out tracking), the
stopping rules and the report (the package docstring describes the method)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitplan.db.types import InvalidInput
from bitplan.planner.allocators.evolutionary.mutation import Mutator
from bitplan.planner.allocators.evolutionary.oracle import FitnessOracle, OnModules, SearchContext
from bitplan.planner.allocators.evolutionary.state import SearchState, read_state, state_key, write_state
from bitplan.planner.problem import AllocationProblem, Assignment, refuse_latency, require_feasible

DEFAULT_STAGE_ROWS = (1, 2, 4)  # fitness rows per stage when `stage_tokens` is not given
# the final contest (`race`) scores more rows while child and parent are within RACE_Z standard errors,
# up to RACE_ROWS times the last stage's rows
RACE_Z, RACE_ROWS = 2.0, 4
IMPROVEMENT = 1e-12  # relative; a held-out value must beat the best by more than this to count

Child = tuple[np.ndarray, int]  # a plan and its total bits


@dataclass(frozen=True)
class SearchParams:
    """The search's knobs that do not depend on the oracle, checked once on construction."""

    seed: int
    generations: int
    offspring: int
    max_swaps: int
    explore: float
    patience: int | None
    start: str
    time_limit: float | None

    def __post_init__(self):
        if self.generations < 0 or self.offspring < 1 or self.max_swaps < 1 or not 0 <= self.explore <= 1 or (
                self.patience is not None and self.patience < 1):
            raise InvalidInput("evolutionary needs generations >= 0, offspring >= 1, max_swaps >= 1, "
                               "0 <= explore <= 1 and patience >= 1 (or None)")
        if self.start == "evolutionary":
            raise InvalidInput("evolutionary cannot start from itself; give start='ilp' or another allocator")


@dataclass(frozen=True)
class Stages:
    """Fitness rows scored at each stage, and how many children survive each stage but the last."""

    rows: list[int]
    survivors: list[int]

    @classmethod
    def for_oracle(cls, oracle: FitnessOracle, offspring: int, stage_tokens: Sequence[int] | None,
                   survivors: Sequence[int] | None) -> Stages:
        """From the caller's tokens per stage and survivors, or the defaults (package docstring)."""
        if stage_tokens is None:
            rows = [min(r, oracle.n_rows) for r in DEFAULT_STAGE_ROWS]
        else:
            rows = [-(-int(t) // oracle.row_tokens) for t in stage_tokens]
            if not rows or min(rows) <= 0 or max(rows) > oracle.n_rows:
                raise InvalidInput(f"stage_tokens {list(stage_tokens)} must be positive and at most the "
                                   f"fitness pool of {oracle.n_rows * oracle.row_tokens} tokens")
        S = len(rows)
        if survivors is None:
            # geometric from `offspring` down to one contest of the last stage
            survivors = [max(1, round(offspring ** (1 - (i + 1) / S))) for i in range(S - 1)]
        survivors = [int(k) for k in survivors]
        if len(survivors) != S - 1 or any(k < 1 for k in survivors) or any(
                b > a for a, b in zip([offspring, *survivors], survivors)):
            raise InvalidInput(f"survivors {survivors} must give one non-increasing count (>= 1, <= "
                               f"offspring) for each of the {S - 1} stages before the last")
        return cls(rows, survivors)

    def draw(self, rng: np.random.Generator, n_rows: int) -> tuple[list[list[int]], list[int]]:
        """A generation's rows: consecutive slices of a seeded permutation of the pool, one per stage,
        disjoint while the pool lasts; and the rows no stage drew (the final contest's reserve)."""
        perm = rng.permutation(n_rows)
        offsets = np.cumsum([0, *self.rows])
        drawn = [[int(perm[(o + j) % n_rows]) for j in range(r)] for o, r in zip(offsets[:-1], self.rows)]
        return drawn, [int(r) for r in perm[offsets[-1]:]]


def fitness_rows(oracle: FitnessOracle, choice: np.ndarray, rows: Sequence[int]) -> np.ndarray:
    """`choice`'s fitness on each of `rows` (the oracle's `fitness_rows` where it has one)."""
    each = getattr(oracle, "fitness_rows", None)
    return np.asarray(each(choice, rows) if each else [oracle.fitness(choice, [r]) for r in rows], dtype=float)


def scored(oracle: FitnessOracle, choices: list[np.ndarray], rows: Sequence[int]) -> np.ndarray:
    """`[choices, rows]` fitness of each choice on each row: all at once where the oracle scores several
    candidates together (`fitness_rows_many`: on a cluster's workers), else one by one."""
    many = getattr(oracle, "fitness_rows_many", None)
    if many is not None:
        return np.asarray(many(choices, rows), dtype=float)
    return np.array([fitness_rows(oracle, c, rows) for c in choices])


def means(oracle: FitnessOracle, choices: list[np.ndarray], rows: Sequence[int]) -> list[float]:
    """Each choice's fitness on `rows`, all at once where the oracle can (`fitness_many`)."""
    many = getattr(oracle, "fitness_many", None)
    return list(many(choices, rows)) if many is not None else [oracle.fitness(c, rows) for c in choices]


def staged_selection(oracle: FitnessOracle, parent: np.ndarray, kids: list[Child],
                     stage_rows: list[list[int]], survivors: list[int],
                     reserve: Sequence[int] = ()) -> tuple[Child | None, float]:
    """Staged (1+λ) selection: cut `kids` down on more and more rows (`cut`); at the last stage the best
    child meets the parent (`race`), and only a better child replaces it.  The winning child (None: the
    parent stays) and the best mean fitness of the contest."""
    alive = kids
    for rows, keep in zip(stage_rows[:-1], survivors):
        alive = [alive[j] for j in cut(scored(oracle, [kid for kid, _ in alive], rows), keep)]
    scores = means(oracle, [kid for kid, _ in alive], stage_rows[-1])
    child = alive[int(np.argmin(scores))]
    wins, child_mean, parent_mean = race(oracle, child[0], parent, stage_rows[-1], reserve)
    return (child if wins else None), min(child_mean, parent_mean)


def cut(scores: np.ndarray, keep: int, z: float = RACE_Z) -> list[int]:
    """The candidates that go on from a stage, given their fitness `scores [candidates, rows]`: the `keep`
    best by mean, less those whose paired difference to the stage's best is more than `z` standard errors
    above zero (on two rows or more): a candidate already clearly worse gets no more tokens, so a stage
    whose candidates differ by more than the noise passes fewer of them on."""
    means = scores.mean(axis=1)
    order = np.argsort(means, kind="stable")[:keep]
    if scores.shape[1] < 2:
        return [int(j) for j in order]
    d = scores - scores[order[0]]
    se = d.std(axis=1, ddof=1) / np.sqrt(scores.shape[1])
    return [int(j) for j in order if not d[j].mean() > z * se[j]]


def race(oracle: FitnessOracle, child: np.ndarray, parent: np.ndarray, rows: Sequence[int],
         reserve: Sequence[int] = (), z: float = RACE_Z) -> tuple[bool, float, float]:
    """Child against parent, paired row by row: while the mean difference lies within `z` standard errors
    of zero, another `len(rows)` rows of `reserve` are scored, up to `RACE_ROWS` times `rows` (the tokens go
    where the contest is close, not where one side is clearly better); the child wins if its mean is lower
    on all rows scored.
    Returns (child wins, child's mean, parent's mean)."""
    rows, reserve = list(rows), list(reserve)[:(RACE_ROWS - 1) * len(rows)]
    c, p = fitness_rows(oracle, child, rows), fitness_rows(oracle, parent, rows)
    while reserve and len(c) > 1:
        d = c - p
        if abs(d.mean()) > z * d.std(ddof=1) / np.sqrt(len(d)):
            break
        more, reserve = reserve[:len(rows)], reserve[len(rows):]
        c = np.concatenate([c, fitness_rows(oracle, child, more)])
        p = np.concatenate([p, fitness_rows(oracle, parent, more)])
    return bool(c.mean() < p.mean()), float(c.mean()), float(p.mean())


def solve(problem: AllocationProblem, *, seed: int = 0, time_limit: float | None = None,
          context: SearchContext | FitnessOracle | None = None, unit: np.ndarray | None = None,
          generations: int = 20, offspring: int = 16, stage_tokens: Sequence[int] | None = None,
          survivors: Sequence[int] | None = None, max_swaps: int = 3, explore: float = 0.25,
          patience: int | None = 8, start: str = "ilp", fitness_tokens: int | None = None,
          heldout_tokens: int | None = None) -> Assignment:
    """Evolutionary search from `start`'s plan on `context`'s fitness oracle (package docstring).

    `unit[m]` (from `allocate`) maps the oracle's modules to the problem's units; without it the oracle
    scores unit choices directly.  `fitness_tokens` / `heldout_tokens` are the sizes of the oracle's
    fitness pool and held-out split: whoever builds the oracle reads them from the request
    (`planner/app/usecases.py`'s `search_context`), and the search only checks that its oracle has them.
    """
    started = time.perf_counter()  # the time limit counts the start allocator too
    refuse_latency(problem, "evolutionary")
    if context is None:
        raise InvalidInput("allocator 'evolutionary' measures the model's KL and needs the model: plan a "
                           "stored profile whose model can be loaded (bitplan plan PROFILE --allocator "
                           "evolutionary), or pass allocate(..., context=SearchContext(oracle))")
    if not isinstance(context, SearchContext):
        context = SearchContext(context)
    params = SearchParams(seed, generations, offspring, max_swaps, explore, patience, start, time_limit)
    require_feasible(problem)
    _check_pool(context, pool_sizes({"fitness_tokens": fitness_tokens, "heldout_tokens": heldout_tokens}))
    oracle = context.oracle if unit is None else OnModules(context.oracle, unit)
    stages = Stages.for_oracle(oracle, offspring, stage_tokens, survivors)

    path = Path(context.state_path).expanduser() if context.state_path else None
    key = state_key(problem, unit, context, {
        "seed": seed, "offspring": offspring, "stages": stages.rows, "survivors": stages.survivors,
        "max_swaps": max_swaps, "explore": explore, "start": start})
    state = read_state(path, key) if path else None
    if state is None:
        state = _start_state(problem, oracle, params, key)
        if path:
            write_state(path, state)
    search = _Search(problem, oracle, context, params, stages, state, path, started)
    return search.report(search.run())


def pool_sizes(params: dict) -> dict[str, int]:
    """The fitness pool and held-out sizes that search parameters ask for (those given), checked: what the
    builder of the oracle reads before it loads anything."""
    pool = {k: params[k] for k in ("fitness_tokens", "heldout_tokens") if params.get(k) is not None}
    for k, v in pool.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidInput(f"{k} must be a positive whole number of tokens, not {v!r}")
    return pool


def _check_pool(context: SearchContext, pool: dict[str, int]) -> None:
    """InvalidInput when the oracle's pools (its `describe()`, in whole rows) are not the sizes asked."""
    described = context.describe()
    row = described.get("row_tokens")
    for key, asked in pool.items():
        if key in described and row and described[key] != asked // row * row:
            raise InvalidInput(f"the fitness oracle has {described[key]} {key.replace('_', ' ')}, not the {asked} "
                               f"asked: build it with {key}={asked}")


def _start_state(problem: AllocationProblem, oracle: FitnessOracle, params: SearchParams,
                 key: str) -> SearchState:
    """A fresh state: the start allocator's plan as parent, with its held-out fitness."""
    from bitplan.planner.allocators import ALLOCATORS  # here: the registry imports this package

    if params.start not in ALLOCATORS:
        raise InvalidInput(f"unknown start allocator {params.start!r}; known: {sorted(ALLOCATORS)}")
    before = oracle.tokens_used  # tokens spent before this call are not ours
    first = ALLOCATORS[params.start](problem, seed=params.seed)
    choice = np.asarray(first.choice, dtype=np.int64)
    h = oracle.heldout(choice)
    spent = oracle.tokens_used - before
    return SearchState(key=key, start=choice, start_status=first.status, start_heldout=h,
                       parent=choice.copy(), best=choice.copy(), heldout=h, best_heldout=h, tokens=spent,
                       heldout_tokens=spent)


class _Search:
    """One call's run of the search over a (fresh or resumed) state, which it writes to `path` after
    every generation."""

    def __init__(self, problem: AllocationProblem, oracle: FitnessOracle, context: SearchContext,
                 params: SearchParams, stages: Stages, state: SearchState, path: Path | None,
                 started: float):
        self.problem, self.oracle, self.context = problem, oracle, context
        self.params, self.stages, self.state, self.path, self.started = params, stages, state, path, started
        self.mutator = Mutator(problem, params.max_swaps, params.explore)
        self.total = problem.total_size(state.parent)
        # the state's counts go on from what earlier calls spent
        self.counted, self.base_tokens, self.base_seconds = oracle.tokens_used, state.tokens, state.seconds
        self.t_search = time.perf_counter()

    def tokens(self) -> int:
        return self.base_tokens + self.oracle.tokens_used - self.counted

    def seconds(self) -> float:
        return self.base_seconds + time.perf_counter() - self.t_search

    def run(self) -> str:
        """Generations until one of the stopping rules holds; why it stopped."""
        from tqdm.auto import tqdm  # the planner's import stays light; tqdm only once a search runs

        generations = self.params.generations
        bar = tqdm(total=generations, initial=min(self.state.generation, generations), desc="evolutionary",
                   unit="gen", disable=not self.context.progress)
        try:
            while self.state.generation < generations:
                stopped = self._stop_reason() or self._generation(self.state.generation + 1)
                if stopped:
                    return stopped
                last = self.state.history[-1]
                bar.update()
                bar.set_postfix(fitness=f"{last['fitness']:.4g}", heldout=f"{self.state.heldout:.4g}",
                                tokens=self.state.tokens)
        finally:
            bar.close()
        return "generations"

    def _stop_reason(self) -> str | None:
        patience, time_limit = self.params.patience, self.params.time_limit
        if patience is not None and self.state.stale >= patience:
            return f"no held-out improvement in {patience} generations"
        if time_limit is not None and time.perf_counter() - self.started >= time_limit:
            return "time limit"
        return None

    def _generation(self, g: int) -> str | None:
        """Generation g, drawn from `default_rng([seed, g])`; a reason to stop if it could not run."""
        rng = np.random.default_rng([self.params.seed, g])
        kids = self._offspring(rng)
        if not kids:
            return "no budget-keeping move left"
        stage_rows, reserve = self.stages.draw(rng, self.oracle.n_rows)
        if hasattr(self.oracle, "prepare"):
            self.oracle.prepare(self.state.parent, sorted({r for rows in stage_rows for r in rows}))
        winner, best = staged_selection(self.oracle, self.state.parent, kids, stage_rows,
                                        self.stages.survivors, reserve)
        if winner is not None:
            self.state.parent, self.total = winner
            self.state.accepted += 1
        self._track_heldout(g, changed=winner is not None)
        self._record(g, best, accepted=winner is not None)
        return None

    def _offspring(self, rng: np.random.Generator) -> list[Child]:
        """Distinct children, each different from the parent; a few tries each before giving up."""
        problem, parent, wanted = self.problem, self.state.parent, self.params.offspring
        seen, kids = {parent.tobytes()}, []
        for _ in range(4 * wanted):
            if len(kids) == wanted:
                break
            kid, kid_total = self.mutator.mutate(parent, self.total, rng)
            if kid.tobytes() in seen:
                continue
            if kid_total > problem.budget or kid_total != problem.total_size(kid):
                raise RuntimeError("evolutionary made a child over budget: a bug in the mutation")
            seen.add(kid.tobytes())
            kids.append((kid, kid_total))
        return kids

    def _track_heldout(self, g: int, changed: bool) -> None:
        """Measure a new parent on held-out text (an unchanged one's value is known) and count the
        generations since the best held-out value, for `patience`."""
        state = self.state
        if changed:
            before = self.oracle.tokens_used
            state.heldout = self.oracle.heldout(state.parent)
            state.heldout_tokens += self.oracle.tokens_used - before
        if state.heldout < state.best_heldout - IMPROVEMENT * abs(state.best_heldout):
            state.best_heldout, state.best_generation, state.stale = state.heldout, g, 0
            state.best = state.parent.copy()
        else:
            state.stale += 1

    def _record(self, g: int, best: float, accepted: bool) -> None:
        state = self.state
        state.generation, state.tokens, state.seconds = g, self.tokens(), self.seconds()
        state.history.append({"generation": g, "fitness": best, "heldout": state.heldout,
                              "accepted": accepted, "tokens": state.tokens})
        if self.path:
            write_state(self.path, state)

    def report(self, stopped: str) -> Assignment:
        """The parent with the best held-out fitness, not the last one (a later parent that held-out text
        rates worse is fitted to the pool's noise); it and the start scored on the whole fitness pool, and
        the start returned instead of a result that scores worse there (package docstring)."""
        state, oracle = self.state, self.oracle
        before = oracle.tokens_used
        pool = list(range(oracle.n_rows))
        f_start = oracle.fitness(state.start, pool)
        f_final = f_start if np.array_equal(state.best, state.start) else oracle.fitness(state.best, pool)
        # held-out text never rates the best parent worse than the start (the start is the first parent)
        choice, heldout = state.best, state.best_heldout
        if f_final > f_start:
            choice, f_final, heldout = state.start, f_start, state.start_heldout
        kept_start = np.array_equal(choice, state.start)
        info = {
            "start": self.params.start, "start_status": state.start_status,
            "generations": state.generation,
            "stopped": stopped, "accepted": state.accepted, "kept_start": bool(kept_start),
            "fitness_kl": f_final, "start_fitness_kl": f_start,
            "heldout_kl": heldout, "start_heldout_kl": state.start_heldout,
            "best_heldout_kl": state.best_heldout, "best_heldout_generation": state.best_generation,
            "last_heldout_kl": state.heldout,
            "predicted_error": self.problem.total_error(choice),
            "start_predicted_error": self.problem.total_error(state.start),
            "tokens_used": self.tokens(), "tokens_search": state.tokens - state.heldout_tokens,
            "tokens_heldout": state.heldout_tokens, "tokens_report": oracle.tokens_used - before,
            # an oracle's one-off reference pass
            "tokens_base": getattr(self.context.oracle, "base_tokens", 0),
            "fitness_pool_tokens": oracle.n_rows * oracle.row_tokens,
            "stage_tokens": [r * oracle.row_tokens for r in self.stages.rows],
            "survivors": self.stages.survivors,
            "oracle": self.context.describe(), "history": state.history, "search_seconds": self.seconds(),
        }
        status = (f"heuristic (KL fitness {f_start:.4g} → {f_final:.4g}, "
                  f"held-out {state.start_heldout:.4g} → {heldout:.4g}; {info['tokens_used']} tokens)")
        return Assignment(choice, status, info)
