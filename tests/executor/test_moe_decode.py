"""A quantized MoE model's decode step without host reads: the fused experts route into one static segment
per expert (a masked-out slot and an idle expert included), and its bf16 twin fuses the experts again as
transformers holds them."""

import pytest
import torch

from bitplan.db.types import Option
from bitplan.executor.evaluate import dense_twin
from bitplan.executor.quant_linear import QuantExpertLinears, QuantLinear, fuse_quantized_experts
from bitplan.kernels.quantize import quantize
from bitplan.profiler.model import planned_linears
from bitplan.profiler.moe import ExpertLinears, unfuse_experts

WIDTHS = (2, 3, 4)  # expert e at WIDTHS[e % 3] bits


@pytest.fixture(scope="module")
def mixtral():
    """A small random Mixtral, experts at mixed widths, attention at 4 bits, experts fused for one launch."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)).eval()
    unfuse_experts(model)
    for module, linear in planned_linears(model):
        if module.expert is not None or module.role in ("q_proj", "k_proj", "v_proj", "o_proj"):
            bits = WIDTHS[module.expert % len(WIDTHS)] if module.expert is not None else 4
            model.set_submodule(module.name, QuantLinear.from_quantized(
                quantize(linear.weight.float(), Option(bits=bits, group_size=32))))
    assert fuse_quantized_experts(model) == 2
    return model


def test_fused_experts_with_a_masked_slot_and_an_idle_expert_equal_the_loop(mixtral, kernel_device,
                                                                               fp32_tolerance):
    experts = mixtral.model.layers[0].mlp.experts.to(kernel_device)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 64, generator=g).to(kernel_device)
    top_k_index = torch.tensor([[0, 2], [1, 4], [2, 0], [4, 1], [1, 0]], device=kernel_device)  # 4 masked, 3 idle
    top_k_weights = torch.softmax(torch.randn(5, 2, generator=g), -1).to(kernel_device)
    want = ExpertLinears.forward(experts, hidden, top_k_index, top_k_weights)
    got = experts.fused(hidden, top_k_index, top_k_weights)
    torch.testing.assert_close(got, want, **fp32_tolerance)
    assert experts._packed_experts is not None
    experts.to("cpu")  # moved or cast, the packs are made again from the experts' buffers
    assert experts._packed_experts is None


def test_moe_twin_fuses_the_experts_and_gives_the_quantized_models_logits(mixtral, monkeypatch):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    twin = dense_twin(mixtral, torch.float32)
    assert not any(isinstance(m, (QuantLinear, ExpertLinears)) for m in twin.modules())
    assert isinstance(twin.model.layers[1].mlp.experts, MixtralExperts)
    assert isinstance(mixtral.model.layers[1].mlp.experts, QuantExpertLinears)  # the model is left as it was
    grouped, calls = ALL_EXPERTS_FUNCTIONS["grouped_mm"], []
    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS._global_mapping, "grouped_mm",
                        lambda *a, **k: calls.append(1) or grouped(*a, **k))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, mixtral(ids).logits, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2  # one per layer: transformers' grouped-mm experts, not its per-expert loop


def test_compiled_step_calls_the_experts_as_they_are(mixtral):
    """Compiled (as decoding with `compile` does), the experts run uncompiled between the compiled pieces and
    the logits are the eager model's."""
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = mixtral(ids).logits
        torch.testing.assert_close(torch.compile(mixtral, backend="aot_eager")(ids).logits, want)
