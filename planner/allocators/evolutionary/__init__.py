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
  option).  A latency budget is refused: the search measures quality only.  Which units move
  is *guided* by the estimator: candidates to lower are ranked by predicted error added per bit saved
  (smallest first), candidates to raise by predicted error removed per bit spent (largest first), and
  the k-th ranked is drawn with probability ∝ 1/k (Zipf), or uniformly with probability `explore`.
  A switch moves one level (the next smaller / larger size), or any level with probability `explore`.
  After the switches, bits left over are spent on the raises of best predicted gain that fit.
- **Selection** (1+λ) in stages: `offspring` distinct children are scored on `stage_tokens[0]` tokens
  of fitness text, the best `survivors[0]` go on to `stage_tokens[1]` fresh tokens, and so on, less
  any child whose paired difference to the stage's best is already more than 2 standard errors above
  zero (`cut`: no more tokens for a child that is clearly worse); the parent re-enters at the last
  stage, where child and parent race on more rows while they are within 2 standard errors (`race`),
  and it is replaced only by a strictly better child on the same tokens.  Each generation draws its stages' token rows afresh (a seeded permutation of the oracle's
  fitness pool; rows are disjoint across a generation's stages while the pool lasts).
- **Stopping**: after `generations`, at `time_limit` seconds, or when the parent's held-out fitness
  (text the search never selects on) has not improved for `patience` generations.
- **Report** (`info`): the result is the parent the held-out split rated best (`best_heldout_kl`, at
  `best_heldout_generation`), not the last one, which may have gone on fitting the pool's noise (seen on
  tiny-mixtral at layer granularity; `last_heldout_kl` is the last parent's).  It and the start are
  scored on the whole fitness pool — `fitness_kl` / `start_fitness_kl` and `heldout_kl` /
  `start_heldout_kl` — with the forward tokens spent (`tokens_used`: search, held-out and report); if
  it scores worse than the start on the whole pool (noise can fool a stage), the start is returned
  (`kept_start`).  The held-out split is calibration text: a plan is evaluated on other text (the
  held-out tragedies), which neither selection saw.
- **Determinism and resuming**: generation g draws from `default_rng([seed, g])`, so the search is a
  function of the seed; with `context.state_path` the state (parent, start, held-out bookkeeping,
  tokens, history) is written atomically after every generation, and a later call with the same
  problem, oracle and search parameters continues from it: stopping after k generations and resuming
  to n gives the uninterrupted n-generation result.

The search is model-agnostic: it sees the problem and a `FitnessOracle` (`oracle.py`).
`AdditiveOracle` is a pure-numpy one (the problem's own error, plus seeded noise) for tests and for
studying the search.  Status: `heuristic (...)` with the measured fitness and held-out KL of start and
result.

Modules: `oracle` (the oracle protocol, `SearchContext`, `AdditiveOracle`, the lifting of a module
oracle to units), `mutation` (the moves), `state` (the resumable state, its key and file), `search`
(`solve`: generations, staged selection, stopping, report).
"""

from bitplan.planner.allocators.evolutionary.oracle import AdditiveOracle, FitnessOracle, SearchContext
from bitplan.planner.allocators.evolutionary.search import DEFAULT_STAGE_ROWS, IMPROVEMENT, pool_sizes, solve
from bitplan.planner.allocators.evolutionary.state import STATE_FORMAT

__all__ = ["AdditiveOracle", "DEFAULT_STAGE_ROWS", "FitnessOracle", "IMPROVEMENT", "STATE_FORMAT",
           "SearchContext", "pool_sizes", "solve"]
