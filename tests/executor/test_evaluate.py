"""The speed test's baseline and its guard (what `bitplan eval --device cuda` compares against), and the
measurement of module choices swapped in by the fitness oracle (`evaluate_choices`, `summarize_windows`)."""

import math

import numpy as np
import pytest
import torch

from bitplan.db.types import InvalidInput, Option, parse_options
from bitplan.executor.evaluate import (dense_twin, eval_windows, evaluate_choices, evaluate_plans,
                                       summarize_windows)
from bitplan.executor.quant_linear import QuantLinear
from bitplan.kernels.quantize import quantize
from bitplan.profiler.fitness import KLFitness
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
    from bitplan.planner.app.usecases import run_eval
    from bitplan.planner.app.workspace import Workspace
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with Store(str(tmp_path / "b.db")) as store, pytest.raises(InvalidInput, match="--device cpu"):
        run_eval(Workspace(store), str(tmp_path), device="cuda")


def test_evaluate_choices_measures_what_evaluate_plans_does(loaded, text_file):
    """Module choices swapped in by the fitness oracle and measured window by window (what
    bench/evolutionary.py reports): the perplexity and KL `evaluate_plans` measures for the same
    assignments; a choice named twice measures equal on the same windows; the original weights come back;
    `summarize_windows` over every window or the first few."""
    model = loaded.model
    planned = planned_linears(model)
    options = parse_options("2,3,4,8")
    windows = eval_windows(loaded.tokenizer, str(text_file), tokens=256, window=64)
    assert tuple(windows.ids.shape) == (4, 64)
    low = np.random.default_rng(0).integers(0, 2, len(planned))  # 2 or 3 bits
    high = np.full(len(planned), 3)  # 8 bits
    choices = {"low": low, "high": high, "again": low.copy()}
    with KLFitness(model, planned, options, windows.ids[:1], windows.ids[1:2]) as oracle:
        per_window = evaluate_choices(oracle, model, windows.ids, choices)
        assert all(lin.weight.data_ptr() == W.data_ptr() for (_, lin), W in zip(planned, oracle.original))
    assert set(per_window) == set(choices)
    assert all(len(v["nll"]) == len(v["kl"]) == 4 for v in per_window.values())
    assert per_window["again"] == per_window["low"]  # the same choice on the same windows: the same sums

    measured = summarize_windows(per_window, 64)
    assignments = [{m.name: options[o] for (m, _), o in zip(planned, c)} for c in (low, high)]
    want = evaluate_plans(model, planned, assignments, windows.ids, progress=False)
    for name, w in zip(("low", "high"), want):
        assert measured[name]["perplexity"] == pytest.approx(w["perplexity"], rel=1e-5)
        assert measured[name]["kl"] == pytest.approx(w["kl"], rel=1e-4, abs=1e-9)
        assert measured[name]["tokens"] == 256
    assert 0 <= measured["high"]["kl"] < measured["low"]["kl"] and measured["low"]["perplexity"] > 1
    assert measured["again"] == measured["low"]

    first = summarize_windows(per_window, 64, 2)  # the first 2 windows only
    nll, kl = per_window["low"]["nll"][:2], per_window["low"]["kl"][:2]
    assert first["low"]["tokens"] == 128
    assert first["low"]["perplexity"] == pytest.approx(math.exp(sum(nll) / (2 * 63)), rel=1e-12)
    assert first["low"]["kl"] == pytest.approx(sum(kl) / (2 * 64), rel=1e-12)
