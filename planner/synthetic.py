"""Synthetic inputs for tests, benchmarks and notebooks: seeded profiles and allocation problems, no model.

`synthetic_profile()` is SmolLM2-135M-shaped (30 layers x 7 roles + an untied lm_head; error =
sensitivity x numel x 4^-bits); `n_layers` scales it and `n_experts` swaps each MLP for an MoE block
(3 matrices per expert, `expert` set).  `random_problem` and `convex_problem` are small knapsacks for
checking allocators against `dp`.
"""

from __future__ import annotations

import numpy as np

from bitplan.db.types import ModelRef, Module, Profile, parse_options
from bitplan.planner.problem import AllocationProblem

ATTN = {  # role -> [out_features, in_features], as in nn.Linear
    "self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
}
MLP = {"mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576), "mlp.down_proj": (576, 1536)}
EXPERT = {"gate_proj": (384, 576), "up_proj": (384, 576), "down_proj": (576, 384)}
FIXED_BITS = 8 * 2**20 * 8  # 8 MiB of embeddings and norms, counted only in size budgets


def synthetic_profile(options: str = "2,3,4,8", seed: int = 0, n_layers: int = 30,
                      n_experts: int = 0) -> Profile:
    """`n_layers` decoder layers + lm_head; error = sensitivity x numel x 4^-bits (more bits, less error).

    Modules: 4 attention projections per layer, then 3 MLP matrices (dense) or 3 per expert
    (`n_experts` > 0); so 7 * n_layers + 1 dense, (4 + 3 * n_experts) * n_layers + 1 MoE.
    """
    rng = np.random.default_rng(seed)
    modules = []
    for i in range(n_layers):
        modules += [Module(name=f"model.layers.{i}.{role}", shape=shape, layer=i, role=role.split(".")[1])
                    for role, shape in ATTN.items()]
        if n_experts:
            modules += [Module(name=f"model.layers.{i}.mlp.experts.{e}.{role}", shape=shape, layer=i,
                               role=role, expert=e)
                        for e in range(n_experts) for role, shape in EXPERT.items()]
        else:
            modules += [Module(name=f"model.layers.{i}.{role}", shape=shape, layer=i, role=role.split(".")[1])
                        for role, shape in MLP.items()]
    modules.append(Module(name="lm_head", shape=(4096, 576), role="lm_head"))
    opts = parse_options(options)
    bits = np.array([o.bits for o in opts], dtype=float)
    numel = np.array([m.numel for m in modules], dtype=float)[:, None]
    error = rng.lognormal(0, 1, (len(modules), 1)) * numel * 4.0 ** -bits * 1e-6
    size = [[o.size_bits(*m.shape) for o in opts] for m in modules]
    name = "synthetic" if not n_experts else f"synthetic-moe{n_experts}"
    pid = f"prof-{name}" if n_layers == 30 else f"prof-{name}-{n_layers}l"
    return Profile(id=pid, model=ModelRef(name=name), estimator="synthetic",
                   options=opts, modules=modules, error=error, size_bits=size, fixed_bits=FIXED_BITS)


def profile_with_modules(n_modules: int, seed: int = 0) -> Profile:
    """A dense synthetic profile of about `n_modules` modules (7 per layer, + lm_head)."""
    return synthetic_profile(seed=seed, n_layers=max(1, round((n_modules - 1) / 7)))


def random_problem(seed: int, budget: int | None = None, *, max_units: int = 8, max_options: int = 5,
                   max_size: int = 24) -> AllocationProblem:
    """2..max_units units, 2..max_options options, integer sizes up to max_size (ties included), a random mask on most seeds,
    errors decreasing with size on even seeds and arbitrary on odd ones; budget in [smallest, largest]."""
    rng = np.random.default_rng(seed)
    U, O = int(rng.integers(2, max_units + 1)), int(rng.integers(2, max_options + 1))
    size = np.sort(rng.integers(1, max_size + 1, (U, O)), axis=1)
    error = rng.random((U, O))
    if seed % 2 == 0:
        error = -np.sort(-error, axis=1)
    allowed = np.ones((U, O), dtype=bool)
    if seed % 3:
        allowed = rng.random((U, O)) < 0.7
        allowed[np.arange(U), rng.integers(0, O, U)] = True  # every unit keeps an option
    p = AllocationProblem(error, size, allowed, 0)
    if budget is None:
        budget = int(rng.integers(p.smallest(), p.largest() + 1))
    return AllocationProblem(error, size, allowed, budget)


def convex_problem(seed: int, U: int = 6, O: int = 5) -> AllocationProblem:
    """Every unit's (size, error) strictly convex and decreasing, all allowed: each option is on the hull."""
    rng = np.random.default_rng(seed)
    d_size = rng.integers(1, 10, (U, O - 1))
    gain = -np.sort(-rng.random((U, O - 1)), axis=1)  # error removed per bit, decreasing: convex
    size = np.concatenate([rng.integers(5, 20, (U, 1)), d_size], axis=1).cumsum(axis=1)
    error = np.concatenate([rng.random((U, 1)) + 10, -gain * d_size], axis=1).cumsum(axis=1)
    return AllocationProblem(error, size, np.ones((U, O), dtype=bool), int(size[:, 0].sum()))


def large_problem(U: int = 45_000, seed: int = 0, bpw: float = 3.5) -> AllocationProblem:
    """A large-MoE-sized knapsack: U units x 7 options (2..8, 16 bits, g64), noisy exponential curves."""
    rng = np.random.default_rng(seed)
    bits = np.array([2, 3, 4, 5, 6, 8, 16])
    numel = rng.choice([576 * 576, 192 * 576, 1536 * 576], U)
    size = numel[:, None] * bits + numel[:, None] // 64 * (16 + bits) * (bits < 16)
    error = rng.lognormal(0, 2, (U, 1)) * 4.0 ** -bits * (1 + 0.1 * rng.random((U, 7)))
    return AllocationProblem(error, size, np.ones((U, 7), dtype=bool), int(bpw * numel.sum()), numel)
