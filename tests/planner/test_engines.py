"""Engine-aware planning (planner/engines.py): ties, allowed options and exact sizes of vLLM and llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest

from bitplan.db.types import InvalidInput
from bitplan.db.formats import GGUF_TYPES, gguf_type, llamacpp_group, vllm_group
from bitplan.planner.engines import vllm_allows
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
            assert vllm_allows(m, o) and not (m.expert is not None and o.bits == 8 and not o.symmetric), m.name
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


def symmetric_profile(options: str = "2,3,4,8", **kw):
    """`synthetic_profile` with symmetric options (what vLLM's GPTQ loader takes at 4 and 8 bits)."""
    from bitplan.db.types import parse_options

    base = synthetic_profile(options=options, **kw)
    opts = parse_options(options, symmetric=True)
    size = [[o.size_bits(*m.shape) for o in opts] for m in base.modules]
    return base.model_copy(update={"id": base.id + "-sym", "options": opts, "size_bits": np.array(size)})


def test_ties_compose_with_granularity_and_pins():
    profile = symmetric_profile(n_layers=3, n_experts=2)
    units = unit_of(profile.modules, "expert", "llamacpp")
    # expert granularity ties an expert's three matrices, llama.cpp ties each kind across experts: one unit
    assert len({units[i] for i, m in enumerate(profile.modules) if m.layer == 2 and m.expert is not None}) == 1
    # layer ties put a whole layer at one option; the pin puts layer 0 at 8 (symmetric: experts may take it)
    request = dict(budget="6bpw", allocator="ilp", engine="vllm", granularity="layer", pins=["model.layers.0.self_attn.q_proj>=8"])
    plan = allocate(profile, PlanRequest(**request))
    assert plan.assignment["model.layers.0.self_attn.k_proj"].bits == 8  # tied to q by vLLM
    assert plan.assignment["model.layers.0.mlp.experts.1.down_proj"].bits == 8  # and to its layer
    assert plan.params == {"granularity": "layer", "engine": "vllm"}
    # asymmetric 8-bit experts have no vLLM MoE kernel: the same pin on asymmetric options leaves layer 0 nothing
    with pytest.raises(InvalidInput, match="no option every module of one layer tied for the vllm engine"):
        allocate(synthetic_profile(n_layers=3, n_experts=2), PlanRequest(**request))


# ---------------------------------------------------------------------- vLLM's rules, from its source (docs/engines.md)


def _opt(bits, group=64, sym=False):
    from bitplan.db.types import Option

    return Option(bits=bits, group_size=group, symmetric=sym)


def _mod(shape, role="q_proj", expert=None):
    from bitplan.db.types import Module

    name = f"model.layers.0.mlp.experts.0.{role}" if expert is not None else f"model.layers.0.self_attn.{role}"
    return Module(name=name, shape=shape, layer=0, role=role, expert=expert)


def test_vllm_dense_modules_take_2_to_8_bits_either_symmetry_through_compressed_tensors():
    q = _mod((576, 576))
    # compressed-tensors WNA16: 2..8 bits, zero points or not (Marlin at 4/8, Humming for the rest)
    for bits in (2, 3, 4, 5, 6, 8):
        assert vllm_allows(q, _opt(bits)) and vllm_allows(q, _opt(bits, sym=True)), bits
    # vLLM's GPTQ loader (AutoGPTQConfig.TYPE_MAP, also behind --quantization gptq): 4/8-bit symmetric only
    assert [b for b in (2, 3, 4, 5, 6, 8) if vllm_allows(q, _opt(b, sym=True), "gptqmodel")] == [4, 8]
    assert not vllm_allows(q, _opt(4), "gptqmodel")
    # Marlin's group sizes, dividing in_features; codes and zeros in whole int32 words
    assert vllm_allows(q, _opt(4, None)) and vllm_allows(q, _opt(4, 32)) and vllm_allows(q, _opt(4, 64))
    assert not vllm_allows(q, _opt(4, 128))  # 576 is not whole groups of 128
    assert vllm_allows(_mod((576, 640)), _opt(4, 128)) and not vllm_allows(_mod((640, 1024)), _opt(4, 256))
    assert not vllm_allows(_mod((576, 100)), _opt(4, None))  # 100 x 4 bits is not whole int32 words
    assert vllm_allows(q, _opt(16, None))  # unquantized is always fine
    with pytest.raises(InvalidInput, match="unknown vLLM route"):
        vllm_allows(q, _opt(4), "exllama")


def test_vllm_routed_experts_follow_its_moe_kernels():
    gate, down = _mod((384, 576), "gate_proj", 0), _mod((576, 384), "down_proj", 0)
    # grouped 2/3/5/6-bit experts run on Humming; 4-bit either symmetry and 8-bit symmetric on Marlin MoE/Triton
    for bits in (2, 3, 4, 5, 6):
        assert vllm_allows(gate, _opt(bits)) and vllm_allows(down, _opt(bits, sym=True)), bits
    assert vllm_allows(gate, _opt(8, sym=True)) and vllm_allows(down, _opt(8, 32, sym=True))
    # asymmetric 8-bit: no WNA16 MoE backend takes it
    assert not vllm_allows(gate, _opt(8)) and not vllm_allows(down, _opt(8, 32))
    # per-channel experts run only on Marlin MoE: 4 bits or 8 symmetric, hidden a multiple of 128
    assert not vllm_allows(gate, _opt(4, None)) and not vllm_allows(down, _opt(8, None, sym=True))  # hidden 576
    wide_gate, wide_down = _mod((384, 1024), "gate_proj", 0), _mod((1024, 384), "down_proj", 0)
    assert vllm_allows(wide_gate, _opt(4, None)) and vllm_allows(wide_down, _opt(8, None, sym=True))
    assert not vllm_allows(wide_gate, _opt(3, None)) and not vllm_allows(wide_down, _opt(8, None))
    # the GPTQ loader: 4/8-bit symmetric experts only
    assert vllm_allows(gate, _opt(4, sym=True), "gptqmodel") and not vllm_allows(gate, _opt(2, sym=True), "gptqmodel")


def test_vllm_plans_may_give_experts_2_bits_and_note_the_compressed_tensors_route():
    from bitplan.planner.engines import constrain

    profile = synthetic_profile(n_layers=2, n_experts=4)  # asymmetric 2/3/4/8-bit g64, hidden 576
    _, allowed, notes = constrain(profile, "vllm")
    labels = [o.label for o in profile.options]
    for i, m in enumerate(profile.modules):
        ok = {labels[j] for j in np.flatnonzero(allowed[i])}
        assert ok == ({"2b/g64", "3b/g64", "4b/g64"} if m.expert is not None else set(labels)), (m.name, ok)
    assert len(notes) == 1 and "only through --format compressed-tensors" in notes[0]
    plan = allocate(profile, PlanRequest(budget="3bpw", allocator="ilp", engine="vllm"))
    assert plan.total_bits <= plan.budget_bits
    assert min(plan.assignment[m.name].bits for m in profile.modules if m.expert is not None) < 4
    # a symmetric 4/8-bit profile is what the GPTQ loader takes as well: no note
    _, _, notes = constrain(symmetric_profile(options="4,8", n_layers=2, n_experts=4), "vllm")
    assert notes == []


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
