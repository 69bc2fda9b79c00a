"""Latency tables: the roofline by hand and in shape, the measured stub, and the table through JSON and the DB."""

import json

import numpy as np
import pytest

from bitplan.db import session as db_session
from bitplan.db.store import Store
from bitplan.db.types import InvalidInput, Module, Profile, parse_options
from bitplan.planner.synthetic import synthetic_profile
from bitplan.profiler import latency
from bitplan.profiler.latency import GPUS, LAUNCH_OVERHEAD_S, gpu, roofline_latency, with_latency

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 576), (8192, 8192)]


def profile_with_latency(**kw) -> Profile:
    p = synthetic_profile(n_layers=2, **kw)
    return with_latency(p, roofline_latency(p.modules, p.options, [1, 16, 256], "H100"))


def test_roofline_equals_a_hand_computation():
    """down_proj of SmolLM2, [576, 1536], 4 bits g64 asymmetric, H100, batches 1 and 4096."""
    # 576·1536·4 code bits + 576 rows · 24 groups · (16-bit scale + 4-bit zero) = 3,815,424 bits = 476,928 B
    weights = 476_928
    batch1 = (weights + 2 * 1 * (1536 + 576)) / 3.35e12  # memory-bound: 1.44e-7 s against 1.8e-9 s of math
    batch4096 = 2 * 4096 * 576 * 1536 / 989.4e12  # compute-bound: 7.3e-6 s against 5.3e-6 s of memory
    assert (weights + 2 * 4096 * (1536 + 576)) / 3.35e12 < batch4096
    t = roofline_latency([Module(name="d", shape=(576, 1536))], parse_options("4"), [1, 4096], "H100").latency
    assert t.shape == (1, 1, 2)
    assert t[0, 0, 0] == pytest.approx(batch1 + 4.5e-6, rel=1e-12)
    assert t[0, 0, 1] == pytest.approx(batch4096 + 4.5e-6, rel=1e-12)
    assert LAUNCH_OVERHEAD_S == 4.5e-6


@pytest.mark.parametrize("name", list(GPUS))
def test_roofline_grows_with_bits_and_batch(name):
    options = parse_options("2,3,4,5,6,8,16")
    modules = [Module(name=f"m{i}", shape=s) for i, s in enumerate(SHAPES)]
    table = roofline_latency(modules, options, [1, 4, 16, 64, 256, 1024, 4096], name)
    t = table.latency
    assert t.shape == (len(SHAPES), 7, 7) and table.source == f"roofline:{name}"
    assert np.all(np.diff(t, axis=1) >= 0), "more bits, never faster"
    assert np.all(np.diff(t[:, :, 0], axis=1) > 0), "at batch 1 every bit costs time"
    assert np.all(np.diff(t, axis=2) > 0), "more rows, more time"
    assert np.all(t > LAUNCH_OVERHEAD_S)


def test_roofline_is_per_shape():
    """Modules of one shape share one row; the order of the modules does not matter."""
    modules = [Module(name=f"m{i}", shape=SHAPES[i % 3]) for i in range(9)]
    options = parse_options("2,4,8")
    t = roofline_latency(modules, options, [1, 16], "A100").latency
    for i in range(9):
        assert np.array_equal(t[i], t[i % 3])
    back = roofline_latency(modules[::-1], options, [1, 16], "A100").latency
    assert np.array_equal(back, t[::-1])


def test_gpu_names():
    assert gpu("h100-sxm") is GPUS["H100"] and gpu("RTX 4090") is GPUS["RTX4090"] and gpu("a100 80gb") is GPUS["A100"]
    with pytest.raises(InvalidInput, match="H100, H200, A100, L40S, RTX4090"):
        gpu("B200")
    with pytest.raises(InvalidInput, match="roofline:GPU"):
        latency.parse_spec("guess")
    with pytest.raises(InvalidInput, match="1,16,256"):
        latency.parse_batches("1,zero")


