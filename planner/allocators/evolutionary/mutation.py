"""The mutation: budget-keeping level switches on a problem, guided by its estimator (the package
docstring describes the moves and the odds)."""

from __future__ import annotations

import numpy as np

from bitplan.planner.problem import AllocationProblem


class Mutator:
    """Makes children of a plan that stay within the problem's budget and its allowed options."""

    def __init__(self, problem: AllocationProblem, max_swaps: int, explore: float):
        self.p, self.max_swaps, self.explore = problem, max_swaps, explore
        self.U = problem.n_units
        self.rows = np.arange(self.U)
        # disallowed options never move anywhere: infinite size keeps them out of every "fits" test
        self.size = np.where(problem.allowed, problem.size, np.iinfo(np.int64).max // 4)
        # allowed options that share their size with another allowed option of the unit
        both = problem.allowed[:, :, None] & problem.allowed[:, None, :]
        self.twin = ((self.size[:, :, None] == self.size[:, None, :]) & both).sum(axis=2) > 1

    def mutate(self, parent: np.ndarray, total: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """A child of `parent` (`total` bits) within budget, and its total; may equal the parent."""
        child = parent.copy()
        for _ in range(int(rng.integers(1, self.max_swaps + 1))):
            if self._sideways(child, rng):
                continue
            down, cost = self._step_scores(child, True, None)
            if down.size == 0 or rng.random() < self.explore:
                # a raise alone, into bits the plan leaves unused (the estimator may think it useless)
                raised = self._raise_alone(child, total, rng)
                if raised is not None:
                    total = raised
                    continue
                if down.size == 0:
                    break
            total = self._lower_then_raise(child, total, down, cost, rng)
        return self._fill(child, total)

    def _sideways(self, child: np.ndarray, rng: np.random.Generator) -> bool:
        """With probability `explore / 2`, where some unit has one, move a unit to another option of the
        same size (no bits move; only the estimator's ladder, which prefers the lesser error, skips it)."""
        sideways = np.flatnonzero(self.twin[self.rows, child])
        if not sideways.size or rng.random() >= self.explore / 2:
            return False
        u = int(sideways[rng.integers(sideways.size)])
        mates = np.flatnonzero((self.size[u] == self.size[u, child[u]]) & self.twin[u])
        child[u] = int(mates[mates != child[u]][rng.integers(mates.size - 1)])
        return True

    def _raise_alone(self, child: np.ndarray, total: int, rng: np.random.Generator) -> int | None:
        """Raise one unit into the bits the plan leaves unused; the new total, or None if nothing fits."""
        room = self.p.budget - total
        up, gain = self._step_scores(child, False, room)
        if up.size == 0:
            return None
        b = int(up[self._pick(gain, rng)])
        return total + self._move(child, b, self._level(b, int(child[b]), False, room, rng))

    def _lower_then_raise(self, child: np.ndarray, total: int, down: np.ndarray, cost: np.ndarray,
                          rng: np.random.Generator) -> int:
        """Lower one of `down` (ranked by `cost`), then raise another unit into the bits that frees if
        one fits; the new total."""
        a = int(down[self._pick(cost, rng)])
        total += self._move(child, a, self._level(a, int(child[a]), True, None, rng))
        room = self.p.budget - total
        up, gain = self._step_scores(child, False, room)
        other = up != a
        up, gain = up[other], gain[other]
        if up.size == 0:
            return total  # nothing fits the freed bits: a lowering alone keeps the budget too
        b = int(up[self._pick(gain, rng)])  # gain is (negative) error change per bit: lowest first
        return total + self._move(child, b, self._level(b, int(child[b]), False, room, rng))

    def _move(self, child: np.ndarray, u: int, new: int) -> int:
        """Put unit u on option `new`; the bits that adds (negative when it saves)."""
        delta = int(self.size[u, new] - self.size[u, child[u]])
        child[u] = new
        return delta

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

    def _fill(self, child: np.ndarray, total: int) -> tuple[np.ndarray, int]:
        """Spend leftover bits on single-level raises that the estimator says help, best per bit first."""
        while True:
            up, gain = self._step_scores(child, False, self.p.budget - total)
            keep = gain < 0
            if not keep.any():
                return child, total
            u = int(up[keep][np.argmin(gain[keep])])
            room = self.p.budget - total
            step = self.size[u] - self.size[u, child[u]]
            ok = np.flatnonzero((step > 0) & (step <= room))
            new = int(ok[np.lexsort((ok, self.p.error[u, ok], self.size[u, ok]))][0])
            total += self._move(child, u, new)
