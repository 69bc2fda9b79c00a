"""Weights streamed from disk (issue 21, item 1): a model built without weights, each block read from the
safetensors shards when the pass reaches it, profiles to the same profile as the model loaded whole."""

import numpy as np
import pytest
import torch

from bitplan.db.types import InvalidInput, Quantizer, parse_options
from bitplan.profiler import weights as weights_mod
from bitplan.profiler.model import decoder_layers, load_model
from bitplan.profiler.profile import profile_model

OPTIONS = parse_options("2,4,8")


def _sharded(tmp_path_factory, tokenizer_from, tie: bool, dtype=torch.bfloat16):
    """A 3-layer random Llama saved as bf16 safetensors in shards of at most 40 kB (an index and several
    files, a block's tensors spread over more than one)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("sharded")
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    LlamaForCausalLM(cfg).to(dtype).eval().save_pretrained(d, max_shard_size="40KB")
    tok.save_pretrained(d)
    assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("*.safetensors"))) > 2
    return d


@pytest.fixture(scope="module", params=["tied", "untied"])
def sharded(request, tmp_path_factory, tiny_checkpoint):
    return _sharded(tmp_path_factory, tiny_checkpoint, tie=request.param == "tied")


def test_the_skeleton_holds_no_weights_and_fingerprints_as_the_whole_model(sharded):
    whole = load_model(str(sharded))
    lazy = load_model(str(sharded), stream_weights="on")
    assert all(p.is_meta for p in lazy.model.parameters())
    assert lazy.ref == whole.ref  # the same fingerprint: the same profile ids
    w = weights_mod.streamed(lazy.model)
    block = decoder_layers(lazy.model)[1]
    with weights_mod.materialized(lazy.model, [block]):
        real = dict(block.named_parameters())
        assert not any(p.is_meta for p in real.values())
        want = dict(decoder_layers(whole.model)[1].named_parameters())
        assert all(torch.equal(real[k], want[k]) for k in want)
        assert w.nbytes([block]) == 0  # nothing left to read
    assert all(p.is_meta for p in block.parameters())  # released


@pytest.mark.parametrize("quantizer,embeddings", [("rtn", "plan"), ("gptq", "keep")])
def test_a_streamed_profile_is_bit_identical_to_the_in_memory_one(sharded, text_file, quantizer, embeddings):
    kw = dict(estimator="hessian", quantizer=Quantizer.parse(quantizer), calib=str(text_file), n_tokens=128,
              seq_len=32, progress=False, embeddings=embeddings)
    want = profile_model(load_model(str(sharded)), OPTIONS, **kw)
    got = profile_model(load_model(str(sharded), stream_weights="on"), OPTIONS, **kw)
    assert got.id == want.id
    assert [m.name for m in got.modules] == [m.name for m in want.modules]
    assert np.array_equal(got.error, want.error) and np.array_equal(got.size_bits, want.size_bits)
    assert got.fixed_bits == want.fixed_bits


def test_estimators_that_need_every_weight_say_which_stream(sharded, text_file):
    lazy = load_model(str(sharded), stream_weights="on")
    with pytest.raises(InvalidInput, match="--estimator hessian") as e:
        profile_model(lazy, OPTIONS, estimator="fisher", calib=str(text_file), n_tokens=64, seq_len=32,
                      progress=False)
    assert "\n" not in str(e.value)


def test_auto_streams_only_what_does_not_fit(sharded, monkeypatch, caplog):
    from bitplan.profiler import stream

    assert not any(p.is_meta for p in load_model(str(sharded), stream_weights="auto").model.parameters())
    monkeypatch.setattr(stream, "available_ram", lambda: 1 << 10)  # 1 KiB free: nothing fits
    with caplog.at_level("INFO"):
        lazy = load_model(str(sharded), stream_weights="auto")
    assert all(p.is_meta for p in lazy.model.parameters())
    assert "streaming weights from" in caplog.text


def test_bad_requests_are_one_line(sharded, tmp_path):
    with pytest.raises(InvalidInput, match="choose one of"):
        load_model(str(sharded), stream_weights="maybe")
    # a checkpoint whose names are not the model's
    import shutil
    from safetensors.torch import load_file, save_file

    d = tmp_path / "renamed"
    shutil.copytree(sharded, d)
    (d / "model.safetensors.index.json").unlink()
    for f in d.glob("*.safetensors"):
        save_file({"x." + k: v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    with pytest.raises(InvalidInput, match="not in its shards") as e:
        load_model(str(d), stream_weights="on")
    assert "\n" not in str(e.value)


def test_bitplan_profile_streams_on_request_and_says_so_in_help(sharded, text_file, tmp_path, capsys):
    from bitplan.db.store import Store
    from bitplan.planner.app.cli import parser
    from bitplan.planner.app.usecases import ProfileRequest, run_profile
    from bitplan.planner.app.workspace import Workspace

    with pytest.raises(SystemExit):
        parser().parse_args(["profile", "--help"])
    assert "--stream-weights" in capsys.readouterr().out
    ws = Workspace(Store(str(tmp_path / "db.sqlite")), progress=False)
    kw = dict(estimator="hessian", quantizer="rtn", calib=str(text_file), tokens=64, seq_len=32, options="4")
    streamed_profile = run_profile(ws, str(sharded), ProfileRequest(stream_weights="on", **kw))
    whole = run_profile(ws, str(sharded), ProfileRequest(stream_weights="off", **kw), force=True)
    assert whole.id == streamed_profile.id and np.array_equal(whole.error, streamed_profile.error)
    with pytest.raises(InvalidInput, match="--estimator hessian"):
        run_profile(ws, str(sharded), ProfileRequest(stream_weights="on", estimator="fisher", calib=str(text_file),
                                                     tokens=64, seq_len=32, options="4"))
