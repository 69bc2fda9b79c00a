"""Store round trips, idempotent saves, lookups by prefix, foreign keys, jobs."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bitplan.db.store import Store, content_profile_id, pack_array, unpack_array
from bitplan.db.tables import PlanRow
from bitplan.db.types import CalibrationRef, InvalidInput, ModelRef, NotFound, Quantizer


def assert_same_profile(a, b):
    assert np.array_equal(a.error, b.error) and a.error.dtype == b.error.dtype == np.float64
    assert np.array_equal(a.size_bits, b.size_bits) and a.size_bits.dtype == b.size_bits.dtype == np.int64
    assert a.model_dump(exclude={"error", "size_bits"}) == b.model_dump(exclude={"error", "size_bits"})


def test_profile_round_trip(store, make_profile):
    p = make_profile()
    assert store.save_profile(p) is p
    got = store.get_profile(p.id)
    assert_same_profile(got, p)
    assert got.modules == p.modules and got.options == p.options
    assert got.model == p.model and got.calibration == p.calibration
    assert got.created_at == p.created_at and got.created_at.tzinfo is not None
    assert got.error.flags.writeable


def test_profile_round_trip_survives_reopen(tmp_path, make_profile):
    p = make_profile(3)
    with Store(str(tmp_path / "x.db")) as s:
        s.save_profile(p)
    with Store(str(tmp_path / "x.db")) as s:
        assert_same_profile(s.get_profile(p.id), p)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "zlib"])
@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.float32], ids=["f64", "i64", "f32"])
def test_pack_array_round_trip(compress, dtype):
    a = (np.random.default_rng(0).standard_normal((7, 3)) * 1e6).astype(dtype)
    b = unpack_array(pack_array(a, compress=compress))
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)


def test_profile_without_id_gets_a_content_id(store, make_profile):
    a = store.save_profile(make_profile(id=""))
    b = store.save_profile(make_profile(id=""))
    assert a.id.startswith("prof-") and a.id == b.id
    assert len(store.list_profiles()) == 1


def test_profile_save_is_idempotent(store, make_profile):
    p = make_profile()
    store.save_profile(p)
    # A second save with the same id changes nothing and returns what is stored.
    again = store.save_profile(make_profile(estimator="fisher"))
    assert again.estimator == "hessian"
    assert len(store.list_profiles()) == 1


def test_profile_quantizer_round_trip(store, make_profile):
    q = Quantizer.parse("gptq:damp=0.05,act_order=false")
    p = store.save_profile(make_profile(quantizer=q))
    got = store.get_profile(p.id)
    assert got.quantizer == q and got.estimator == "hessian"
    assert_same_profile(got, p)
    assert store.get_profile(store.save_profile(make_profile(1)).id).quantizer == Quantizer()


def test_content_id_hashes_the_quantizer(make_profile):
    rtn = content_profile_id(make_profile())
    gptq = content_profile_id(make_profile(quantizer=Quantizer(method="gptq")))
    damp = content_profile_id(make_profile(quantizer=Quantizer.parse("gptq:damp=0.05")))
    assert len({rtn, gptq, damp}) == 3
    assert content_profile_id(make_profile(quantizer=Quantizer.parse("gptq:damp=0.05"))) == damp


def test_profile_upserts_model_and_calibration(store, make_profile):
    p = make_profile()
    store.save_profile(p)
    m = store.get_model(p.model.fingerprint)
    assert (m["name"], m["source"], m["n_params"]) == ("SmolLM2-135M", "/ckpt/smol", 0)
    store.save_model(p.model, n_params=134_515_008, config={"hidden_size": 576})
    store.save_model(ModelRef(name="renamed", fingerprint=p.model.fingerprint), n_params=1)
    m = store.get_model(p.model.fingerprint)
    assert (m["name"], m["n_params"], m["config"]) == ("SmolLM2-135M", 134_515_008, {"hidden_size": 576})
    assert store.save_calibration(CalibrationRef(name="c", fingerprint="fp-cal")) == "fp-cal"


def test_profile_without_fingerprints(store, make_profile):
    p = make_profile(model=ModelRef(name="unknown"), calibration=CalibrationRef())
    assert_same_profile(store.get_profile(store.save_profile(p).id), p)


def test_list_profiles_newest_first_and_by_model(store, make_profile):
    for seed in range(4):
        store.save_profile(make_profile(seed))
    assert [p.id for p in store.list_profiles()] == [make_profile(s).id for s in (3, 2, 1, 0)]
    assert [p.id for p in store.list_profiles("fp-model-1")] == [make_profile(s).id for s in (3, 1)]
    assert store.list_profiles("nope") == []


def test_plan_round_trip_and_idempotent(store, make_profile, make_plan):
    p = store.save_profile(make_profile())
    plan = make_plan(p)
    assert store.save_plan(plan) == plan
    got = store.get_plan(plan.id)
    assert got == plan
    assert got.created_at.utcoffset().total_seconds() == 0
    assert store.save_plan(make_plan(p, allocator="greedy")) == plan
    assert store.list_plans() == [plan] and store.list_plans(p.id) == [plan] and store.list_plans("x") == []


def test_evaluation_round_trip(store, make_profile, make_plan, make_evaluation):
    plan = store.save_plan(make_plan(store.save_profile(make_profile())))
    ev = store.save_evaluation(make_evaluation(plan.id))
    assert ev.id.startswith("eval-") and len(ev.id) == len("eval-") + 16
    assert store.get_evaluation(ev.id) == ev
    assert store.save_evaluation(ev) == ev
    free = store.save_evaluation(make_evaluation(None, corpus="wikitext"))
    assert store.list_evaluations() == sorted([ev, free], key=lambda e: e.created_at, reverse=True)
    assert store.list_evaluations(plan.id) == [ev]


def test_not_found_names_the_way_out(store):
    with pytest.raises(NotFound, match="bitplan ls"):
        store.get_profile("prof-nope")
    with pytest.raises(NotFound, match="bitplan ls"):
        store.get_plan("plan-nope")
    with pytest.raises(NotFound, match="bitplan ls"):
        store.find("zzz")


def test_find_by_prefix(store, make_profile, make_plan, make_evaluation):
    a = store.save_profile(make_profile(id="prof-aaaa1111"))
    store.save_profile(make_profile(id="prof-aaaa2222"))
    plan = store.save_plan(make_plan(a, id="plan-b_c%1"))
    ev = store.save_evaluation(make_evaluation(plan.id))
    kind, got = store.find("prof-aaaa1")
    assert kind == "profile" and got.id == a.id  # Profile == fails on its numpy fields
    assert store.find(plan.id) == ("plan", plan)
    assert store.find(ev.id[:9]) == ("evaluation", ev)
    with pytest.raises(InvalidInput, match="prof-aaaa1111.*prof-aaaa2222"):
        store.find("prof-aaaa")
    # LIKE wildcards in the prefix are literal characters.
    with pytest.raises(NotFound):
        store.find("plan-b%")
    with pytest.raises(NotFound):
        store.find("PROF-AAAA1")
    with pytest.raises(InvalidInput):
        store.find("  ")


def test_exact_id_wins_over_longer_ids(store, make_profile):
    short = store.save_profile(make_profile(1, id="prof-ab"))
    store.save_profile(make_profile(2, id="prof-abc"))
    kind, got = store.find("prof-ab")
    assert (kind, got.id) == ("profile", short.id)


def test_foreign_keys_are_enforced(store, make_profile, make_plan, make_evaluation):
    plan = make_plan(make_profile())  # its profile is never saved
    with pytest.raises(NotFound, match="save the profile first"):
        store.save_plan(plan)
    with pytest.raises(NotFound, match="save the plan first"):
        store.save_evaluation(make_evaluation("plan-missing"))
    # Below the store's own check, the database refuses too.
    from bitplan.db.store import _plan_row

    with pytest.raises(IntegrityError), Session(store.engine) as s, s.begin():
        s.add(_plan_row(plan))
    with Session(store.engine) as s:
        assert s.get(PlanRow, plan.id) is None


def test_jobs(store):
    id = store.create_job("profile", {"model": "smol", "options": [2, 4]})
    job = store.get_job(id)
    assert (job["state"], job["progress"]) == ("queued", 0.0)
    assert job["params"] == {"model": "smol", "options": [2, 4]}
    store.update_job(id, state="running", progress=0.5, message="block 15/30")
    job = store.update_job(id, state="succeeded", progress=1.0, result_id="prof-1")
    assert (job["state"], job["progress"], job["result_id"]) == ("succeeded", 1.0, "prof-1")
    assert job["message"] == "block 15/30"  # not given in the last update, so kept
    assert job["updated_at"] >= job["created_at"] and job["updated_at"].tzinfo is not None
    assert [j["id"] for j in store.list_jobs("succeeded")] == [id] and store.list_jobs("running") == []
    with pytest.raises(InvalidInput, match="state"):
        store.update_job(id, state="exploded")
    with pytest.raises(InvalidInput, match="progress"):
        store.update_job(id, progress=1.5)
    with pytest.raises(NotFound):
        store.update_job("job-nope", state="failed")
    failed = store.create_job("apply", {})
    assert store.update_job(failed, state="failed", error="Traceback ...")["error"] == "Traceback ..."
