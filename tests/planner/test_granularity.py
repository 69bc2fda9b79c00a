"""`--granularity module|expert|layer`: units that share one option, built once in `problem_from_profile`."""

from collections import defaultdict

import numpy as np
import pytest

from bitplan.db.types import InvalidInput, ModelRef, Module, Profile, parse_options
from bitplan.planner.allocators import ALLOCATORS, dp, needs_context
from bitplan.planner.plan import allocate, problem_from_profile, unit_of
from bitplan.planner.request import PlanRequest
from bitplan.planner.problem import AllocationProblem


def moe_profile(layers: int = 3, experts: int = 4, seed: int = 0) -> Profile:
    """Mixtral-shaped: per layer q/k/v/o (no expert) and w1/w2/w3 for each expert; plus lm_head."""
    rng = np.random.default_rng(seed)
    modules = []
    for i in range(layers):
        modules += [Module(name=f"model.layers.{i}.self_attn.{r}", shape=(128, 128), layer=i, role=r)
                    for r in ("q_proj", "k_proj", "v_proj", "o_proj")]
        modules += [Module(name=f"model.layers.{i}.block_sparse_moe.experts.{e}.{r}", shape=shape, layer=i,
                           role=r, expert=e)
                    for e in range(experts) for r, shape in (("w1", (256, 128)), ("w2", (128, 256)), ("w3", (256, 128)))]
    modules.append(Module(name="lm_head", shape=(512, 128), role="lm_head"))
    opts = parse_options("2,3,4,8")
    bits = np.array([o.bits for o in opts], dtype=float)
    error = rng.lognormal(0, 1, (len(modules), 1)) * 4.0 ** -bits * (1 + 0.2 * rng.random((len(modules), 4)))
    size = [[o.size_bits(*m.shape) for o in opts] for m in modules]
    return Profile(id=f"prof-moe{seed}", model=ModelRef(name="moe"), estimator="synthetic", options=opts,
                   modules=modules, error=error, size_bits=size)


def groups(profile: Profile, granularity: str) -> dict:
    """Module names by unit key, written out independently of `unit_of`."""
    out = defaultdict(list)
    for m in profile.modules:
        if granularity == "expert" and m.expert is not None:
            out[(m.layer, m.expert)].append(m.name)
        elif granularity == "layer" and m.layer is not None:
            out[m.layer].append(m.name)
        else:
            out[m.name].append(m.name)
    return out


def summed_problem(profile: Profile, granularity: str, budget_bits: int) -> AllocationProblem:
    """The unit problem summed by hand (dicts and loops, not `problem_from_profile`)."""
    index = {m.name: i for i, m in enumerate(profile.modules)}
    members = list(groups(profile, granularity).values())
    error = np.array([sum(profile.error[index[n]] for n in names) for names in members])
    size = np.array([sum(profile.size_bits[index[n]] for n in names) for names in members])
    return AllocationProblem(error, size, np.ones(error.shape, dtype=bool), budget_bits)


def assert_units_share_options(plan, profile: Profile, granularity: str) -> None:
    for names in groups(profile, granularity).values():
        assert len({plan.assignment[n] for n in names}) == 1, f"unit {names[:2]} split"


def test_unit_of(make_profile):
    smol, moe = make_profile(), moe_profile()
    assert unit_of(smol.modules, "module").tolist() == list(range(len(smol.modules)))
    assert unit_of(smol.modules, "expert").tolist() == list(range(len(smol.modules)))  # no experts: per module
    assert len(set(unit_of(smol.modules, "layer").tolist())) == 31  # 30 layers + lm_head alone
    # per layer: 4 attention modules alone + 4 experts; plus lm_head
    assert len(set(unit_of(moe.modules, "expert").tolist())) == 3 * (4 + 4) + 1
    assert len(set(unit_of(moe.modules, "layer").tolist())) == 3 + 1
    with pytest.raises(InvalidInput, match="unknown granularity 'row'"):
        unit_of(moe.modules, "row")


