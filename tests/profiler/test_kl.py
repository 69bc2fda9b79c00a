import copy

import numpy as np
import pytest
import torch

from bitplan.db.types import Quantizer, parse_options
from bitplan.kernels.quantize import quantize_dequantize
from bitplan.profiler.kl import kl_table, mean_kl
from bitplan.profiler.model import planned_linears
from bitplan.profiler.profile import profile_model


def batches_for(model, n=2, T=32, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, T), generator=torch.Generator().manual_seed(seed))


def test_mean_kl_chunks_agree_and_vanish_on_equal_inputs():
    g = torch.Generator().manual_seed(0)
    logits, other = torch.randn(50, 300, generator=g), torch.randn(50, 300, generator=g)
    base = torch.log_softmax(logits, -1)
    assert abs(mean_kl(base, logits)[0]) < 1e-4
    a, b = mean_kl(base, other, chunk=7), mean_kl(base, other, chunk=128)
    assert a[1] == b[1] == 50 and a[0] == pytest.approx(b[0], rel=1e-5) and a[0] > 0


def test_kl_table_matches_whole_model_passes(loaded, direct_kl):
    """The replay from cached block inputs gives the KL of an ordinary forward pass, module by module."""
    model = loaded.model
    planned = planned_linears(model)
    options = parse_options("2")
    batches = batches_for(model)
    picks = [0, 6, 7, 13]  # first and last module of each of the 2 blocks
    table = kl_table(model, [planned[i] for i in picks], options, batches, progress=False)
    for row, i in enumerate(picks):
        quantized = copy.deepcopy(model)
        lin = quantized.get_submodule(planned[i][0].name)
        lin.weight.data = quantize_dequantize(lin.weight.data, options[0])
        assert table[row, 0] == pytest.approx(direct_kl(model, quantized, batches), rel=1e-4, abs=1e-7)
    # the model is left as it was
    assert all(torch.equal(lin.weight, loaded.model.get_submodule(m.name).weight) for m, lin in planned)


def test_kl_profile_decreases_with_bits(loaded, text_file):
    """Measured KL: >= 0, falls with bits, next to nothing at 8 bits; GPTQ's below RTN's at 2 bits.

    Random attention layers of the tiny model barely move the output (q/k_proj: KL ~1e-7, near the
    float32 noise floor of ~5e-8), so the per-module orderings are checked where KL is above that floor.
    """
    tables = {}
    for quantizer in ("rtn", "gptq"):
        p = profile_model(loaded, parse_options("2,3,4,8"), estimator="kl", quantizer=Quantizer.parse(quantizer),
                          calib=str(text_file), n_tokens=128, seq_len=64, progress=False)
        assert p.estimator == "kl" and p.quantizer.method == quantizer
        assert p.error.shape == (14, 4) and np.all(p.error >= 0) and np.all(p.error[:, 0] > 0)
        assert p.error[:, 3].sum() < 1e-3 * p.error[:, 0].sum()
        above = p.error[:, 0] > 1e-5
        assert above.sum() >= 8
        assert np.all(np.diff(p.error[above], axis=1) < 0)
        assert np.all(p.error[above, 3] < 0.01 * p.error[above, 0])
        tables[quantizer] = p.error
    assert tables["gptq"][:, 0].sum() < tables["rtn"][:, 0].sum()


def test_kl_untied_head(direct_kl):
    """An untied lm_head is measured too (its module has no layer: all blocks are replayed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    planned = planned_linears(model)
    assert planned[-1][0].role == "lm_head"
    batches = batches_for(model)
    for quantizer in ("rtn", "gptq"):
        table = kl_table(model, planned[-1:], parse_options("2"), batches, quantizer=Quantizer.parse(quantizer),
                         progress=False)
        quantized = copy.deepcopy(model)
        head = quantized.get_output_embeddings()
        if quantizer == "rtn":
            head.weight.data = quantize_dequantize(head.weight.data, parse_options("2")[0])
            assert table[0, 0] == pytest.approx(direct_kl(model, quantized, batches), rel=1e-4)
        assert table[0, 0] > 0


@pytest.mark.gpu
def test_kl_table_gptq_on_cuda_matches_cpu(loaded):
    """GPTQ's H is collected on the CPU while the model runs on the GPU: GPTQ brings it to the weight's
    device (it crashed with a device mismatch once), and the table matches the CPU one."""
    model, planned = loaded.model, planned_linears(loaded.model)
    batches, opts = batches_for(model), parse_options("2")
    gptq = Quantizer(method="gptq")
    cpu = kl_table(model, planned[:2], opts, batches, quantizer=gptq, progress=False)
    cuda = kl_table(model, planned[:2], opts, batches, quantizer=gptq, device="cuda", progress=False)
    np.testing.assert_allclose(cuda, cpu, rtol=1e-3, atol=1e-7)
