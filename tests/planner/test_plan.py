"""`allocate` end to end on a synthetic SmolLM2-135M-shaped profile: budgets, pins, errors, ids."""

import numpy as np
import pytest

from bitplan.db.types import Budget, InfeasibleBudget, InvalidInput, Plan, Profile, UnknownModule
from bitplan.planner.allocators import ALLOCATORS, needs_context

PROFILE_ONLY = sorted(a for a in ALLOCATORS if not needs_context(a))  # evolutionary: test_evolutionary.py
from bitplan.planner.plan import AllocatorBug, allocate, summarize
from bitplan.planner.request import PlanRequest
from bitplan.planner.problem import Assignment

@pytest.fixture(scope="module")
def profile(make_profile) -> Profile:
    return make_profile()


@pytest.mark.parametrize("allocator", PROFILE_ONLY)
@pytest.mark.parametrize("budget", ["3.5bpw", "60MiB"])
def test_budget_honoured(profile, allocator, budget):
    # dp's exact table for this MiB budget is large; a coarse one keeps the test fast (and checks that path)
    params = {"max_cells": 2e6} if allocator == "dp" and budget == "60MiB" else None
    p = allocate(profile, PlanRequest(budget=budget, allocator=allocator, params=params))
    assert p.total_bits <= p.budget_bits
    assert p.total_bits == sum(o.size_bits(*m.shape) for m, o in zip(profile.modules, p.assignment.values()))
    assert p.bits_per_weight == pytest.approx(p.total_bits / profile.n_params)
    if budget.endswith("bpw"):
        assert p.bits_per_weight <= 3.5
    else:
        assert p.size_mib <= 60
    assert set(p.assignment) == {m.name for m in profile.modules}
    assert p.predicted_error > 0 and p.solve_seconds >= 0


def test_exact_allocators_agree_and_beat_the_baselines(profile):
    plans = {a: allocate(profile, PlanRequest(budget="3.5bpw", allocator=a)) for a in PROFILE_ONLY}
    assert plans["ilp"].status == "optimal"
    assert plans["ilp"].predicted_error == pytest.approx(plans["dp"].predicted_error, rel=1e-9)
    assert plans["ilp"].predicted_error <= plans["greedy"].predicted_error <= plans["uniform"].predicted_error


def test_uniform_at_3_5_bpw_is_all_3_bit(profile):
    p = allocate(profile, PlanRequest(budget="3.5bpw", allocator="uniform"))
    assert {o.bits for o in p.assignment.values()} == {3}
    assert summarize(p, profile)["q_proj"] == {3: 30}


def test_summarize_counts_every_module_by_role(profile):
    p = allocate(profile, PlanRequest(budget="3bpw", allocator="greedy"))
    hist = summarize(p, profile)
    assert set(hist) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    assert sum(hist["down_proj"].values()) == 30 and sum(hist["lm_head"].values()) == 1


def test_pins_honoured(profile):
    p = allocate(profile, PlanRequest(budget="3bpw", allocator="ilp", pins=["lm_head=8", "model.layers.0.*>=4", "*.down_proj<=4"]))
    assert p.assignment["lm_head"].bits == 8
    assert all(o.bits >= 4 for n, o in p.assignment.items() if n.startswith("model.layers.0."))
    assert all(o.bits <= 4 for n, o in p.assignment.items() if n.endswith("down_proj"))
    assert p.assignment["model.layers.0.mlp.down_proj"].bits == 4
    assert p.pins == sorted(p.pins)


def test_infeasible_budget_names_the_smallest_feasible_budget(profile):
    with pytest.raises(InfeasibleBudget) as e:
        allocate(profile, PlanRequest(budget="1.5bpw", allocator="ilp"))
    msg = str(e.value)
    assert "2.282bpw" in msg and "all modules at 2b/g64" in msg and "1.5bpw" in msg
    assert e.value.smallest_bits == sum(min(row) for row in profile.size_bits.tolist())


def test_infeasible_size_budget_speaks_its_unit(profile):
    with pytest.raises(InfeasibleBudget) as e:
        allocate(profile, PlanRequest(budget="20MiB", allocator="greedy"))
    # smallest plan (2.28125 bits per weight) plus the fixed 8 MiB, in MiB, rounded up
    need = (e.value.smallest_bits + profile.fixed_bits) / 8 / 2**20
    assert f"{np.ceil(need * 1000) / 1000:g}MiB" in str(e.value)


