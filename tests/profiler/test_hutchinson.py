"""Hutchinson's trace estimate converges to the exact Hessian trace, never goes negative, and plugs into
`profile_model` as the `hutchinson` estimator."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bitplan.db.types import Quantizer, parse_options
from bitplan.kernels.quantize import quantize_dequantize
from bitplan.profiler.hutchinson import FLOOR_FRACTION, clamp, trace_estimates
from bitplan.profiler.model import load_model, planned_linears
from bitplan.profiler.profile import profile_model


def _small_llama():
    """640 planned weights: small enough for the exact Hessian diagonal; a wide init for a curved loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.5)
    return LlamaForCausalLM(cfg).eval()


def _exact_traces(model, batches, planned) -> np.ndarray:
    """tr of each planned weight's Hessian block of the mean per-sequence loss, one unit vector at a time."""
    weights = [lin.weight for _, lin in planned]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    tr = np.zeros(len(weights))
    with sdpa_kernel(SDPBackend.MATH):
        for row in batches:
            ids = row.unsqueeze(0)
            loss = nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            for i, (g, w) in enumerate(zip(grads, weights)):
                eye = torch.eye(w.numel()).reshape(w.numel(), *w.shape)
                H = torch.autograd.grad(g, w, grad_outputs=eye, is_grads_batched=True, retain_graph=True)[0]
                tr[i] += float(H.reshape(w.numel(), -1).diagonal().sum())
    for p in model.parameters():
        p.requires_grad_(False)
    return tr / len(batches)


@pytest.mark.slow  # 40-80 s on the loaded 2-core machine (100 double backwards, plus the exact Hessian)
def test_estimate_converges_to_the_exact_trace():
    model = _small_llama()
    planned = planned_linears(model)
    assert sum(lin.weight.numel() for _, lin in planned) == 640
    batches = torch.randint(0, 32, (1, 10), generator=torch.Generator().manual_seed(1))
    exact = _exact_traces(model, batches, planned)
    # independent runs of 10 probes per sequence: their spread gives the standard error of the grand mean
    runs = np.array([list(trace_estimates(model, batches, planned, progress=False, samples=10, seed=s).values())
                     for s in range(10)])
    mean, stderr = runs.mean(0), runs.std(0, ddof=1) / np.sqrt(len(runs))
    # unbiased, so converging as 1/sqrt(probes): every module's mean within 5 standard errors of its exact
    # trace, and the total too (100 probes are still noisy here: one such run's total was 22 % off)
    assert np.all(np.abs(mean - exact) <= 5 * stderr), (mean, exact, stderr)
    total = runs.sum(1)
    assert abs(total.mean() - exact.sum()) <= 5 * total.std(ddof=1) / np.sqrt(len(runs))


def test_clamp_keeps_every_estimate_positive(caplog):
    t = clamp({"a": -3.0, "b": 0.0, "c": 2.0, "d": 4.0, "e": 1e-9})
    floor = FLOOR_FRACTION * 2.0  # the median of the positive values (2, 4, 1e-9)
    assert t == {"a": floor, "b": floor, "c": 2.0, "d": 4.0, "e": floor}
    assert "3 modules' trace estimate is below the floor" in caplog.text
    assert min(clamp({"a": -1.0, "b": -2.0}).values()) > 0  # no positive value at all: a tiny floor


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_profile_with_hutchinson(kind, tiny_checkpoint, moe_checkpoint, text_file):
    loaded = load_model(str(tiny_checkpoint if kind == "llama" else moe_checkpoint("mixtral")))
    options = parse_options("2,3,4,8")
    p = profile_model(loaded, options, estimator="hutchinson", calib=str(text_file), n_tokens=128,
                      quantizer=Quantizer(), seq_len=64, progress=False)
    planned = planned_linears(loaded.model)
    assert p.estimator == "hutchinson" and [m.name for m in p.modules] == [m.name for m, _ in planned]
    assert np.all(np.isfinite(p.error)) and np.all(p.error > 0)
    assert np.all(np.diff(p.error, axis=1) < 0)
    # error = ½ (tr/numel) ||ΔW||²: one positive factor per module
    m, lin = planned[0]
    W = lin.weight.detach()
    sq = np.array([float(((quantize_dequantize(W, o) - W).double() ** 2).sum()) for o in options])
    ratio = p.error[0] / sq
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)


def test_validate_takes_a_list_of_estimators(db, tiny_checkpoint, text_file, capsys):
    import json

    from bitplan.planner.app.cli import main
    common = ["profile", str(tiny_checkpoint), "--validate", "--validate-layers", "1", "--options", "2,4",
              "--calib", str(text_file), "--tokens", "64", "--seq-len", "32", "--json", "-q"]
    assert main([*common, "--validate-estimators", "hutchinson"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["spearman"]) == {"hutchinson"} and -1 <= r["spearman"]["hutchinson"] <= 1
    assert main([*common, "--validate-estimators", "hessian,nope"]) == 2
    assert "unknown estimator 'nope'" in capsys.readouterr().err
    assert main([*common, "--validate-estimators", "imatrix"]) == 2
    assert "needs --imatrix PATH" in capsys.readouterr().err
