"""Synthetic profiles for the notebooks: no model, no database, seeded.

`synthetic_profile()` with its defaults is the SmolLM2-135M-shaped profile of tests/conftest.py
(30 layers x 7 roles + lm_head, same seed, same errors); kept here as a copy so that a notebook never
imports from tests/.  `n_layers` scales it (7 modules per layer) and `n_experts` gives every layer an
MoE block instead of one MLP (3 matrices per expert, `expert` set), for the solve-time and heat-map cells.
"""

from __future__ import annotations

import numpy as np

from bitplan.db.types import ModelRef, Module, Profile, parse_options

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
    return Profile(id=f"prof-{name}-{n_layers}l", model=ModelRef(name=name), estimator="synthetic",
                   options=opts, modules=modules, error=error, size_bits=size, fixed_bits=FIXED_BITS)


def profile_with_modules(n_modules: int, seed: int = 0) -> Profile:
    """A dense synthetic profile of about `n_modules` modules (7 per layer, + lm_head)."""
    return synthetic_profile(seed=seed, n_layers=max(1, round((n_modules - 1) / 7)))
