"""`GPTQCache`: a profile's GPTQ results reused by the applies of its plans, with identical checkpoints."""

import functools

import pytest
import torch
from safetensors.torch import load_file

from bitplan.db.types import Option, Quantizer
from bitplan.kernels import quantize
from bitplan.kernels.quantize import GPTQCache
from bitplan.planner.app.usecases import ProfileRequest, run_apply, run_plan, run_profile
from bitplan.planner.app.workspace import Workspace
from bitplan.planner.request import PlanRequest
from bitplan.profiler import profile as prof


def counting(monkeypatch) -> list:
    calls = []
    real = quantize.gptq

    @functools.wraps(real)
    def gptq(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(quantize, "gptq", gptq)
    return calls


def tensors(folder):
    return load_file(str(folder / "model.safetensors"))


def test_applies_reuse_the_profile_s_gptq_and_write_the_same_checkpoint(store, tiny_checkpoint, text_file,
                                                                         tmp_path, monkeypatch):
    request = ProfileRequest(estimator="fisher", quantizer="gptq", calib=str(text_file), tokens=256, seq_len=64)
    ws = Workspace(store, progress=False, keep_gptq=True)
    calls = counting(monkeypatch)
    profile = run_profile(ws, str(tiny_checkpoint), request)
    cache = ws.gptq_cache(profile.id)
    assert len(calls) == 14 * 4 and cache.profile_id == profile.id  # every module at every option, once
    plans = [run_plan(ws, profile, PlanRequest(budget=b)) for b in ("3bpw", "4bpw")]
    for plan in plans:
        run_apply(ws, plan, tmp_path / f"cached-{plan.id}", gptq_inputs="original")
    assert len(calls) == 14 * 4 and cache.hessians is None  # no GPTQ, no H collected again
    uncached = Workspace(store, progress=False)
    for plan in plans:  # without the cache: H collected again, GPTQ run again, the same bytes
        run_apply(uncached, plan, tmp_path / f"fresh-{plan.id}", gptq_inputs="original")
        cached, fresh = tensors(tmp_path / f"cached-{plan.id}"), tensors(tmp_path / f"fresh-{plan.id}")
        assert cached.keys() == fresh.keys()
        for key in cached:
            torch.testing.assert_close(cached[key], fresh[key], rtol=0, atol=0)
    # the planned embedding (`--embeddings plan`, the default) is quantized with RTN: no GPTQ call
    assert len(calls) == 14 * 4 + sum(o.quantized for p in plans for n, o in p.assignment.items()
                                      if n != "model.embed_tokens")


def test_a_reused_profile_collects_h_once_for_all_its_plans(store, tiny_checkpoint, text_file, tmp_path,
                                                            monkeypatch):
    request = ProfileRequest(estimator="fisher", quantizer="gptq", calib=str(text_file), tokens=256, seq_len=64)
    profile = run_profile(Workspace(store, progress=False), str(tiny_checkpoint), request)  # stored
    ws = Workspace(store, progress=False, keep_gptq=True)
    assert run_profile(ws, str(tiny_checkpoint), request).id == profile.id  # reused
    cache = ws.gptq_cache(profile.id)
    collected = []
    real = prof.gptq_hessians

    def gptq_hessians(*args, **kwargs):
        collected.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(prof, "gptq_hessians", gptq_hessians)
    for b in ("3bpw", "3.5bpw", "4bpw"):
        run_apply(ws, run_plan(ws, profile, PlanRequest(budget=b)), tmp_path / b, gptq_inputs="original")
    assert len(collected) == 1 and cache.hessians is not None


def test_a_cache_serves_one_profile_and_keys_by_settings():
    cache = GPTQCache().claim("prof-a")
    with pytest.raises(ValueError, match="holds results of profile prof-a"):
        cache.claim("prof-b")
    W, H = torch.randn(8, 64), torch.eye(64) + 0.1
    opt, gptq, paper = Option(bits=3), Quantizer(method="gptq"), Quantizer.parse("gptq:damp=0.01,act_order=false")
    first = quantize.quantize(W, opt, gptq, H, cache=cache, name="m")
    assert cache.has("m", opt, gptq) and cache.has("m", opt, Quantizer.parse("gptq:damp=0.1"))
    assert not cache.has("m", opt, paper) and not cache.has("m", Option(bits=4), gptq)
    assert not cache.has("m", opt, Quantizer())  # RTN is never cached
    again = quantize.quantize(W, opt, gptq, None, cache=cache, name="m")  # a hit needs no H
    assert torch.equal(again.q, first.q) and torch.equal(again.scales, first.scales)
    with pytest.raises(ValueError, match="needs the input statistics H of m"):
        quantize.quantize(W, opt, paper, None, cache=cache, name="m")
    other = quantize.quantize(W, opt, paper, H, cache=cache, name="m")
    assert cache.has("m", opt, paper) and torch.equal(other.q, quantize.gptq(W, H, opt, damp=0.01, act_order=False).q)
    full = GPTQCache(max_bytes=0)
    quantize.quantize(W, opt, gptq, H, cache=full, name="m")
    assert not full.has("m", opt, gptq) and full.bytes == 0  # past max_bytes: computed, not kept


def test_calibrated_measures_its_kl_points_on_the_fisher_table_s_gptq(store, tiny_checkpoint, text_file,
                                                                      monkeypatch):
    request = ProfileRequest(estimator="calibrated", quantizer="gptq", calib=str(text_file), tokens=256, seq_len=64)
    plain = run_profile(Workspace(store, progress=False), str(tiny_checkpoint), request)
    calls = counting(monkeypatch)
    cached = run_profile(Workspace(store, progress=False, keep_gptq=True), str(tiny_checkpoint), request, force=True)
    assert len(calls) == 14 * 4  # the KL points at 2 and 3 bits quantize nothing again
    assert cached.id == plain.id
    torch.testing.assert_close(torch.tensor(cached.error), torch.tensor(plain.error), rtol=1e-6, atol=0)
