"""Engine-aware planning (planner/engines.py): ties, allowed options and exact sizes of vLLM and llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest

from bitplan.db.types import InvalidInput
from bitplan.db.formats import GGUF_TYPES, gguf_type, llamacpp_group, vllm_group
from bitplan.planner.plan import allocate, unit_of
from bitplan.planner.request import PlanRequest
from bitplan.planner.synthetic import synthetic_profile


def groups_share_option(plan, profile, key):
    seen = {}
    for m in profile.modules:
        assert seen.setdefault(key(m), plan.assignment[m.name]) == plan.assignment[m.name], m.name


def test_gguf_sizes_are_exact():
    bpw = {n: t.bits_per_weight for n, t in GGUF_TYPES.items()}
    assert (bpw["q2_k"], bpw["q3_k"], bpw["q4_k"], bpw["q5_k"], bpw["q6_k"]) == (2.625, 3.4375, 4.5, 5.5, 6.5625)
    assert (bpw["q4_0"], bpw["q5_0"], bpw["q8_0"], bpw["f16"]) == (4.5, 5.5, 8.5, 16)


@pytest.mark.parametrize("engine", ["vllm", "llamacpp"])
@pytest.mark.parametrize("n_experts", [0, 4])
def test_engine_plans_satisfy_ties_and_budget(engine, n_experts):
    profile = synthetic_profile(n_layers=4, n_experts=n_experts)
    plan = allocate(profile, PlanRequest(budget="4.5bpw", allocator="ilp", engine=engine))  # SmolLM2 rows of 576: Q4_0 at least
    assert plan.params["engine"] == engine and plan.total_bits <= plan.budget_bits
    groups_share_option(plan, profile, vllm_group if engine == "vllm" else llamacpp_group)
    sizes = []
    for m in profile.modules:
        o = plan.assignment[m.name]
        if engine == "llamacpp":
            t = gguf_type(m.shape, o)
            assert t is not None, m.name
            assert t.name.endswith("_k") == (m.shape[1] % 256 == 0) or t.name in ("q8_0", "f16")
            sizes.append(t.size_bits(*m.shape))
        else:
            assert o.bits in ((4, 8) if m.expert is not None else (2, 3, 4, 8))
            sizes.append(o.size_bits(*m.shape))
    assert sum(sizes) == plan.total_bits  # the plan's size is the engine's, to the bit
    unconstrained = allocate(profile, PlanRequest(budget="4.5bpw", allocator="ilp"))
    assert unconstrained.predicted_error <= plan.predicted_error + 1e-12 and unconstrained.id != plan.id


def test_vllm_ties_all_experts_of_a_layer_and_llamacpp_per_matrix_kind():
    mods = synthetic_profile(n_layers=2, n_experts=3).modules
    vllm, cpp = unit_of(mods, engine="vllm"), unit_of(mods, engine="llamacpp")
    experts0 = [i for i, m in enumerate(mods) if m.layer == 0 and m.expert is not None]
    assert len({vllm[i] for i in experts0}) == 1
    assert len({cpp[i] for i in experts0}) == 3
    qkv = [i for i, m in enumerate(mods) if m.layer == 1 and m.role in ("q_proj", "k_proj", "v_proj")]
    assert len({vllm[i] for i in qkv}) == 1 and len({cpp[i] for i in qkv}) == 3


def test_ties_compose_with_granularity_and_pins():
    profile = synthetic_profile(n_layers=3, n_experts=2)
    units = unit_of(profile.modules, "expert", "llamacpp")
    # expert granularity ties an expert's three matrices, llama.cpp ties each kind across experts: one unit
    assert len({units[i] for i, m in enumerate(profile.modules) if m.layer == 2 and m.expert is not None}) == 1
    # layer ties with vLLM's 4/8-bit experts put every layer at 4 bits at least; the pin puts layer 0 at 8
    plan = allocate(profile, PlanRequest(budget="6bpw", allocator="ilp", engine="vllm", granularity="layer", pins=["model.layers.0.self_attn.q_proj>=8"]))
    assert plan.assignment["model.layers.0.self_attn.k_proj"].bits == 8  # tied to q by vLLM
    assert plan.assignment["model.layers.0.mlp.experts.1.down_proj"].bits == 8  # and to its layer
    assert plan.params == {"granularity": "layer", "engine": "vllm"}


def test_llamacpp_rows_off_super_blocks_get_no_2_or_3_bits():
    profile = synthetic_profile(n_layers=2)
    plan = allocate(profile, PlanRequest(budget="4.3bpw", allocator="greedy", engine="llamacpp"))
    for m in profile.modules:
        if m.shape[1] % 256:
            assert plan.assignment[m.name].bits >= 4, m.name


def test_engine_errors_are_one_line():
    profile = synthetic_profile(n_layers=2)
    with pytest.raises(InvalidInput, match="unknown engine 'tgi'"):
        allocate(profile, PlanRequest(budget="4bpw", engine="tgi"))
    narrow = synthetic_profile(options="2,3", n_layers=2)
    with pytest.raises(InvalidInput, match="llamacpp engine can run module .* none of the profile's options"):
        allocate(narrow, PlanRequest(budget="4bpw", engine="llamacpp"))


def test_bitplan_engine_keeps_plan_ids():
    profile = synthetic_profile(n_layers=2)
    assert allocate(profile, PlanRequest(budget="3.5bpw")).id == allocate(profile, PlanRequest(budget="3.5bpw", engine="bitplan")).id
    assert np.array_equal(unit_of(profile.modules), unit_of(profile.modules, engine="bitplan"))


# ---------------------------------------------------------------------- profiles of GGUF types


def gguf_profile(n_layers: int = 3, n_experts: int = 0):
    """A synthetic SmolLM2-shaped profile whose options are GGUF types (`bitplan profile --engine llamacpp`)."""
    from bitplan.db.formats import parse_gguf_options
    from bitplan.db.types import Quantizer

    base = synthetic_profile(n_layers=n_layers, n_experts=n_experts)
    options = parse_gguf_options(None)
    rng = np.random.default_rng(1)
    numel = np.array([m.numel for m in base.modules], dtype=float)[:, None]
    bits = np.array([GGUF_TYPES[o.gguf].bits_per_weight for o in options])
    error = rng.lognormal(0, 1, (len(base.modules), 1)) * numel * 4.0 ** -bits * 1e-6
    size = [[o.size_bits(*m.shape) for o in options] for m in base.modules]
    return base.model_copy(update={"id": "prof-gguf", "options": options, "error": error,
                                   "size_bits": np.array(size), "quantizer": Quantizer(method="llamacpp")})


def test_gguf_options_are_llamacpps_types_with_its_fallbacks():
    from bitplan.db.formats import gguf_option, parse_gguf_options, stored_gguf_type

    q4k = gguf_option("Q4_K")
    assert (q4k.label, q4k.bits, q4k.group_size) == ("Q4_K", 4, 256)
    assert q4k.size_bits(1536, 1536) == 1536 * 1536 * 9 // 2  # 4.5 bpw, rows of whole super-blocks
    # a row of 576 is not whole blocks of 256: llama-quantize writes Q5_0 instead, and the size is Q5_0's
    assert stored_gguf_type("q4_k", 576) == "q5_0" and q4k.size_bits(576, 576) == 576 * 576 * 11 // 2
    assert [stored_gguf_type(t, 576) for t in ("q2_k", "q3_k", "q5_k", "q6_k", "iq4_xs", "q8_0")] == \
        ["q4_0", "q4_0", "q5_1", "q8_0", "iq4_nl", "q8_0"]
    assert stored_gguf_type("q4_0", 100) == "f16"  # not even whole blocks of 32
    labels = [o.label for o in parse_gguf_options("q8_0, Q2_K,q4_k")]
    assert labels == ["Q2_K", "Q4_K", "Q8_0"]  # in size order
    with pytest.raises(InvalidInput, match="unknown GGUF type 'q7_k'"):
        parse_gguf_options("q4_k,q7_k")


def test_gguf_profile_plans_for_llamacpp_only_and_never_asks_a_type_a_row_cannot_store():
    profile = gguf_profile()
    plan = allocate(profile, PlanRequest(budget="5bpw"))  # the engine follows the profile: llamacpp
    assert plan.params.get("engine", "llamacpp") == "llamacpp" and plan.total_bits <= plan.budget_bits
    for m in profile.modules:
        o = plan.assignment[m.name]
        assert GGUF_TYPES[o.gguf].fits(m.shape[1]), (m.name, o.label)  # Q4_K never sent to a 576-wide row
    assert sum(plan.assignment[m.name].size_bits(*m.shape) for m in profile.modules) == plan.total_bits
    widths = {m.shape[1] for m in profile.modules}
    assert widths == {576, 1536}  # both kinds of row are in the test
    from bitplan.planner.engines import constrain

    _, allowed, _ = constrain(profile, "llamacpp")
    labels = [o.label for o in profile.options]
    for i, m in enumerate(profile.modules):
        ok = {labels[j] for j in np.flatnonzero(allowed[i])}
        k = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"}
        assert (k <= ok) if m.shape[1] == 1536 else not (k & ok), (m.name, ok)
    for engine in ("bitplan", "vllm"):
        with pytest.raises(InvalidInput, match="GGUF types .* --engine llamacpp"):
            allocate(profile, PlanRequest(budget="5bpw", engine=engine))


def test_gguf_plan_type_file_names_the_planned_types():
    from bitplan.executor.export import llamacpp_types

    profile = gguf_profile(n_experts=4)
    plan = allocate(profile, PlanRequest(budget="5bpw"))
    types = llamacpp_types(plan, profile.modules)
    assert types["blk.0.attn_q.weight"] == plan.assignment["model.layers.0.self_attn.q_proj"].gguf
    # a hand-made plan asking Q4_K of a 576-wide row is refused, naming what llama-quantize would write
    bad = plan.model_copy(update={"assignment": {**plan.assignment, "model.layers.0.self_attn.q_proj":
                                                 next(o for o in profile.options if o.gguf == "q4_k")}})
    with pytest.raises(InvalidInput, match="cannot store model.layers.0.self_attn.q_proj as Q4_K.*Q5_0"):
        llamacpp_types(bad, profile.modules)