def test_unit_problem_sums_errors_sizes_and_weights(make_profile):
    profile = make_profile()
    p, unit = problem_from_profile(profile, 10**9, granularity="layer")
    ref = summed_problem(profile, "layer", 10**9)
    np.testing.assert_allclose(p.error, ref.error, rtol=1e-12)
    np.testing.assert_array_equal(p.size, ref.size)
    assert p.numel.sum() == profile.n_params and p.numel[0] == sum(m.numel for m in profile.modules[:7])
    assert unit.shape == (len(profile.modules),)


@pytest.mark.parametrize("allocator", sorted(a for a in ALLOCATORS if not needs_context(a)))
@pytest.mark.parametrize("granularity,budget", [("layer", "3.2bpw"), ("expert", "3.5bpw"), ("expert", "2.9bpw")])
def test_every_allocator_shares_options_within_units(allocator, granularity, budget):
    profile = moe_profile()
    plan = allocate(profile, PlanRequest(budget=budget, allocator=allocator, granularity=granularity))
    assert_units_share_options(plan, profile, granularity)
    assert plan.total_bits <= plan.budget_bits
    assert plan.total_bits == sum(o.size_bits(*m.shape) for m, o in zip(profile.modules, plan.assignment.values()))
    assert plan.params == {"granularity": granularity}


@pytest.mark.parametrize("granularity", ["layer", "expert"])
def test_exact_allocators_equal_dp_on_the_summed_problem(granularity):
    profile = moe_profile(layers=4, experts=3, seed=1)
    for budget in ("2.7bpw", "3.3bpw", "4.5bpw"):
        budget_bits = int(float(budget[:-3]) * profile.n_params)
        best = summed_problem(profile, granularity, budget_bits)
        opt = best.total_error(dp.solve(best).choice)
        for allocator in ("dp", "ilp"):
            plan = allocate(profile, PlanRequest(budget=budget, allocator=allocator, granularity=granularity))
            assert plan.status == "optimal"
            assert plan.predicted_error == pytest.approx(opt, rel=1e-9)


def test_layer_plan_equals_brute_force_on_a_tiny_model():
    profile = moe_profile(layers=2, experts=2, seed=2)  # 3 units at layer granularity: 4^3 plans
    p = summed_problem(profile, "layer", int(3.4 * profile.n_params))
    best = min(p.total_error(np.array(c)) for c in np.ndindex(4, 4, 4) if p.total_size(np.array(c)) <= p.budget)
    assert allocate(profile, PlanRequest(budget="3.4bpw", allocator="ilp", granularity="layer")).predicted_error == pytest.approx(best, rel=1e-12)


def test_coarser_units_cost_error_and_module_ids_are_unchanged(make_profile):
    profile = make_profile()
    module = allocate(profile, PlanRequest(budget="3.5bpw", allocator="ilp"))
    assert module.id == allocate(profile, PlanRequest(budget="3.5bpw", allocator="ilp", granularity="module")).id and module.params == {}
    layer = allocate(profile, PlanRequest(budget="3.5bpw", allocator="ilp", granularity="layer"))
    assert layer.id != module.id and layer.params == {"granularity": "layer"}
    assert layer.predicted_error >= module.predicted_error  # a tied plan is a module plan too
    assert_units_share_options(layer, profile, "layer")


def test_pins_apply_to_every_member_of_a_unit(make_profile):
    profile = make_profile()
    plan = allocate(profile, PlanRequest(budget="3.5bpw", allocator="ilp", pins=["model.layers.0.mlp.down_proj>=8"], granularity="layer"))
    assert {plan.assignment[m.name].bits for m in profile.modules if m.layer == 0} == {8}
    with pytest.raises(InvalidInput, match="no option every module of one layer may take: model.layers.0"):
        allocate(profile, PlanRequest(budget="3.5bpw", allocator="ilp", pins=["model.layers.0.mlp.down_proj=8", "model.layers.0.self_attn.q_proj=4"], granularity="layer"))
