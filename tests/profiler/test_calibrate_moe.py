"""The calibrated estimator on MoE models: an expert that (almost) no token of the KL sample reaches gets
its siblings' scale on its own cheap row, never a measured 0, and the profile names it."""

import numpy as np
import pytest
import torch

from bitplan.db.store import Store
from bitplan.db.types import Module, Profile, Quantizer, parse_options
from bitplan.planner.app.cli import format_profile
from bitplan.profiler.calibrate import MIN_KL_TOKENS, rescale
from bitplan.profiler.calibration import token_batches
from bitplan.profiler.model import load_model
from bitplan.profiler.moe import record_routing
from bitplan.profiler.profile import profile_model

KL_TOKENS = 128  # the KL sample of these tests (DEFAULT_KL_TOKENS in use): 4 x fewer forward passes


def _experts(layer: int, n: int, role: str = "down_proj") -> list[Module]:
    return [Module(name=f"model.layers.{layer}.mlp.experts.{e}.{role}", shape=(64, 32), layer=layer, role=role,
                   expert=e) for e in range(n)]


def test_rescale_gives_a_thinly_routed_expert_its_siblings_alpha():
    dense = Module(name="model.layers.0.self_attn.q_proj", shape=(64, 64), layer=0, role="q_proj")
    modules = [dense, *_experts(0, 4)]
    cheap = np.array([[4.0, 2.0, 1.0, 0.0]] * 5)
    cheap[4] = [0.4, 0.2, 0.1, 0.0]  # the rare expert: little cheap error (few tokens pay for it), not none
    measured = np.array([[8.0, 4.0], [12.0, 6.0], [20.0, 10.0], [28.0, 14.0], [0.0, 0.0]])
    routed = [512, 300, 200, 100, 0]
    out, alpha = res = rescale(cheap, measured, [0, 1], modules=modules, routed=routed)
    np.testing.assert_allclose(alpha[:4], [2.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(out[:4, :2], measured[:4])  # well measured: kept
    assert alpha[4] == pytest.approx(5.0)  # the median of its three sibling experts, not of the dense module
    np.testing.assert_allclose(out[4], 5.0 * cheap[4])  # the whole row, measured points included
    assert np.all(out[4, :3] > 0) and out[4, 3] == 0.0  # 16 bits stay free
    assert set(res.estimated) == {4} and "0 routed tokens" in res.estimated[4]
    assert "layer 0's down_proj" in res.estimated[4]


def test_rescale_distrusts_a_nonzero_measurement_on_few_tokens():
    modules = _experts(1, 4)
    cheap = np.ones((4, 3))
    measured = np.array([[2.0, 2.0], [2.0, 2.0], [2.0, 2.0], [900.0, 900.0]])  # one token's outlier
    out, alpha = res = rescale(cheap, measured, [0, 1], modules=modules,
                               routed=[100, 100, 100, MIN_KL_TOKENS - 1])
    np.testing.assert_allclose(out[3], 2.0)
    assert list(res.estimated) == [3]
    # at the threshold it is the expert's own measurement
    out, _ = res = rescale(cheap, measured, [0, 1], modules=modules, routed=[100, 100, 100, MIN_KL_TOKENS])
    np.testing.assert_allclose(out[3, :2], 900.0)
    assert not res.estimated


def test_rescale_falls_back_to_the_role_then_to_every_module():
    modules = [*_experts(0, 2), *_experts(1, 2)]
    cheap = np.ones((4, 3))
    measured = np.array([[3.0, 3.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    out, alpha = res = rescale(cheap, measured, [0, 1], modules=modules, routed=[100, 0, 0, 0])
    np.testing.assert_allclose(alpha, 3.0)  # layer 1 has no well-measured expert: layer 0's down_proj
    assert "down_proj modules" in res.estimated[2]
    out, alpha = rescale(np.ones((2, 3)), np.zeros((2, 2)), [0, 1], modules=_experts(0, 2), routed=[0, 0])
    np.testing.assert_allclose(out, 1.0)  # nothing measured well anywhere: the cheap table as it is


def test_rescale_never_keeps_a_measured_zero_where_the_cheap_error_is_positive():
    cheap = np.array([[4.0, 2.0, 1.0], [2.0, 1.0, 0.5], [1.0, 1.0, 1.0]])
    measured = np.array([[8.0, 4.0], [0.0, 3.0], [0.0, 0.0]])
    out, alpha = res = rescale(cheap, measured, [0, 1])  # no routing known: every row trusted
    assert out[1, 0] == pytest.approx(alpha[1] * 2.0) and alpha[1] == pytest.approx(3.0)
    assert out[1, 1] == 3.0
    np.testing.assert_allclose(out[2], np.median(alpha[:2]))
    assert np.all(out > 0) and set(res.estimated) == {1, 2}


def test_estimated_round_trips_through_file_and_store(tmp_path):
    modules = _experts(0, 2)
    opts = parse_options("2,4")
    base = dict(model={"name": "m"}, estimator="calibrated", options=opts, modules=modules,
                error=np.ones((2, 2)), size_bits=np.ones((2, 2), dtype=np.int64))
    plain = Profile(id="prof-plain", **base)
    assert "estimated" not in plain.to_dict() and Profile.from_dict(plain.to_dict()).estimated == {}
    why = {modules[1].name: "0 routed tokens behind its measured KL"}
    p = Profile(id="prof-est", estimated=why, **base)
    assert Profile.from_json(__import__("json").dumps(p.to_dict())) == p
    with Store(str(tmp_path / "b.db")) as store:
        store.save_profile(p)
        store.save_profile(plain)
        assert store.get_profile("prof-est").estimated == why
        assert store.get_profile("prof-plain").estimated == {}
    assert modules[1].name in format_profile(p) and "estimated" not in format_profile(plain)
    with pytest.raises(ValueError, match="does not have"):
        Profile(estimated={"nope": "x"}, **base)


@pytest.fixture(scope="module")
def starved_text(tmp_path_factory, text_file):
    """A KL sample (the text's first KL_TOKENS) of one repeated token: every position of it has the same
    hidden state in every layer, so each layer routes all of it to the same top-2 experts and the others
    get none there; ordinary text after it reaches every expert in the cheap estimator's sample.
    (It also makes q and k irrelevant there, attention averaging equal values: some dense modules measure
    a KL of exactly 0 too.)"""
    p = tmp_path_factory.mktemp("starved") / "calib.txt"
    p.write_text("a" * KL_TOKENS + "\n" + text_file.read_text())
    return p


def test_calibrated_moe_profile_has_no_free_quantized_option(moe_checkpoint, starved_text, monkeypatch):
    monkeypatch.setattr("bitplan.profiler.profile.DEFAULT_KL_TOKENS", KL_TOKENS)
    loaded = load_model(str(moe_checkpoint("qwen2_moe")))
    opts = parse_options("2,3,4,16")
    n, seq = 4 * KL_TOKENS, 64
    # RTN for speed: the KL sample, and what it routes where, are the same with GPTQ
    prof = profile_model(loaded, opts, estimator="calibrated", quantizer=Quantizer(), calib=str(starved_text),
                         n_tokens=n, seq_len=seq, progress=False)
    batches, _ = token_batches(loaded.tokenizer, str(starved_text), n, seq)
    with torch.no_grad(), record_routing(loaded.model) as rec:
        for row in batches[:KL_TOKENS // seq]:
            loaded.model(row[None], use_cache=False)
    starved = {m.name for m in prof.modules if m.expert is not None
               and rec[m.name.rsplit(".", 2)[0]].tokens[m.expert] < MIN_KL_TOKENS}
    assert starved  # the text does starve some experts in the KL sample ...
    assert all(m.tokens_routed > 0 and not m.fallback for m in prof.modules if m.name in starved)  # ... only there
    quantized = [j for j, o in enumerate(opts) if o.quantized]
    assert np.all(prof.error[:, quantized] > 0), [m.name for m, row in zip(prof.modules, prof.error[:, quantized])
                                                   if np.any(row == 0)]
    assert starved <= set(prof.estimated)
    assert all("routed tokens" in prof.estimated[name] for name in starved)
    # a dense module sees every token: estimated only where it measured 0 (the repeated token's q and k)
    assert all(prof.estimated[m.name].startswith("measured KL 0") for m in prof.modules
               if m.expert is None and m.name in prof.estimated)


def test_expert_sample_takes_k_experts_per_layer_and_role_by_routed_tokens():
    """Every dense module; per layer and role, K experts at evenly spaced ranks of routed tokens, busiest
    first, none under the trust threshold where enough are above it."""
    from bitplan.profiler.calibrate import expert_sample

    dense = Module(name="model.layers.0.self_attn.q_proj", shape=(64, 64), layer=0, role="q_proj")
    modules = [dense, *_experts(0, 8), *_experts(0, 8, "up_proj"), *_experts(1, 8)]
    tokens = {"model.layers.0.mlp.experts": np.array([90, 10, 80, 3, 70, 60, 50, 40]),
              "model.layers.1.mlp.experts": np.array([0, 0, 0, 0, 0, 0, 9, 20])}
    picked = [modules[i] for i in expert_sample(modules, tokens, 3)]
    assert picked[0] is dense
    layer0 = [(m.role, m.expert) for m in picked if m.layer == 0 and m.expert is not None]
    # ranks by tokens, trusted only (>= 8): 0 (90), 2, 4, 5, 6, 7, 1 (10): evenly spaced picks 0, 3, 6
    assert sorted(layer0) == sorted([(r, e) for r in ("down_proj", "up_proj") for e in (0, 5, 1)])
    assert sorted(m.expert for m in picked if m.layer == 1) == [6, 7]  # only two are trusted
    assert len(expert_sample(modules, tokens, 100)) == 1 + 2 * 7 + 2  # every trusted one
    with pytest.raises(ValueError):
        expert_sample(modules, tokens, 0)


def test_rescale_gives_unmeasured_experts_the_measured_ones_alpha():
    modules = _experts(0, 4)
    cheap = np.array([[4.0, 2.0, 1.0]] * 4)
    measured = np.array([[8.0, 4.0], [12.0, 6.0], [999.0, 999.0], [0.0, 0.0]])  # rows 2, 3: not measured
    out, alpha = res = rescale(cheap, measured, [0, 1], modules=modules, routed=[100, 100, 100, 100],
                               unmeasured=[False, False, True, True])
    np.testing.assert_allclose(alpha, [2.0, 3.0, 2.5, 2.5])
    np.testing.assert_allclose(out[2:], 2.5 * cheap[2:])  # their rows of `measured` are ignored
    assert sorted(res.estimated) == [2, 3] and all("not in the sample" in w for w in res.estimated.values())


def test_calibrate_with_a_sample_measures_only_the_sample(moe_checkpoint, text_file, monkeypatch):
    """With experts=K: the sampled modules' rows equal the full calibration's, the others are estimated,
    and the KL passes drop to points x (dense + K x roles) per layer."""
    from bitplan.profiler import calibrate as cal
    from bitplan.profiler.model import planned_linears
    from bitplan.profiler.profile import routing_stats

    loaded = load_model(str(moe_checkpoint("qwen2_moe")))
    planned = planned_linears(loaded.model)
    opts = parse_options("2,3,4")
    batches, _ = token_batches(loaded.tokenizer, str(text_file), KL_TOKENS, 64)
    rng = np.random.default_rng(0)
    cheap = np.sort(rng.uniform(0.1, 1.0, (len(planned), 3)), axis=1)[:, ::-1].copy()
    tokens = {k: np.asarray(r.tokens) for k, r in routing_stats(loaded.model, batches).items()}
    passes = []
    real = cal.kl_table
    monkeypatch.setattr(cal, "kl_table", lambda model, mods, *a, **kw: passes.append(len(mods)) or real(model, mods, *a, **kw))
    full = cal.calibrate(loaded.model, planned, opts, cheap, batches, progress=False)
    some = cal.calibrate(loaded.model, planned, opts, cheap, batches, progress=False, experts=1, routed_tokens=tokens)
    sample = cal.expert_sample([m for m, _ in planned], tokens, 1)
    assert passes == [len(planned), len(sample)] and len(sample) < len(planned)
    np.testing.assert_allclose(some.error[sample], full.error[sample])
    skipped = sorted(set(range(len(planned))) - set(sample))
    assert skipped and all(planned[i][0].expert is not None for i in skipped)
    assert all("not in the sample" in some.estimated[i] for i in skipped)
    assert np.all(some.error[skipped] > 0)

