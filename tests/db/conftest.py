"""Small profiles, plans and evaluations (the fresh file database per test, `store`, is tests/conftest.py's)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from bitplan.db.types import (CalibrationRef, Evaluation, ModelRef, Module, Plan, Profile,
                              content_id, parse_options)


@pytest.fixture
def make_profile():
    """`make_profile(seed, **overrides)`: a 5-module x 4-option profile with random matrices."""

    def make(seed: int = 0, **overrides) -> Profile:
        rng = np.random.default_rng(seed)
        options = parse_options("2,4,8,16", group_sizes=64)
        shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
        modules = [Module(name=f"model.layers.{i}.proj", shape=s, layer=i, role="mlp")
                   for i, s in enumerate(shapes)]
        modules[-1] = Module(name="lm_head", shape=shapes[-1], role="head")
        fields = dict(
            id=f"prof-{seed:016x}",
            model=ModelRef(name="SmolLM2-135M", fingerprint=f"fp-model-{seed % 2}", source="/ckpt/smol"),
            calibration=CalibrationRef(name="shakespeare", fingerprint="fp-cal", n_tokens=4096),
            estimator="hessian", device="cpu", options=options, modules=modules,
            error=rng.exponential(size=(len(modules), len(options))),
            size_bits=np.array([[o.size_bits(*m.shape) for o in options] for m in modules]),
            fixed_bits=123_456_789, seconds=1.25,
            created_at=datetime(2025, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seed),
        )
        fields.update(overrides)
        return Profile(**fields)

    return make


@pytest.fixture
def make_plan():
    """`make_plan(profile, **overrides)`: every module of `profile` at its 4-bit option."""

    def make(profile: Profile, **overrides) -> Plan:
        o = profile.options[1]
        total = int(profile.size_bits[:, 1].sum())
        fields = dict(
            id=content_id(profile.id, "3.5bpw", prefix="plan-"), profile_id=profile.id, model=profile.model,
            budget="3.5bpw", budget_bits=2**40 + 7, allocator="ilp", params={"backend": "highs", "gap": 1e-4},
            pins=["lm_head>=8"], assignment={m.name: o for m in profile.modules}, total_bits=total,
            fixed_bits=profile.fixed_bits, n_params=profile.n_params,
            bits_per_weight=total / profile.n_params,
            predicted_error=float(profile.error[:, 1].sum()), status="optimal", solve_seconds=0.1 + 0.2,
            created_at=datetime.now(timezone.utc),
        )
        fields.update(overrides)
        return Plan(**fields)

    return make


@pytest.fixture
def make_evaluation():
    def make(plan_id: str | None, **overrides) -> Evaluation:
        fields = dict(plan_id=plan_id, checkpoint="/tmp/ckpt-q", corpus="shakespeare-eval", n_tokens=8192,
                      window=512, perplexity=37.812345678901234, bytes_on_disk=98_765_432, seconds=17.0)
        fields.update(overrides)
        return Evaluation(**fields)

    return make
