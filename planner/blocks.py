"""Equal budgets per decoder block (`budget_split="block"`): MC-MoE's allocation, as a baseline.

MC-MoE gives every decoder block the same bits per weight and trades bits only among that block's own
modules and experts.  Here block b gets `⌊budget · numel_b / numel⌋` bits (so the blocks' shares sum to
at most the budget, and each block's bits per weight is the budget's, to the bit), and the allocator
solves one knapsack per block on that share, through the ordinary `solve(problem, ...)` interface.
Modules outside the decoder layers (an untied `lm_head`) form one block of their own, with its share.

The whole-model knapsack can only do better on the predicted error (every per-block plan is feasible
for it); what per-block budgets give up is what the benchmarks measure (`bench/moe_plans.py`).

The smallest feasible budget is the one at which every block's share holds its smallest plan:
`max_b ⌈smallest_b · numel / numel_b⌉` bits, which can be well above the whole-model smallest plan
when blocks differ (pins, a block of wide modules).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bitplan.db.types import InfeasibleBudget, InvalidInput, Module
from bitplan.planner.problem import AllocationProblem, Assignment

BUDGET_SPLITS = ("model", "block")


def check_split(split: str) -> str:
    if split not in BUDGET_SPLITS:
        raise InvalidInput(f"unknown budget split {split!r}; known: {list(BUDGET_SPLITS)}")
    return split


def block_of_units(modules: Sequence[Module], unit: np.ndarray) -> np.ndarray:
    """[U] the block of each unit: its modules' decoder layer, numbered in order of first appearance;
    modules without a layer share one block.  InvalidInput if a unit spans two blocks (ties across
    layers cannot be split)."""
    ids: dict = {}
    block = np.full(int(unit.max()) + 1, -1, dtype=np.int64)
    for m, u in zip(modules, unit.tolist()):
        b = ids.setdefault(m.layer, len(ids))
        if block[u] not in (-1, b):
            raise InvalidInput(f"unit of {m.name} spans two decoder layers: it cannot take a per-block budget")
        block[u] = b
    return block


def block_budgets(problem: AllocationProblem, block: np.ndarray) -> np.ndarray:
    """[B] each block's share of the budget in bits, in proportion to its weights (rounded down)."""
    if problem.numel is None:
        raise InvalidInput("per-block budgets need the weights per unit (problem.numel)")
    numel = [int(n) for n in np.bincount(block, problem.numel)]
    # Python ints: budget x numel overflows int64 at DeepSeek-V3 scale
    return np.array([problem.budget * n // sum(numel) for n in numel], dtype=np.int64)


def smallest_budget(problem: AllocationProblem, block: np.ndarray) -> int:
    """Bits of the smallest whole-model budget whose every block share holds that block's smallest plan."""
    numel = np.bincount(block, problem.numel).astype(np.int64)
    least = np.bincount(block, problem.min_size()).astype(np.int64)
    total = int(numel.sum())
    return max(-(-int(s) * total // int(n)) for s, n in zip(least, numel))


def solve_per_block(problem: AllocationProblem, block: np.ndarray, solve, *, seed: int = 0,
                    time_limit: float | None = None, **params) -> Assignment:
    """`solve` on each block's sub-problem with its share of the budget; the choices joined.

    The status is the blocks' statuses (one word when they agree); `info["blocks"]` holds each block's
    budget, size and status.  `time_limit` is shared out equally.  InfeasibleBudget names the smallest
    whole-model budget every block fits (`smallest_budget`), or, when the allocator itself cannot fit a
    block (uniform), the budget that block's smallest plan needs.
    """
    if problem.latency_budget is not None or problem.objective != "error":
        raise InvalidInput("per-block budgets take no latency budget or objective: plan with budget split 'model'")
    budgets = block_budgets(problem, block)
    need = smallest_budget(problem, block)
    if problem.budget < need:
        raise InfeasibleBudget(f"budget {problem.budget} bits leaves some block less than its smallest plan; "
                               f"equal per-block budgets need {need} bits", smallest_bits=need)
    n_blocks = len(budgets)
    limit = None if time_limit is None else time_limit / n_blocks
    choice = np.empty(problem.n_units, dtype=np.int64)
    rows = []
    for b in range(n_blocks):
        members = np.flatnonzero(block == b)
        sub = AllocationProblem(problem.error[members], problem.size[members], problem.allowed[members],
                                int(budgets[b]), problem.numel[members])
        try:
            result = solve(sub, seed=seed, time_limit=limit, **params)
        except InfeasibleBudget as e:
            share = int(problem.numel[members].sum())
            raise InfeasibleBudget(f"block {b}: {e}", smallest_bits=-(-e.smallest_bits * int(problem.numel.sum())
                                                                       // share)) from e
        choice[members] = result.choice
        rows.append({"budget_bits": int(budgets[b]), "bits": sub.total_size(np.asarray(result.choice)),
                     "status": result.status})
    statuses = list(dict.fromkeys(r["status"] for r in rows))
    status = statuses[0] if len(statuses) == 1 else "; ".join(statuses)
    return Assignment(choice, f"{status} (per block, {n_blocks} blocks)", {"blocks": rows})
