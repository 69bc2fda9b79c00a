"""MoE end to end: profile -> plan (one option per expert) -> apply -> load gives the in-memory quantized
model's logits, with every expert's QuantLinear tensors under the un-fused names."""

import json

import pytest
import torch
from safetensors import safe_open

from bitplan.db.store import Store
from bitplan.db.types import parse_options
from bitplan.executor.apply import apply_plan
from bitplan.executor.load import load_quantized
from bitplan.executor.quant_linear import QuantLinear
from bitplan.planner.app.cli import main
from bitplan.planner.app.heatmap import expert_heatmap
from bitplan.planner.plan import allocate
from bitplan.planner.request import PlanRequest
from bitplan.profiler.model import load_model, planned_linears
from bitplan.profiler.moe import ExpertLinears
from bitplan.profiler.profile import profile_model


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_profile_plan_apply_load_round_trip(kind, moe_checkpoint, text_file, tmp_path, capsys,
                                             assert_reloads_as_in_memory):
    loaded = load_model(str(moe_checkpoint(kind)))
    profile = profile_model(loaded, parse_options("2,3,4,8"), estimator="hessian", calib=str(text_file),
                            n_tokens=256, seq_len=64, progress=False)
    plan = allocate(profile, PlanRequest(budget="3.5bpw", allocator="ilp", granularity="expert"))
    assert plan.total_bits <= plan.budget_bits and plan.bits_per_weight <= 3.5
    experts = [m for m in profile.modules if m.expert is not None]
    for m in experts:  # one option per expert: its three matrices agree
        siblings = {plan.assignment[f"{m.name.rsplit('.', 1)[0]}.{r}"] for r in ("gate_proj", "up_proj", "down_proj")}
        assert len(siblings) == 1

    planned = planned_linears(loaded.model)
    out = apply_plan(plan, loaded.model, loaded.tokenizer, planned, tmp_path / "q", progress=False)
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    quantized = next(m.name for m in experts if plan.assignment[m.name].quantized)
    assert f"{quantized}.qweight_s0" in keys and f"{quantized}.scales" in keys
    assert not any("gate_up_proj" in k for k in keys)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(qc["modules"]) == {m.name for m in profile.modules}

    reloaded, _, _ = load_quantized(out)
    assert isinstance(reloaded.get_submodule(quantized), QuantLinear)
    assert isinstance(reloaded.model.layers[0].mlp.experts, ExpertLinears)
    assert_reloads_as_in_memory(loaded.model, reloaded, plan)

    # `bitplan show PLAN` prints the layer x expert heat map under the plan's summary
    db = str(tmp_path / "bitplan.db")
    with Store(db) as store:
        store.save_profile(profile)
        store.save_plan(plan)
    assert main(["show", plan.id, "--db", db, "-q"]) == 0
    text = capsys.readouterr().out
    assert expert_heatmap(plan, profile) in text and f"plan {plan.id}" in text
    rows = [line.split() for line in text.splitlines() if line.strip().startswith("L")]
    n_experts = len(reloaded.model.layers[0].mlp.experts)
    assert [r[0] for r in rows] == [f"L{l}" for l in range(loaded.model.config.num_hidden_layers)]
    assert all(len(r) == n_experts + 1 + 1 for r in rows)  # label, one cell per expert, the layer mean
    for e in range(n_experts):
        assert f"e{e}" in text
    # without the profile (a plan file alone) the experts come from the names
    assert expert_heatmap(plan).splitlines()[2:] == expert_heatmap(plan, profile).splitlines()[2:]


def test_quantized_experts_in_one_launch_equal_the_per_expert_loop(moe_checkpoint, text_file, tmp_path,
                                                                   kernel_device, fp32_tolerance):
    """The loaded checkpoint's experts, mixed widths, through the MoE kernel (on a GPU, or Triton's interpreter
    on the CPU) give the per-expert loop's output, with the experts' weights held once (views of the packs)."""
    from bitplan.executor.quant_linear import QuantExpertLinears

    loaded = load_model(str(moe_checkpoint("mixtral")))
    profile = profile_model(loaded, parse_options("2,3,4,8"), estimator="hessian", calib=str(text_file),
                            n_tokens=256, seq_len=64, progress=False)
    plan = allocate(profile, PlanRequest(budget="3.5bpw", allocator="ilp", granularity="expert"))
    options = {o.bits: o for o in profile.options}
    assignment = dict(plan.assignment)
    for name in assignment:  # every width in one layer: expert e of layer 0 at 2, 3, 4, 8, 2 bits
        if ".layers.0.mlp.experts." in name:
            assignment[name] = options[(2, 3, 4, 8)[int(name.split(".experts.")[1].split(".")[0]) % 4]]
    plan = plan.model_copy(update={"assignment": assignment})
    out = apply_plan(plan, loaded.model, loaded.tokenizer, planned_linears(loaded.model), tmp_path / "q",
                     progress=False)
    experts = load_quantized(out)[0].model.layers[0].mlp.experts.to(kernel_device)
    assert isinstance(experts, QuantExpertLinears)
    assert len({e.gate_proj.option.bits for e in experts}) > 1  # mixed widths in one layer
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, experts[0].gate_proj.in_features, generator=g).to(kernel_device)
    top_k_index = torch.stack([torch.randperm(len(experts), generator=g)[:2] for _ in range(7)]).to(kernel_device)
    top_k_weights = torch.softmax(torch.randn(7, 2, generator=g), -1).to(kernel_device)
    want = ExpertLinears.forward(experts, hidden, top_k_index, top_k_weights)
    got = experts.fused(hidden, top_k_index, top_k_weights)
    torch.testing.assert_close(got, want, **fp32_tolerance)
    packs = experts._packed_experts[1]
    q0 = packs["down_proj"].q0
    for e in experts:
        ptr = e.down_proj.qweight_s0.data_ptr()
        assert q0.data_ptr() <= ptr < q0.data_ptr() + q0.numel() * 4
    # and the loop still gives the same after the buffers were re-pointed
    torch.testing.assert_close(ExpertLinears.forward(experts, hidden, top_k_index, top_k_weights), want)
