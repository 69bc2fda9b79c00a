"""Exports (executor/export.py) round-trip through the reader (executor/foreign.py) to our own logits;
GPTQ packing, `dynamic` rules, compressed-tensors groups and llama.cpp tensor types are checked against
the engines' documented semantics, written out here independently."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from bitplan.db.types import Option
from bitplan.executor.apply import apply_plan
from bitplan.executor.export import checkpoint_name, export_plan, pack_bitstream, pack_words, unpack_bitstream, unpack_words
from bitplan.executor.foreign import load_foreign
from bitplan.db.formats import VLLM_FUSED, gguf_tensor_name
from bitplan.executor.load import load_quantized
from bitplan.profiler.model import load_model, planned_linears


def mixed(m) -> Option:
    """Every width, symmetric and not, per-channel and grouped, and 16 bits, over the tiny Llama's modules
    (k/v have 48 outputs: no 3-bit, whose zeros need outputs in multiples of 32)."""
    layer, leaf = m.layer or 0, m.name.rsplit(".", 1)[1]
    table = {"q_proj": Option(bits=3, group_size=32), "k_proj": Option(bits=4, group_size=32, symmetric=True),
             "v_proj": Option(bits=8, group_size=None), "o_proj": Option(bits=16),
             "gate_proj": Option(bits=2, group_size=32), "up_proj": Option(bits=4, group_size=16),
             "down_proj": Option(bits=3, group_size=32, symmetric=True)}
    o = table[leaf]
    return o if layer == 0 else Option(bits=4, group_size=32, symmetric=True)


@pytest.fixture(scope="module")
def tiny(loaded):
    return loaded, planned_linears(loaded.model)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory, manual_plan, logits):
    """Logits of the mixed plan in our own format, reloaded."""
    loaded, planned = tiny
    plan = manual_plan(planned, mixed)
    out = apply_plan(plan, loaded.model, loaded.tokenizer, planned, tmp_path_factory.mktemp("own") / "ck",
                     progress=False)
    model, _, _ = load_quantized(out)
    ids = torch.randint(0, loaded.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    return plan, ids, logits(model, ids)


@pytest.mark.parametrize("fmt", ["gptqmodel", "compressed-tensors"])
def test_export_round_trips_to_our_logits(fmt, tiny, reference, tmp_path, logits):
    loaded, planned = tiny
    plan, ids, expected = reference
    out = export_plan(plan, loaded.model, loaded.tokenizer, planned, tmp_path / fmt, fmt, progress=False)
    model, _, qc = load_foreign(out)
    assert torch.equal(logits(model, ids), expected)
    assert json.loads((out / "bitplan_plan.json").read_text())["id"] == plan.id
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind


def test_export_refuses_existing_folder(tiny, reference, tmp_path):
    loaded, planned = tiny
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="exists"):
        export_plan(reference[0], loaded.model, None, planned, tmp_path / "x", "gptqmodel", progress=False)


# ------------------------------------------------------------------------------------ packing


def _gptq_reference_pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's packing written bit by bit: bit j of code k of a column is stream bit k·bits + j."""
    K, N = q.shape
    words = [[0] * N for _ in range(K * bits // 32)]
    for k in range(K):
        for n in range(N):
            for j in range(bits):
                if int(q[k, n]) >> j & 1:
                    pos = k * bits + j
                    words[pos // 32][n] |= 1 << (pos % 32)
    t = torch.tensor(words, dtype=torch.int64)
    return torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_packing_matches_bit_by_bit_reference(bits):
    q = torch.randint(0, 2**bits, (64, 5), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    packed = pack_bitstream(q, bits)
    assert packed.shape == (64 * bits // 32, 5)
    assert torch.equal(packed, _gptq_reference_pack(q, bits))
    assert torch.equal(unpack_bitstream(packed, bits, 64), q)


def test_3bit_codes_straddle_words():
    q = torch.zeros(32, 1, dtype=torch.int32)
    q[10] = 0b111  # bits 30..32: two in word 0, one in word 1
    packed = pack_bitstream(q, 3).to(torch.int64) & 0xFFFFFFFF
    assert packed[:, 0].tolist() == [0b11 << 30, 1, 0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_compressed_tensors_packing(bits):
    q = torch.randint(0, 2**bits, (7, 45), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    packed = pack_words(q, bits, dim=1)
    assert packed.shape == (7, -(-45 * bits // 32))  # dense: codes straddle words, no bit left unused
    stream = sum((int(w) & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(packed[3].tolist()))
    assert [(stream >> (i * bits)) & (2**bits - 1) for i in range(45)] == q[3].tolist()
    assert torch.equal(unpack_words(packed, bits, 45, dim=1), q)
    assert torch.equal(unpack_words(pack_words(q, bits, dim=0), bits, 7, dim=0), q)


# ---------------------------------------------------------------------------- dynamic rules


def gptqmodel_resolve(qc: dict, name: str):
    """GPTQModel's `dynamic_get`: rules in order, `re.match` without the `+:`/`-:` prefix, first match wins;
    a `-:` match means not quantized (None here); no match means the top-level config."""
    for pattern, overrides in qc["dynamic"].items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return None
        elif re.match(pattern.removeprefix("+:"), name):
            return {**{k: qc[k] for k in ("bits", "group_size", "sym")}, **overrides}
    return {k: qc[k] for k in ("bits", "group_size", "sym")}


def as_fields(o: Option):
    return None if not o.quantized else {"bits": o.bits, "group_size": o.group_size or -1, "sym": o.symmetric}


def pick(d):
    return None if d is None else {k: d[k] for k in ("bits", "group_size", "sym")}


def test_dynamic_rules_resolve_every_module_hf_and_vllm_names(tiny, reference, tmp_path):
    loaded, planned = tiny
    plan = reference[0]
    out = export_plan(plan, loaded.model, None, planned, tmp_path / "g", "gptqmodel", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2" and qc["desc_act"] is False  # the plan has asymmetric options
    for pattern in qc["dynamic"]:
        assert re.fullmatch(r"[+-]:\^.*\$", pattern), pattern
    for m, _ in planned:
        assert pick(gptqmodel_resolve(qc, m.name)) == as_fields(plan.assignment[m.name]), m.name
    # vLLM asks with the fused names; every shard of a fused layer resolves like the fused layer
    for layer in range(2):
        for parent, fused in ((f"model.layers.{layer}.self_attn", "qkv_proj"), (f"model.layers.{layer}.mlp",
                                                                                "gate_up_proj")):
            shards = {json.dumps(as_fields(plan.assignment[f"{parent}.{s}"])) for s in VLLM_FUSED[fused]}
            if len(shards) == 1:
                assert json.dumps(pick(gptqmodel_resolve(qc, f"{parent}.{fused}"))) == shards.pop()


def test_symmetric_plan_is_gptq_v1_with_zero_minus_one(tiny, tmp_path, manual_plan):
    loaded, planned = tiny
    plan = manual_plan(planned, lambda m: Option(bits=4, group_size=32, symmetric=True))
    out = export_plan(plan, loaded.model, None, planned, tmp_path / "v1", "gptqmodel", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["checkpoint_format"], qc["sym"], qc["bits"], qc["dynamic"]) == ("gptq", True, 4, {})
    from safetensors.torch import load_file
    state = load_file(out / "model.safetensors")
    zeros = unpack_bitstream(state["model.layers.0.self_attn.q_proj.qzeros"].T, 4, 96)
    assert torch.all(zeros == 7)  # zero 8, stored as 8 - 1


def test_compressed_tensors_groups_target_exact_names(tiny, reference, tmp_path):
    loaded, planned = tiny
    plan = reference[0]
    out = export_plan(plan, loaded.model, None, planned, tmp_path / "ct", "compressed-tensors", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    seen = {}
    for group in qc["config_groups"].values():
        w = group["weights"]
        for t in group["targets"]:
            assert t not in seen
            seen[t] = {"bits": w["num_bits"], "group_size": w["group_size"] or -1, "sym": w["symmetric"]}
    for m, _ in planned:
        o = plan.assignment[m.name]
        assert seen.get(m.name) == as_fields(o) if o.quantized else m.name in qc["ignore"]


# ------------------------------------------------------------------------------------ llama.cpp


def test_llamacpp_tensor_types_are_anchored_lowercase_and_exclusive(tiny, tmp_path, manual_plan):
    loaded, planned = tiny
    plan = manual_plan(planned, lambda m: Option(bits=8 if m.name.endswith("down_proj") else 4))
    out = export_plan(plan, loaded.model, None, planned, tmp_path / "l", "llamacpp", progress=False)
    lines = (out / "tensor_types.txt").read_text().split()
    tensors = [gguf_tensor_name(m.name) for m, _ in planned]
    for line in lines:
        pattern, t = line.rsplit("=", 1)
        assert line == line.lower() and pattern.startswith("^") and pattern.endswith("$")
    for tensor in tensors:  # llama.cpp regex_searches every line: exactly one may match
        hits = [line.rsplit("=", 1)[1] for line in lines if re.search(line.rsplit("=", 1)[0], tensor)]
        assert len(hits) == 1, (tensor, hits)
        # in_features 96 / 160 are not whole K-quant super-blocks: legacy types
        assert hits[0] == ("q8_0" if "ffn_down" in tensor else "q4_0")
    cmd = (out / "llama-quantize.sh").read_text()
    assert "--tensor-type-file tensor_types.txt" in cmd and cmd.rstrip().endswith("Q4_0")


def test_llamacpp_refuses_width_without_gguf_type(tiny, tmp_path, manual_plan):
    loaded, planned = tiny
    plan = manual_plan(planned, lambda m: Option(bits=3))
    with pytest.raises(ValueError, match="--engine llamacpp"):
        export_plan(plan, loaded.model, None, planned, tmp_path / "l", "llamacpp", progress=False)
    assert not (tmp_path / "l").exists()


# ------------------------------------------------------------------------------------------ MoE


def test_moe_exports_name_experts_for_every_engine(moe_checkpoint, tmp_path, manual_plan, logits):
    loaded = load_model(str(moe_checkpoint("mixtral")))
    planned = planned_linears(loaded.model)

    def vllm_like(m):  # one option for all experts of a layer, q/k/v and gate/up tied
        if m.expert is not None:
            return Option(bits=8 if m.layer == 0 else 4, group_size=32, symmetric=True)
        return Option(bits=4 if "self_attn" in m.name else 16, group_size=32, symmetric=True)

    plan = manual_plan(planned, vllm_like)
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    own = apply_plan(plan, loaded.model, None, planned, tmp_path / "own", progress=False)
    expected = logits(load_quantized(own)[0], ids)
    out = export_plan(plan, loaded.model, None, planned, tmp_path / "g", "gptqmodel", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert torch.equal(logits(load_foreign(out)[0], ids), expected)
    # Mixtral's checkpoints (transformers, vLLM, GPTQModel) name experts `block_sparse_moe.experts.E.w1|w3|w2`
    keys = set(load_file(out / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.4.w2.qweight" in keys and "model.layers.1.block_sparse_moe.gate.weight" in keys
    assert not [k for k in keys if ".mlp." in k]
    for m, _ in planned:
        assert pick(gptqmodel_resolve(qc, checkpoint_name("mixtral", m.name))) == as_fields(plan.assignment[m.name]), m.name
    # vLLM's FusedMoE asks once per layer, with the experts' prefix
    for layer in range(2):
        expert = next(m for m, _ in planned if m.layer == layer and m.expert is not None)
        assert pick(gptqmodel_resolve(qc, f"model.layers.{layer}.block_sparse_moe.experts")) == \
            as_fields(plan.assignment[expert.name])
    ct = export_plan(plan, loaded.model, None, planned, tmp_path / "ct", "compressed-tensors", progress=False)
    assert torch.equal(logits(load_foreign(ct)[0], ids), expected)
    cpp = export_plan(plan, loaded.model, None, planned, tmp_path / "l", "llamacpp", progress=False)
    lines = (cpp / "tensor_types.txt").read_text().split()
    assert r"^blk\.0\.ffn_gate_exps\.weight$=q8_0" in lines and r"^blk\.1\.ffn_down_exps\.weight$=q4_0" in lines
    assert len(lines) == len({gguf_tensor_name(m.name) for m, _ in planned})


def test_exports_warn_where_vllm_refuses_the_plan(tiny, reference, manual_plan, caplog):
    """vLLM's GPTQ loader takes 4/8-bit symmetric weights only; its compressed-tensors path every dense width."""
    from bitplan.executor.export import compressed_tensors_config, gptq_config

    loaded, planned = tiny
    modules = [m for m, _ in planned]
    with caplog.at_level("WARNING", logger="bitplan.executor.export"):
        gptq_config(reference[0], modules)
        compressed_tensors_config(reference[0], modules)
    gptq = [r.message for r in caplog.records if r.message.startswith("gptqmodel export")]
    assert any("refuses these" in w and "'3b/g32'" in w and "--format compressed-tensors" in w for w in gptq)
    assert not any("expert options" in r.message for r in caplog.records)  # a dense plan: vLLM runs every width
    caplog.clear()
    symmetric = manual_plan(planned, lambda m: Option(bits=4, group_size=32, symmetric=True))
    with caplog.at_level("WARNING", logger="bitplan.executor.export"):
        gptq_config(symmetric, modules)
    assert not caplog.records
