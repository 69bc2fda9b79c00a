"""The speed test's baseline and its guard: what `bitplan eval --device cuda` compares against."""

import pytest
import torch

from bitplan.db.types import InvalidInput, Option
from bitplan.executor.evaluate import dense_twin
from bitplan.executor.quant_linear import QuantLinear
from bitplan.executor.quantize import quantize
from bitplan.profiler.model import planned_linears


def test_dense_twin_is_the_same_model_unquantized():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    for module, linear in planned_linears(model):
        model.set_submodule(module.name, QuantLinear.from_quantized(quantize(linear.weight.float(), Option(bits=3))))
    twin = dense_twin(model, torch.float32)
    assert not any(isinstance(m, QuantLinear) for m in twin.modules())
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(planned_linears(twin))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_eval_on_cuda_without_a_gpu_says_so(monkeypatch, tmp_path):
    from bitplan.db.store import Store
    from bitplan.planner.workflow import run_eval
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with Store(str(tmp_path / "b.db")) as store, pytest.raises(InvalidInput, match="--device cpu"):
        run_eval(store, str(tmp_path), device="cuda")