def test_measured_without_a_gpu_says_what_to_use_instead(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = synthetic_profile(n_layers=1)
    with pytest.raises(InvalidInput, match="roofline:GPU"):
        latency.latency_table("measured", p.modules, p.options, [1])


def test_measured_uses_its_cache_per_gpu(monkeypatch, tmp_path):
    """Cached times are read back, not re-measured: only the missing (shape, option, batch) cases are timed."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    p = synthetic_profile(n_layers=2)
    timed = []

    def fake(out, inp, option, batch):
        timed.append((out, inp, option.label, batch))
        return float(out * option.bits + batch)  # microseconds

    monkeypatch.setattr(latency, "_time_linear", fake)
    cache = tmp_path / "lat.json"
    t = latency.measured_latency(p.modules, p.options, [1, 16], cache=cache, progress=False)
    shapes = {m.shape for m in p.modules}
    assert len(timed) == len(shapes) * len(p.options) * 2 and t.source == "measured:Test GPU"
    for i, m in enumerate(p.modules):
        for j, o in enumerate(p.options):
            assert t.latency[i, j, 1] == pytest.approx((m.shape[0] * o.bits + 16) * 1e-6)
    timed.clear()
    again = latency.measured_latency(p.modules, p.options, [1, 16, 256], cache=cache, progress=False)
    assert len(timed) == len(shapes) * len(p.options) and {b for *_, b in timed} == {256}
    np.testing.assert_array_equal(again.latency[:, :, :2], t.latency)


def test_with_latency_gets_its_own_id_and_validates():
    base = synthetic_profile(n_layers=2)
    p = profile_with_latency()
    assert p.id != base.id and p.id.startswith("prof-") and p.latency.shape == (len(p.modules), 4, 3)
    assert p.latency_batches == [1, 16, 256] and p.latency_source == "roofline:H100"
    assert p != base and profile_with_latency().id == p.id
    fields = {k: getattr(p, k) for k in Profile.model_fields}
    for bad, match in ((dict(latency_batches=[16, 1, 256]), "increasing"),
                       (dict(latency=p.latency[:, :, :2]), "shape"),
                       (dict(latency_source=""), "latency_source"),
                       (dict(latency=-p.latency), "> 0")):
        with pytest.raises(ValueError, match=match):
            Profile(**{**fields, **bad})


def test_profile_with_latency_round_trips_through_json():
    p = profile_with_latency()
    d = json.loads(json.dumps(p.to_dict()))
    assert d["format"] == "bitplan.profile/2" and d["latency_batches"] == [1, 16, 256]
    assert np.array_equal(np.array(d["modules"][0]["latency"]), p.latency[0])
    back = Profile.from_dict(d)
    assert back == p and np.array_equal(back.latency, p.latency)
    # a file without latency reads as a profile without a table
    old = synthetic_profile(n_layers=2).to_dict()
    assert "latency_source" not in old and "latency" not in old["modules"][0]
    assert Profile.from_dict(old).latency is None
    # half a table is a malformed file, not a silent drop
    del d["modules"][1]["latency"]
    with pytest.raises(InvalidInput, match="malformed profile"):
        Profile.from_dict(d)


def test_profile_with_latency_round_trips_through_the_db(tmp_path):
    p = profile_with_latency()
    path = str(tmp_path / "l.db")
    with Store(path) as s:
        s.save_profile(p)
        s.save_profile(synthetic_profile(n_layers=2))
    with Store(path) as s:
        got = s.get_profile(p.id)
        assert got == p and got.latency.dtype == np.float64 and got.latency.flags.writeable
        assert s.get_profile(synthetic_profile(n_layers=2).id).latency is None


def test_stored_profiles_survive_the_latency_migration(tmp_path):
    """Down to 0001 (no latency columns) and back: a stored profile without latency is unchanged."""
    from alembic import command

    path = str(tmp_path / "m.db")
    p = synthetic_profile(n_layers=2)
    with Store(path) as s:
        s.save_profile(p)
        cfg = db_session.alembic_config()
        with s.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0001")
    with Store(path) as s:  # opening migrates to head again
        assert s.get_profile(p.id) == p
        s.save_profile(profile_with_latency())