def test_pins_raise_the_smallest_feasible_budget(profile):
    with pytest.raises(InfeasibleBudget, match="every module at its smallest allowed option") as e:
        allocate(profile, PlanRequest(budget="2.29bpw", allocator="greedy", pins=["lm_head=8"]))
    assert e.value.smallest_bits > allocate(profile, PlanRequest(budget="2.29bpw", allocator="greedy")).total_bits


def test_an_allocators_own_infeasibility_is_reported_in_the_budget_unit(profile, monkeypatch):
    # (uniform's smallest candidate is the smallest plan when options grow with bits, so fake one)
    smallest = int(3.2 * profile.n_params)

    def picky(problem, *, seed=0, time_limit=None):
        raise InfeasibleBudget("too small for me", smallest_bits=smallest)

    monkeypatch.setitem(ALLOCATORS, "picky", picky)
    expected = r"below the smallest feasible plan: 3\.2bpw \(the smallest plan picky can make\)"
    with pytest.raises(InfeasibleBudget, match=expected) as e:
        allocate(profile, PlanRequest(budget="3bpw", allocator="picky"))
    assert e.value.smallest_bits == smallest


@pytest.mark.parametrize("kwargs, error, match", [
    ({"allocator": "simplex"}, InvalidInput, "unknown allocator 'simplex'; known: \\['closed_form', 'dp', 'evolutionary', 'greedy'"),
    ({"budget": "3.5 parsecs"}, InvalidInput, "bad budget"),
    ({"budget": "-2bpw"}, InvalidInput, "bad budget"),
    ({"budget": "1e400bpw"}, InvalidInput, "too large to be a budget"),
    ({"budget": "40Gb"}, InvalidInput, "'Gb' reads as bits .* write e.g. '40GB'"),
    ({"budget": "40Mb"}, InvalidInput, "'Mb' reads as bits .* write e.g. '40MB'"),
    ({"pins": ["lm_head~8"]}, InvalidInput, "bad pin"),
    ({"pins": ["model.layer.*=4"]}, UnknownModule, "model.layer.\\*"),
    ({"pins": ["lm_head=5"]}, InvalidInput, "lm_head"),
    ({"params": {"max_cels": 10}}, InvalidInput, "max_cells"),
], ids=["unknown-allocator", "bad-unit", "negative-budget", "overflowing-budget", "gigabits", "megabits", "bad-pin", "unknown-pin", "pin-no-option",
        "unknown-param"])
def test_bad_input_raises_typed_errors(profile, kwargs, error, match):
    args = {"budget": "3.5bpw", "allocator": "dp", **kwargs}
    with pytest.raises(error, match=match):
        allocate(profile, PlanRequest(**args))


def test_same_inputs_same_plan_id(profile):
    a = allocate(profile, PlanRequest(budget="3.5bpw", allocator="greedy", pins=["lm_head=8", "*.down_proj<=4"]))
    b = allocate(profile, PlanRequest(budget=Budget.parse("3.5bpw"), allocator="greedy", pins=["*.down_proj <= 4", "lm_head==8"]))
    assert a.id == b.id and a.id.startswith("plan-")
    assert a.assignment == b.assignment
    assert allocate(profile, PlanRequest(budget="3.5bpw", allocator="greedy", seed=1)).id != a.id
    assert allocate(profile, PlanRequest(budget="3.6bpw", allocator="greedy", pins=["lm_head=8", "*.down_proj<=4"])).id != a.id


def test_plan_round_trips_through_json(profile):
    p = allocate(profile, PlanRequest(budget="3.5bpw", allocator="greedy"))
    assert Plan.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("bad_choice, match", [
    (lambda pr: np.full(pr.n_units, pr.n_options - 1), "bits for a budget"),
    (lambda pr: np.zeros(3, dtype=int), "shape"),
    (lambda pr: np.full(pr.n_units, 7), "outside"),
], ids=["over-budget", "wrong-shape", "bad-index"])
def test_allocator_bug_raises_instead_of_returning(profile, monkeypatch, bad_choice, match):
    def broken(problem, *, seed=0, time_limit=None):
        return Assignment(bad_choice(problem), "optimal")

    monkeypatch.setitem(ALLOCATORS, "broken", broken)
    with pytest.raises(AllocatorBug, match=match):
        allocate(profile, PlanRequest(budget="3bpw", allocator="broken"))
