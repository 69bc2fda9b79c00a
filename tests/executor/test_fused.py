"""Sibling projections merged into one linear for decoding (`executor/fused.py`): found by what the model
calls, merged only where they concatenate, the same logits after, and traceable whole by torch.compile."""

import pytest
import torch

from bitplan.db.types import Option
from bitplan.executor.evaluate import dense_twin
from bitplan.executor.fused import FusedProjection, fuse_projections, sibling_linears
from bitplan.executor.quant_linear import QuantLinear
from bitplan.kernels.quantize import quantize
from bitplan.profiler.model import planned_linears

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def mixed_llama():
    """A small random Llama whose linears are QuantLinears: q at 3 bits, every other one at 4."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    for module, linear in planned_linears(model):
        bits = 3 if module.name.endswith("q_proj") else 4
        model.set_submodule(module.name, QuantLinear.from_quantized(quantize(linear.weight.float(), Option(bits=bits))))
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_siblings_are_the_linears_called_with_one_input(mixed_llama):
    found = sibling_linears(mixed_llama, IDS[:1, :4])
    assert found == [(f"model.layers.{i}.{part}", names) for i in range(2)
                     for part, names in (("self_attn", ["q_proj", "k_proj", "v_proj"]),
                                         ("mlp", ["gate_proj", "up_proj"]))]


def test_merged_where_options_match_and_logits_unchanged(mixed_llama):
    want = logits(mixed_llama)
    twin = dense_twin(mixed_llama, torch.float32)
    twin_want = logits(twin)
    # q (3 bits) stays alone; k and v (4 bits) merge, and gate and up: two merged linears a layer
    assert fuse_projections(mixed_llama, IDS[:1, :4]) == 4
    attn = mixed_llama.model.layers[0].self_attn
    assert isinstance(attn.q_proj, QuantLinear)
    assert isinstance(attn.k_proj, FusedProjection) and attn.k_proj.merged is attn.v_proj.merged
    assert attn.k_proj.merged.out_features == attn.k_proj.out_features + attn.v_proj.out_features
    torch.testing.assert_close(logits(mixed_llama), want, rtol=1e-5, atol=1e-5)
    # the bf16 twin's nn.Linears merge whole: q, k and v in one, gate and up in another
    assert fuse_projections(twin, IDS[:1, :4]) == 4
    assert isinstance(twin.model.layers[1].self_attn.q_proj, FusedProjection)
    torch.testing.assert_close(logits(twin), twin_want, rtol=1e-5, atol=1e-5)
    # no output is held between forward passes
    assert all(m.group.source is None and not m.group.parts for m in twin.modules() if isinstance(m, FusedProjection))


def test_compiles_whole(mixed_llama):
    """The merged model traces as one graph (what decode with `compile` captures): the group's state
    within a pass is followed by torch.compile, not a graph break."""
    fuse_projections(mixed_llama, IDS[:1, :4])
    want = logits(mixed_llama)
    compiled = torch.compile(mixed_llama, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(logits(compiled), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(compiled, IDS + 1), logits(mixed_llama, IDS + 1), rtol=1e-5, atol=1e-5)


def test_weight_bytes_count_a_merged_linear_once(mixed_llama):
    """What a speed report gives as the model's weight bytes does not grow when siblings merge (each of
    them holds the merged linear) nor count a tied head twice."""
    from bitplan.executor.evaluate import _weight_gib
    before = _weight_gib(mixed_llama)
    fuse_projections(mixed_llama, IDS[:1, :4])
    assert _weight_gib(mixed_llama) == pytest.approx(before)
