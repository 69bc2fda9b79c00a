import copy
import json

import pytest
import torch

from bitplan.db.types import InvalidInput, ModelRef, Option, Plan, Quantizer
from bitplan.executor.apply import apply_plan, quantize_model
from bitplan.executor.load import load_quantized
from bitplan.kernels.quantize import gptq as gptq_of
from bitplan.profiler.model import decoder_layers, planned_linears
from bitplan.profiler.profile import gptq_on_quantized_inputs
from bitplan.profiler.stream import collect_hessians


def plan_for(planned, bits=3) -> Plan:
    return Plan(id="plan-gptq", profile_id="prof-test", model=ModelRef(name="tiny"), budget="3bpw",
                budget_bits=1,
                allocator="manual", assignment={m.name: Option(bits=bits) for m, _ in planned}, total_bits=1,
                n_params=1, bits_per_weight=1.0, predicted_error=0.0, status="manual", solve_seconds=0.0)


def test_apply_with_gptq(loaded, tmp_path):
    """GPTQ checkpoints load like RTN ones, record their quantizer, and are closer to the base model."""
    model = loaded.model
    planned = planned_linears(model)
    plan = plan_for(planned, bits=2)
    calib = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    H = collect_hessians(model, calib, planned, progress=False)
    assert set(H) == {m.name for m, _ in planned}
    gptq = Quantizer(method="gptq")
    out = apply_plan(plan, model, None, planned, tmp_path / "gptq", progress=False, quantizer=gptq, hessians=H)
    rtn_out = apply_plan(plan, model, None, planned, tmp_path / "rtn", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["quantizer"]) == ("bitplan", "gptq")
    assert qc["quantizer_settings"] == {"damp": 0.1, "block_size": 128, "act_order": True, "clip": False}
    qc = json.loads((rtn_out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["quantizer"], qc["quantizer_settings"]) == ("bitplan", "rtn", {"clip": False})
    reloaded, _, _ = load_quantized(out)
    in_memory = copy.deepcopy(model)
    quantize_model(in_memory, planned_linears(in_memory), plan, quantizer=gptq, hessians=H)
    rtn_model, _, _ = load_quantized(rtn_out)
    with torch.no_grad():
        base = torch.log_softmax(model(calib).logits, -1)
        got = reloaded(calib).logits
        torch.testing.assert_close(got, in_memory(calib).logits, rtol=0, atol=1e-5)

        def kl(logits):
            return float((base.exp() * (base - torch.log_softmax(logits, -1))).sum(-1).mean())

        assert kl(got) < kl(rtn_model(calib).logits)


def test_a_checkpoint_that_records_no_quantizer_loads(loaded, tmp_path):
    """The loaders need `quant_method` and `modules` alone: a checkpoint written without the quantizer keys
    (RTN ones recorded none; GPTQ ones the method only) loads the same."""
    planned = planned_linears(loaded.model)
    out = apply_plan(plan_for(planned), loaded.model, None, planned, tmp_path / "q", progress=False)
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_quantized(out)[0](ids).logits
        config = json.loads((out / "config.json").read_text())
        for key in ("quantizer", "quantizer_settings"):
            del config["quantization_config"][key]
        (out / "config.json").write_text(json.dumps(config))
        torch.testing.assert_close(load_quantized(out)[0](ids).logits, want, rtol=0, atol=0)


def test_gptq_without_hessians_fails_before_writing(loaded, tmp_path):
    planned = planned_linears(loaded.model)
    plan = plan_for(planned)
    with pytest.raises(InvalidInput, match="needs the input statistics"):
        apply_plan(plan, loaded.model, None, planned, tmp_path / "q", progress=False,
                   quantizer=Quantizer(method="gptq"))
    with pytest.raises(TypeError, match="quantizer must be a Quantizer"):
        apply_plan(plan, loaded.model, None, planned, tmp_path / "q", progress=False, quantizer="gptq")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("embeddings", [False, True], ids=["16-bit-embedding", "quantized-embedding"])
def test_gptq_on_quantized_inputs_is_gptq_block_by_block(loaded, embeddings):
    """`--gptq-inputs quantized`: each block's GPTQ takes its `H` from the model whose embedding and earlier
    blocks already hold their quantized weights (rebuilt here by hand, block by block, with the plain
    `collect_hessians`), bit for bit; the model is left as it was."""
    model = loaded.model
    planned = planned_linears(model, embeddings=embeddings)
    plan = plan_for(planned, bits=2)
    if embeddings:
        plan = plan.model_copy(update={"assignment": {**plan.assignment, planned[0][0].name: Option(bits=4)}})
    calib = torch.randint(0, model.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(2))
    quantizer = Quantizer(method="gptq")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = gptq_on_quantized_inputs(model, calib, planned, plan.assignment, quantizer, progress=False)
    assert cache.inputs == "quantized"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    ref = copy.deepcopy(model)
    ref_planned = planned_linears(ref, embeddings=embeddings)
    if embeddings:  # the embedding is RTN (no H): quantized before any block runs
        m, emb = ref_planned[0]
        emb.weight.data = quantize_model_weight(emb.weight, plan.assignment[m.name])
    original = collect_hessians(model, calib, [(m, lin) for m, lin in planned if m.layer is not None], progress=False)
    for i in range(len(decoder_layers(ref))):
        mine = [(m, lin) for m, lin in ref_planned if m.layer == i]
        H = collect_hessians(ref, calib, mine, progress=False)
        for m, lin in mine:
            want = gptq_of(lin.weight, H[m.name], plan.assignment[m.name], **quantizer.settings)
            got = cache.gptq(m.name, lin.weight, None, plan.assignment[m.name], quantizer)
            assert torch.equal(got.q, want.q) and torch.equal(got.scales, want.scales), m.name
            lin.weight.data = want.dequantize(lin.weight.dtype)
        # the first block sees the original inputs only where nothing before it is quantized
        assert any(not torch.equal(H[m.name], original[m.name]) for m, _ in mine) == (i > 0 or embeddings)


def quantize_model_weight(weight, option):
    from bitplan.kernels.quantize import quantize

    return quantize(weight, option).dequantize(weight.dtype)
