"""Evolutionary: improve the estimator's optimum on the *measured* fitness of the assembled model.

The additive error model that every other allocator optimises is an assumption (errors of different
modules interact); this search starts from the `ilp` optimum on the profile's estimator and asks a
fitness oracle — normally KL(base ‖ candidate) of the real model, `bitplan.profiler.fitness` — which
of its neighbours is really better.  In the spirit of EvoPress (Sieberling et al. 2024), cheaper:

- **Start**: the `start` allocator's plan (default `ilp`, the estimator's exact optimum), not uniform.
- **Mutation** (`max_swaps` level switches per offspring, 1..max_swaps drawn uniformly): one unit
  moves to a smaller allowed option, then one other unit moves to a larger allowed option that fits in
  the bits that frees (if none fits, the lowering stands alone); with probability `explore`, or when
  nothing can go lower, a switch is a raise alone into bits the plan leaves unused; with probability
  `explore / 2` it is a move to another option of the same size, where there is one.  So every
  candidate is within budget by construction, and allowed (pins; units tie modules that share an
  option); a child over the problem's latency budget, if it has one, is discarded.  Which units move
  is *guided* by the estimator: candidates to lower are ranked by predicted error added per bit saved
  (smallest first), candidates to raise by predicted error removed per bit spent (largest first), and
  the k-th ranked is drawn with probability ∝ 1/k (Zipf), or uniformly with probability `explore`.
  A switch moves one level (the next smaller / larger size), or any level with probability `explore`.
  After the switches, bits left over are spent on the raises of best predicted gain that fit.
- **Selection** (1+λ) in stages: `offspring` distinct children are scored on `stage_tokens[0]` tokens
  of fitness text, the best `survivors[0]` go on to `stage_tokens[1]` fresh tokens, and so on; the
  parent re-enters at the last stage and is replaced only by a strictly better child on the same
  tokens.  Each generation draws its stages' token rows afresh (a seeded permutation of the oracle's
  fitness pool; rows are disjoint across a generation's stages while the pool lasts).
- **Stopping**: after `generations`, at `time_limit` seconds, or when the parent's held-out fitness
  (text the search never selects on) has not improved for `patience` generations.
- **Report** (`info`): the returned plan and the start are both scored on the whole fitness pool and
  on the held-out split — `fitness_kl` / `start_fitness_kl` and `heldout_kl` / `start_heldout_kl`, the
  overfitting check — with the forward tokens spent (`tokens_used`: search, held-out and report).  If
  the search's plan scores worse than the start on the whole pool (noise can fool a stage) or on the
  held-out split (it fitted the pool's noise: seen on tiny-mixtral at layer granularity), the start is
  returned (`kept_start`).  Held-out text thus vetoes but never selects, so a returned plan's
  evaluation on other text stays an honest measurement.
- **Determinism and resuming**: generation g draws from `default_rng([seed, g])`, so the search is a
  function of the seed; with `context.state_path` the state (parent, start, held-out bookkeeping,
  tokens, history) is written atomically after every generation, and a later call with the same
  problem, oracle and search parameters continues from it: stopping after k generations and resuming
  to n gives the uninterrupted n-generation result.

The search is model-agnostic: it sees the problem and a `FitnessOracle` (below).  `AdditiveOracle`
is a pure-numpy one (the problem's own error, plus seeded noise) for tests and for studying the search.
Status: `heuristic (...)` with the measured fitness and held-out KL of start and result.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from bitplan.db.types import InvalidInput
from bitplan.planner.problem import AllocationProblem, Assignment, refuse_latency, require_feasible

STATE_FORMAT = "bitplan.evolutionary/1"
DEFAULT_STAGE_ROWS = (1, 2, 4)  # fitness rows per stage when `stage_tokens` is not given
IMPROVEMENT = 1e-12  # relative; a held-out value must beat the best by more than this to count


class FitnessOracle(Protocol):
    """What the search measures candidates with.  `choice` is `[U]` option per unit of the problem
    (after `solve`'s `unit` lifting: per module); lower fitness is better.

    Optional: `prepare(choice, rows)` — called with each generation's parent and all its rows before
    any `fitness` call of that generation, so an oracle can cache the parent's work; `describe()` — a
    JSON-able dict of what the oracle measures on (recorded in plans and search states).
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

    def _score(self, choice: np.ndarray, rows: Sequence[int]) -> float:
        self.tokens_used += len(rows) * self.row_tokens
        value = self.problem.total_error(choice)
        if self.noise:
            key = zlib.crc32(np.asarray(choice, dtype=np.int64).tobytes())
            draws = [np.random.default_rng([self.seed, key, int(r)]).standard_normal() for r in rows]
            value += self.noise * float(np.mean(draws))
        return value

    def fitness(self, choice: np.ndarray, rows: Sequence[int]) -> float:
        return self._score(choice, rows)

    def heldout(self, choice: np.ndarray) -> float:
        return self._score(choice, range(self.n_rows, self.n_rows + self.heldout_rows))

    def describe(self) -> dict:
        return {"oracle": "additive", "noise": self.noise, "seed": self.seed, "n_rows": self.n_rows,
                "row_tokens": self.row_tokens, "heldout_rows": self.heldout_rows}


class _OnModules:
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

    def heldout(self, choice):
        return self.oracle.heldout(choice[self.unit])

    def prepare(self, choice, rows):
        if hasattr(self.oracle, "prepare"):
            self.oracle.prepare(choice[self.unit], rows)


# ----------------------------------------------------------------------------------------- moves


class _Mutator:
    """Budget-keeping level switches on a problem, guided by its estimator (module docstring)."""

    def __init__(self, problem: AllocationProblem, max_swaps: int, explore: float):
        self.p, self.max_swaps, self.explore = problem, max_swaps, explore
        self.U = problem.n_units
        self.rows = np.arange(self.U)
        # disallowed options never move anywhere: infinite size keeps them out of every "fits" test
        self.size = np.where(problem.allowed, problem.size, np.iinfo(np.int64).max // 4)
        # allowed options that share their size with another allowed option of the unit
        both = problem.allowed[:, :, None] & problem.allowed[:, None, :]
        self.twin = ((self.size[:, :, None] == self.size[:, None, :]) & both).sum(axis=2) > 1

    def _pick(self, score: np.ndarray, rng: np.random.Generator) -> int:
        """Index into `score` (lower is better): Zipf over the ranks, or uniform with prob. `explore`."""
        n = len(score)
        if rng.random() < self.explore:
            return int(rng.integers(n))
        order = np.argsort(score, kind="stable")
        weight = 1.0 / np.arange(1, n + 1)
        return int(order[rng.choice(n, p=weight / weight.sum())])

    def _level(self, u: int, cur: int, smaller: bool, room: int | None, rng) -> int | None:
        """Unit u's next option below (or above, within `room` bits) its current one; any such option
        with probability `explore`; None if there is none."""
        s, e = self.size[u], self.p.error[u]
        if smaller:
            ok = np.flatnonzero(s < s[cur])
        else:
            ok = np.flatnonzero((s > s[cur]) & (s - s[cur] <= room))
        if ok.size == 0:
            return None
        if rng.random() < self.explore:
            return int(ok[rng.integers(ok.size)])
        # nearest size, least error among equal sizes, lowest index last
        near = ok[np.lexsort((ok, e[ok], -s[ok] if smaller else s[ok]))]
        return int(near[0])

    def _step_scores(self, choice: np.ndarray, smaller: bool,
                     room: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Units that can move one level (down, or up within `room`), and each move's predicted error
        change per bit (added per bit saved going down; minus removed per bit spent going up)."""
        s, e = self.size, self.p.error
        cs, ce = s[self.rows, choice][:, None], e[self.rows, choice][:, None]
        if smaller:
            ok = s < cs
            # the nearest smaller size: largest among those below
            target = np.where(ok, s, -1)
        else:
            ok = (s > cs) & (s - cs <= room)
            target = np.where(ok, -s, np.iinfo(np.int64).min)
        best = target == target.max(axis=1, keepdims=True)
        cand = ok & best
        err = np.where(cand, e, np.inf).min(axis=1)
        units = np.flatnonzero(cand.any(axis=1))
        nsize = np.where(cand, s, 0).max(axis=1)
        d_bits = np.abs(nsize - cs[:, 0])[units]
        d_err = (err - ce[:, 0])[units]
        return units, d_err / d_bits

    def mutate(self, parent: np.ndarray, total: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """A child of `parent` (`total` bits) within budget, and its total; may equal the parent."""
        child, budget = parent.copy(), self.p.budget
        for _ in range(int(rng.integers(1, self.max_swaps + 1))):
            sideways = np.flatnonzero(self.twin[self.rows, child])
            if sideways.size and rng.random() < self.explore / 2:
                # another option of the same size: no bits move, only the estimator's ladder skips it
                u = int(sideways[rng.integers(sideways.size)])
                mates = np.flatnonzero((self.size[u] == self.size[u, child[u]]) & self.twin[u])
                child[u] = int(mates[mates != child[u]][rng.integers(mates.size - 1)])
                continue
            down, cost = self._step_scores(child, True, None)
            if down.size == 0 or rng.random() < self.explore:
                # a raise alone, into bits the plan leaves unused (the estimator may think it useless)
                up, gain = self._step_scores(child, False, budget - total)
                if up.size:
                    b = int(up[self._pick(gain, rng)])
                    b_new = self._level(b, int(child[b]), False, budget - total, rng)
                    total += int(self.size[b, b_new] - self.size[b, child[b]])
                    child[b] = b_new
                    continue
                if down.size == 0:
                    break
            a = int(down[self._pick(cost, rng)])
            a_old = int(child[a])
            a_new = self._level(a, a_old, True, None, rng)
            freed = int(self.size[a, a_old] - self.size[a, a_new])
            room = budget - (total - freed)
            child[a], total = a_new, total - freed
            up, gain = self._step_scores(child, False, room)
            up, gain = up[up != a], gain[up != a]
            if up.size == 0:
                continue  # nothing fits the freed bits: a lowering alone keeps the budget too
            b = int(up[self._pick(gain, rng)])  # gain is (negative) error change per bit: lowest first
            b_new = self._level(b, int(child[b]), False, room, rng)
            total += int(self.size[b, b_new] - self.size[b, child[b]])
            child[b] = b_new
        return self._fill(child, total)

    def _fill(self, child: np.ndarray, total: int) -> tuple[np.ndarray, int]:
        """Spend leftover bits on single-level raises that the estimator says help, best per bit first."""
        while True:
            up, gain = self._step_scores(child, False, self.p.budget - total)
            keep = gain < 0
            if not keep.any():
                return child, total
            u = int(up[keep][np.argmin(gain[keep])])
            cur = int(child[u])
            room = self.p.budget - total
            step = self.size[u] - self.size[u, cur]
            ok = np.flatnonzero((step > 0) & (step <= room))
            new = int(ok[np.lexsort((ok, self.p.error[u, ok], self.size[u, ok]))][0])
            total += int(self.size[u, new] - self.size[u, cur])
            child[u] = new


# ------------------------------------------------------------------------------------ the search


def _stages(oracle: FitnessOracle, offspring: int, stage_tokens, survivors) -> tuple[list[int], list[int]]:
    """Rows per stage and survivors after each stage but the last (defaults in the module docstring)."""
    if stage_tokens is None:
        rows = [min(r, oracle.n_rows) for r in DEFAULT_STAGE_ROWS]
    else:
        rows = [-(-int(t) // oracle.row_tokens) for t in stage_tokens]
        if not rows or min(rows) <= 0 or max(rows) > oracle.n_rows:
            raise InvalidInput(f"stage_tokens {list(stage_tokens)} must be positive and at most the fitness "
                               f"pool of {oracle.n_rows * oracle.row_tokens} tokens")
    S = len(rows)
    if survivors is None:
        # geometric from `offspring` down to one contest of the last stage
        survivors = [max(1, round(offspring ** (1 - (i + 1) / S))) for i in range(S - 1)]
    survivors = [int(k) for k in survivors]
    if len(survivors) != S - 1 or any(k < 1 for k in survivors) or any(
            b > a for a, b in zip([offspring, *survivors], survivors)):
        raise InvalidInput(f"survivors {survivors} must give one non-increasing count (>= 1, <= offspring) "
                           f"for each of the {S - 1} stages before the last")
    return rows, survivors


def _key(problem: AllocationProblem, unit, context: SearchContext, params: dict) -> str:
    """What a stored state must match to be resumed: problem, unit ties, oracle and search parameters."""
    h = hashlib.sha256()
    for a in (problem.error, problem.size, problem.allowed, np.asarray([problem.budget]),
              np.asarray([] if unit is None else unit, dtype=np.int64)):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps([context.describe(), params], sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _write_state(path: Path, state: dict) -> None:
    """Atomically: a crash leaves the previous state, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_state(path: Path, key: str) -> dict | None:
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidInput(f"search state {path} is unreadable ({e}); delete it to start afresh") from e
    if state.get("format") != STATE_FORMAT or state.get("key") != key:
        raise InvalidInput(f"search state {path} belongs to another search (problem, oracle or parameters "
                           f"differ); give another --search-state or delete it")
    return state


def solve(problem: AllocationProblem, *, seed: int = 0, time_limit: float | None = None,
          context: SearchContext | FitnessOracle | None = None, unit: np.ndarray | None = None,
          generations: int = 20, offspring: int = 16, stage_tokens: Sequence[int] | None = None,
          survivors: Sequence[int] | None = None, max_swaps: int = 3, explore: float = 0.25,
          patience: int | None = 8, start: str = "ilp") -> Assignment:
    """Evolutionary search from `start`'s plan on `context`'s fitness oracle (module docstring).

    `unit[m]` (from `allocate`) maps the oracle's modules to the problem's units; without it the oracle
    scores unit choices directly.
    """
    t0 = time.perf_counter()
    refuse_latency(problem, "evolutionary")
    if context is None:
        raise InvalidInput("allocator 'evolutionary' measures the model's KL and needs the model: plan a "
                           "stored profile whose model can be loaded (bitplan plan PROFILE --allocator "
                           "evolutionary), or pass allocate(..., context=SearchContext(oracle))")
    if not isinstance(context, SearchContext):
        context = SearchContext(context)
    if generations < 0 or offspring < 1 or max_swaps < 1 or not 0 <= explore <= 1 or (
            patience is not None and patience < 1):
        raise InvalidInput("evolutionary needs generations >= 0, offspring >= 1, max_swaps >= 1, "
                           "0 <= explore <= 1 and patience >= 1 (or None)")
    if start == "evolutionary":
        raise InvalidInput("evolutionary cannot start from itself; give start='ilp' or another allocator")
    require_feasible(problem)
    oracle = context.oracle if unit is None else _OnModules(context.oracle, unit)
    rows_per_stage, survivors = _stages(oracle, offspring, stage_tokens, survivors)
    mutator = _Mutator(problem, max_swaps, explore)
    latency_cap = getattr(problem, "latency_budget_ps", None)
    before = oracle.tokens_used  # tokens spent before this call are not ours

    # The state: fresh from the start allocator, or resumed.
    path = Path(context.state_path).expanduser() if context.state_path else None
    key = _key(problem, unit, context, {"seed": seed, "offspring": offspring, "stages": rows_per_stage,
                                        "survivors": survivors, "max_swaps": max_swaps, "explore": explore,
                                        "start": start})
    state = _read_state(path, key) if path else None
    if state is None:
        from bitplan.planner.allocators import ALLOCATORS  # here: the registry imports this module
        if start not in ALLOCATORS:
            raise InvalidInput(f"unknown start allocator {start!r}; known: {sorted(ALLOCATORS)}")
        first = ALLOCATORS[start](problem, seed=seed)
        choice = np.asarray(first.choice, dtype=np.int64)
        h = oracle.heldout(choice)
        state = {"format": STATE_FORMAT, "key": key, "generation": 0, "start": choice.tolist(),
                 "start_status": first.status, "parent": choice.tolist(), "tokens": 0,
                 "heldout_tokens": 0, "start_heldout": h, "heldout": h, "best_heldout": h,
                 "best_generation": 0, "stale": 0, "accepted": 0, "seconds": 0.0, "history": []}
        state["tokens"] = state["heldout_tokens"] = oracle.tokens_used - before
        if path:
            _write_state(path, state)
    counted = oracle.tokens_used  # from here on, tokens() adds what this call spends to the state's
    start_choice = np.asarray(state["start"], dtype=np.int64)
    parent = np.asarray(state["parent"], dtype=np.int64)
    total = problem.total_size(parent)
    base_tokens, base_seconds = state["tokens"], state["seconds"]
    t_search = time.perf_counter()

    def tokens() -> int:
        return base_tokens + oracle.tokens_used - counted

    from tqdm.auto import tqdm  # the planner's import stays light; tqdm only once a search runs

    bar = tqdm(total=generations, initial=min(state["generation"], generations), desc="evolutionary",
               unit="gen", disable=not context.progress)
    stopped = "generations"
    try:
        while state["generation"] < generations:
            if patience is not None and state["stale"] >= patience:
                stopped = f"no held-out improvement in {patience} generations"
                break
            if time_limit is not None and time.perf_counter() - t0 >= time_limit:
                stopped = "time limit"
                break
            g = state["generation"] + 1
            rng = np.random.default_rng([seed, g])

            # Offspring: distinct, each different from the parent; a few tries each before giving up.
            seen, kids = {parent.tobytes()}, []
            for _ in range(4 * offspring):
                if len(kids) == offspring:
                    break
                kid, kid_total = mutator.mutate(parent, total, rng)
                if latency_cap is not None and problem.total_latency_ps(kid) > latency_cap:
                    continue  # the moves keep the memory budget; a latency budget is checked instead
                if kid.tobytes() not in seen:
                    if kid_total > problem.budget or kid_total != problem.total_size(kid):
                        raise RuntimeError("evolutionary made a child over budget: a bug in the mutation")
                    seen.add(kid.tobytes())
                    kids.append((kid, kid_total))
            if not kids:
                stopped = "no budget-keeping move left"
                break

            # This generation's rows: a seeded permutation of the pool, consecutive slices per stage.
            perm = rng.permutation(oracle.n_rows)
            offsets = np.cumsum([0, *rows_per_stage])
            stage_rows = [[int(perm[(o + j) % oracle.n_rows]) for j in range(r)]
                          for o, r in zip(offsets[:-1], rows_per_stage)]
            if hasattr(oracle, "prepare"):
                oracle.prepare(parent, sorted({r for rows in stage_rows for r in rows}))

            # Stages: cut down the offspring on more and more tokens; the parent joins the last one.
            alive = kids
            for i, rows in enumerate(stage_rows):
                last = i == len(stage_rows) - 1
                scores = [oracle.fitness(kid, rows) for kid, _ in alive]
                if not last:
                    order = np.argsort(scores, kind="stable")[:survivors[i]]
                    alive = [alive[j] for j in order]
                    continue
                parent_score = oracle.fitness(parent, rows)
                j = int(np.argmin(scores))
                accepted = scores[j] < parent_score
                if accepted:
                    parent, total = alive[j][0], alive[j][1]
                    state["accepted"] += 1
                best = min(scores[j], parent_score)

            # Held-out: only when the parent changed (otherwise its value is known).
            if accepted:
                before = oracle.tokens_used
                state["heldout"] = oracle.heldout(parent)
                state["heldout_tokens"] += oracle.tokens_used - before
            if state["heldout"] < state["best_heldout"] - IMPROVEMENT * abs(state["best_heldout"]):
                state.update(best_heldout=state["heldout"], best_generation=g, stale=0)
            else:
                state["stale"] += 1

            state.update(generation=g, parent=parent.tolist(), tokens=tokens(),
                         seconds=base_seconds + time.perf_counter() - t_search)
            state["history"].append({"generation": g, "fitness": best, "heldout": state["heldout"],
                                     "accepted": bool(accepted), "tokens": state["tokens"]})
            if path:
                _write_state(path, state)
            bar.update()
            bar.set_postfix(fitness=f"{best:.4g}", heldout=f"{state['heldout']:.4g}", tokens=state["tokens"])
    finally:
        bar.close()

    # Report: start and result on the whole fitness pool and on held-out text.
    before = oracle.tokens_used
    pool = list(range(oracle.n_rows))
    f_start = oracle.fitness(start_choice, pool)
    f_final = f_start if np.array_equal(parent, start_choice) else oracle.fitness(parent, pool)
    # a plan that the held-out text rates worse than the start is overfitted to the fitness pool
    kept_start = f_final > f_start or state["heldout"] > state["start_heldout"]
    if kept_start:
        parent, f_final, state["heldout"] = start_choice, f_start, state["start_heldout"]
    info = {
        "start": start, "start_status": state["start_status"], "generations": state["generation"],
        "stopped": stopped, "accepted": state["accepted"], "kept_start": bool(kept_start),
        "fitness_kl": f_final, "start_fitness_kl": f_start,
        "heldout_kl": state["heldout"], "start_heldout_kl": state["start_heldout"],
        "best_heldout_kl": state["best_heldout"], "best_heldout_generation": state["best_generation"],
        "predicted_error": problem.total_error(parent),
        "start_predicted_error": problem.total_error(start_choice),
        "tokens_used": tokens(), "tokens_search": state["tokens"] - state["heldout_tokens"],
        "tokens_heldout": state["heldout_tokens"], "tokens_report": oracle.tokens_used - before,
        "tokens_base": getattr(context.oracle, "base_tokens", 0),  # an oracle's one-off reference pass
        "fitness_pool_tokens": oracle.n_rows * oracle.row_tokens,
        "stage_tokens": [r * oracle.row_tokens for r in rows_per_stage], "survivors": survivors,
        "oracle": context.describe(), "history": state["history"],
        "search_seconds": base_seconds + time.perf_counter() - t_search,
    }
    status = (f"heuristic (KL fitness {f_start:.4g} → {f_final:.4g}, "
              f"held-out {state['start_heldout']:.4g} → "
              f"{state['heldout']:.4g}; {info['tokens_used']} tokens)")
    return Assignment(parent, status, info)
