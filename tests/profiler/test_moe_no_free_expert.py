"""Issue 18: no routed expert matrix of any MoE profile has a predicted error of zero below 16 bits.

A tiny random Mixtral (tests/conftest.py's `make_moe`, from a transformers config) whose layer 1 routes
no token to expert 2, profiled with every estimator that reads a calibration text and either quantizer,
the default (`calibrated` with GPTQ) included: every routed expert matrix, the starved one too, has a
positive error at every quantized option, decreasing with the bits; only 16 bits are free.
"""

import numpy as np
import pytest
import torch

from bitplan.db.types import ModelRef, Quantizer, parse_options
from bitplan.profiler.model import LoadedModel, load_model
from bitplan.profiler.profile import profile_model

OPTIONS = parse_options("2,3,4,8,16")
LAYER, STARVED = 1, 2


def _starved(checkpoint) -> LoadedModel:
    """Layer LAYER's router (5 experts, top-2) with rows ±v, ±u and a zero row for STARVED: of each pair
    one logit is >= 0, so two of them always beat the zero row and STARVED gets no token."""
    loaded = load_model(str(checkpoint))
    gate = loaded.model.model.layers[LAYER].mlp.gate.weight
    assert gate.shape[0] == 5 and loaded.model.config.num_experts_per_tok == 2
    g = torch.Generator().manual_seed(3)
    v, u = (torch.randn(gate.shape[1], generator=g) for _ in range(2))
    with torch.no_grad():
        for row, w in zip([r for r in range(5) if r != STARVED], (v, -v, u, -u)):
            gate[row] = w
        gate[STARVED] = 0
    return LoadedModel(loaded.model, loaded.tokenizer, ModelRef(name="starved-mixtral"))


@pytest.fixture(scope="module")
def starved(moe_checkpoint):
    return _starved(moe_checkpoint("mixtral"))


@pytest.mark.parametrize("estimator,quantizer", [("calibrated", "gptq"), ("calibrated", "rtn"), ("fisher", "rtn"),
                                                 ("fisher", "gptq"), ("hessian", "gptq")])
def test_no_routed_expert_matrix_is_free_below_16_bits(starved, text_file, estimator, quantizer, monkeypatch):
    monkeypatch.setattr("bitplan.profiler.profile.DEFAULT_KL_TOKENS", 128)  # calibrated's KL sample: quicker
    p = profile_model(starved, OPTIONS, estimator=estimator, quantizer=Quantizer.parse(quantizer),
                      calib=str(text_file), n_tokens=512, seq_len=64, progress=False)
    quantized = [j for j, o in enumerate(p.options) if o.quantized]
    experts = [i for i, m in enumerate(p.modules) if m.expert is not None]
    assert len(experts) == 2 * 5 * 3
    err = p.error[np.ix_(experts, quantized)]
    free = [(p.modules[i].name, row.tolist()) for i, row in zip(experts, err) if np.any(row <= 0)]
    assert not free, free
    # more bits, less error; 16 bits (the fp32 weights rounded to 16-bit floats) least, zero or nearly
    assert np.all(np.diff(p.error[experts], axis=1) < 0)
    # the starved expert's three matrices carry the fallback error and say so; no other does
    fallback = {(m.layer, m.expert) for m in p.modules if m.fallback}
    assert fallback == {(LAYER, STARVED)}
    assert sum(m.fallback for m in p.modules) == 3
