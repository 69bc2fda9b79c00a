import numpy as np
import pytest
import torch

from bitplan.db.types import InvalidInput, NotACausalLM, Quantizer, parse_options
from bitplan.profiler.model import check_causal_lm, fixed_bits, load_model, planned_linears
from bitplan.profiler.profile import profile_model
from bitplan.profiler.stream import stream_blocks


def test_streamed_hessians_equal_a_whole_model_pass(loaded):
    """Block-by-block forward gives every linear exactly the inputs of an ordinary forward pass."""
    model = loaded.model
    planned = planned_linears(model)
    batches = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    want = {m.name: torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64) for m, lin in planned}

    def accumulate(H):
        def hook(mod, args, out):  # returns None: a hook's return value would replace the output
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            H.addmm_(x.T, x)
        return hook

    hooks = [lin.register_forward_hook(accumulate(want[m.name])) for m, lin in planned]
    with torch.no_grad():
        for row in batches:
            model(row.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    got, seen_blocks = {}, []

    def on_block(i, mods, H, n):
        seen_blocks.append(i)
        assert n == batches.numel()
        got.update(H)

    stream_blocks(model, batches, planned, on_block, progress=False)
    assert seen_blocks == list(range(model.config.num_hidden_layers))
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["hessian", "fisher"])
def test_profile_tables(loaded, text_file, estimator):
    options = parse_options("2,3,4,8")
    p = profile_model(loaded, options, estimator=estimator, calib=str(text_file), n_tokens=256,
                      quantizer=Quantizer(), seq_len=64, progress=False)
    planned = planned_linears(loaded.model)
    assert [m.name for m in p.modules] == [m.name for m, _ in planned] and len(p.modules) == 14
    assert p.error.shape == p.size_bits.shape == (14, 4)
    for i, m in enumerate(p.modules):
        assert list(p.size_bits[i]) == [o.size_bits(*m.shape) for o in options]
    # more bits, less error, for every module
    assert np.all(np.diff(p.error, axis=1) < 0)
    assert np.all(p.error[:, 0] > 0)
    assert p.fixed_bits == fixed_bits(loaded.model, planned) > 0
    assert p.calibration.n_tokens == 256 and p.estimator == estimator
    again = profile_model(loaded, options, estimator=estimator, calib=str(text_file), n_tokens=256,
                          quantizer=Quantizer(), seq_len=64, progress=False)
    assert again.id == p.id and np.allclose(again.error, p.error)


def test_fixed_bits_counts_tied_embedding_once(loaded):
    model = loaded.model
    planned = planned_linears(model)
    emb = model.get_input_embeddings().weight.numel()
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert fixed_bits(model, planned) == (emb + norms) * 16
    assert all(m.role != "lm_head" for m, _ in planned)  # tied: stored with the embeddings, not planned


def test_bad_sources_fail_before_loading(tmp_path):
    with pytest.raises(InvalidInput, match="no such checkpoint"):
        check_causal_lm(str(tmp_path / "missing"))
    with pytest.raises(NotACausalLM, match="no config.json"):
        check_causal_lm(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "vit", "hidden_size": 8}')
    with pytest.raises(NotACausalLM, match="not a causal language model"):
        check_causal_lm(str(tmp_path))


def test_too_few_tokens_is_a_clear_error(loaded, text_file):
    with pytest.raises(InvalidInput, match="at least 64"):
        profile_model(loaded, parse_options("4"), calib=str(text_file), n_tokens=10, seq_len=64, progress=False)


def test_fingerprint_ignores_where_the_model_was_loaded_from(tiny_checkpoint, tmp_path):
    import shutil
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_checkpoint, copy)
    assert load_model(str(copy)).ref.fingerprint == load_model(str(tiny_checkpoint)).ref.fingerprint


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_error_table_on_cuda_quantizes_on_the_gpu(loaded, monkeypatch, method):
    """The streamed pass puts each block back on the host before its error table: the table still quantizes
    and measures every matrix on the GPU (it ran on the CPU once, most of a large model's profile), and
    matches the CPU table."""
    from bitplan.profiler import profile as prof

    model, planned = loaded.model, planned_linears(loaded.model)
    batches = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    options, quantizer = parse_options("2,4"), Quantizer(method=method)
    cpu = prof.error_table(model, planned, options, batches, "hessian", quantizer, progress=False)
    devices = []
    real = prof.quantize_dequantize

    def recording(W, *args, **kwargs):
        devices.append(W.device.type)
        return real(W, *args, **kwargs)

    monkeypatch.setattr(prof, "quantize_dequantize", recording)
    cuda = prof.error_table(model, planned, options, batches, "hessian", quantizer, device="cuda", progress=False)
    assert devices.count("cuda") == len(planned) * len(options) and "cpu" not in devices
    np.testing.assert_allclose(cuda, cpu, rtol=2e-3, atol=1e-9)
