"""The CLI end to end on a tiny real checkpoint, and every bad input: one-line error, exit != 0, nothing written."""

import json
import subprocess
import sys

import pytest

from bitplan.db.store import Store


def test_help_for_every_command():
    for cmd in ([], ["profile"], ["plan"], ["apply"], ["eval"], ["ls"], ["show"], ["serve"], ["demo"]):
        r = subprocess.run([sys.executable, "-m", "bitplan.planner.app.cli", *cmd, "--help"], capture_output=True,
                           text=True)
        assert r.returncode == 0 and "usage: bitplan" in r.stdout


def test_plan_from_profile_file(db, profile_file, tmp_path, run_cli):
    out_file = tmp_path / "plan.json"
    code, out, _ = run_cli("plan", "--profile-file", str(profile_file), "--budget", "3.5bpw",
                           "--output", str(out_file), "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan == json.loads(out_file.read_text())
    assert plan["bits_per_weight"] <= 3.5 and plan["allocator"] == "ilp" and plan["status"] == "optimal"
    assert {"assignment", "total_bits", "bits_per_weight", "predicted_error", "allocator", "status",
            "solve_seconds", "id"} <= set(plan)
    code, out, _ = run_cli("show", plan["id"])
    assert code == 0 and "bits/weight" in out and "q_proj" in out
    code, out, _ = run_cli("ls", "--json")
    listing = json.loads(out)
    assert [p["id"] for p in listing["plans"]] == [plan["id"]]
    assert [p["id"] for p in listing["profiles"]] == ["prof-synthetic"]


BAD_PLANS = {
    "infeasible budget": (["--budget", "1.5bpw"], "smallest feasible"),
    "unknown allocator": (["--allocator", "magic"], "magic"),
    "unknown pin": (["--pin", "model.decoder.*=8"], "model.decoder.*"),
    "bad budget": (["--budget", "lots"], "3.5bpw"),
    "overflowing budget": (["--budget", "1e400bpw"], "too large"),
    "gigabits": (["--budget", "40Gb"], "reads as bits"),
}


@pytest.mark.parametrize("args", [["profile", "smollm2-135m", "--tokens", "0"], ["eval", "x", "--window", "0"],
                                  ["compare", "prof-x", "--eval-tokens", "-5"]], ids=["tokens", "window", "eval-tokens"])
def test_counts_must_be_positive(args, run_cli):
    code, out, err = run_cli(*args)
    assert code == 2 and "is not positive: give 1 or more" in err and "Traceback" not in err


@pytest.mark.parametrize("extra,needle", [([], "add --device cuda"),
                                          (["--device", "cuda", "--speed-batches", ""], "keep --speed-batches"),
                                          (["--server", "http://127.0.0.1:9"], "--compile runs locally only")],
                         ids=["cpu", "no-speed-test", "server"])
def test_compile_is_for_the_local_speed_test(extra, needle, db, run_cli):
    """`eval --compile` compiles the decode-speed test's steps: without that test (on the CPU, with no
    batches) or on a server (which runs none) it is refused in one line before anything loads."""
    code, out, err = run_cli("eval", "smollm2-135m", "--compile", *extra)
    assert code == 2 and out == "" and needle in err and err.count("\n") == 1


@pytest.mark.parametrize("case", BAD_PLANS, ids=list(BAD_PLANS))
def test_bad_plan_requests_write_nothing(case, db, profile_file, tmp_path, run_cli):
    extra, needle = BAD_PLANS[case]
    out_file = tmp_path / "plan.json"
    code, out, err = run_cli("plan", "--profile-file", str(profile_file), "--output", str(out_file), *extra)
    assert code != 0 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err
    assert not out_file.exists() and Store(db).list_plans() == []


def test_profile_file_without_id(db, tmp_path, run_cli, make_profile):
    d = make_profile().to_dict()
    del d["id"]
    (tmp_path / "p.json").write_text(json.dumps(d))
    code, out, _ = run_cli("plan", "--profile-file", str(tmp_path / "p.json"), "--json")
    assert code == 0
    stored = Store(db).get_profile(json.loads(out)["profile_id"])
    assert stored.id.startswith("prof-") and len(stored.modules) == len(d["modules"])


def test_an_edited_profile_file_keeping_its_id_gets_its_own(db, tmp_path, run_cli, make_profile):
    """A file whose id is a stored profile's but whose errors were edited is not that profile: its plans
    refer to the file's content id, and the stored profile keeps its own."""
    original = make_profile()
    Store(db).save_profile(original)
    d = original.to_dict()
    for m in d["modules"]:  # each module's row of errors, doubled
        m["error"] = [v * 2 for v in m["error"]]
    (tmp_path / "edited.json").write_text(json.dumps(d))
    code, out, err = run_cli("plan", "--profile-file", str(tmp_path / "edited.json"), "--budget", "3bpw", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["profile_id"] != original.id and plan["profile_id"].startswith("prof-")
    assert Store(db).get_profile(plan["profile_id"]).error.tolist() == (original.error * 2).tolist()
    assert Store(db).get_profile(original.id).error.tolist() == original.error.tolist()


def test_malformed_profile_json(db, tmp_path, run_cli, make_profile):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "bitplan.profile/1", "modules": [')
    code, _, err = run_cli("plan", "--profile-file", str(bad))
    assert code != 0 and "malformed profile JSON" in err and err.count("\n") == 1
    bad.write_text(json.dumps({**make_profile().to_dict(), "options": [{"bits": 7}]}))
    code, _, err = run_cli("plan", "--profile-file", str(bad))
    assert code != 0 and "malformed profile" in err and err.count("\n") == 1
    assert Store(db).list_profiles() == []


def test_missing_checkpoint_and_not_a_causal_lm(db, tmp_path, run_cli):
    code, _, err = run_cli("profile", str(tmp_path / "nope"))
    assert code != 0 and "no such checkpoint" in err
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text('{"model_type": "vit"}')
    code, _, err = run_cli("profile", str(tmp_path / "enc"))
    assert code != 0 and "not a causal language model" in err
    assert Store(db).list_profiles() == []


def test_profile_plan_apply_eval(db, tiny_checkpoint, text_file, tmp_path, run_cli):
    code, out, _ = run_cli("profile", str(tiny_checkpoint), "--calib", str(text_file), "--tokens", "256",
                           "--seq-len", "64", "--json", "-q")
    assert code == 0
    profile = json.loads(out)
    # 14 linears and the tied embedding (`--embeddings plan`, the default)
    assert profile["id"].startswith("prof-") and len(profile["modules"]) == 15
    code, out, _ = run_cli("plan", profile["id"][:10], "--budget", "4bpw", "--json", "-q")
    assert code == 0
    plan = json.loads(out)
    assert plan["bits_per_weight"] <= 4.0
    code, out, _ = run_cli("apply", plan["id"], "--out", str(tmp_path / "q"), "--json", "-q")
    assert code == 0 and json.loads(out)["checkpoint"] == str(tmp_path / "q")
    code, _, err = run_cli("apply", plan["id"], "--out", str(tmp_path / "q"), "-q")
    assert code != 0 and "--overwrite" in err
    code, out, _ = run_cli("eval", str(tmp_path / "q"), "--text", str(text_file), "--tokens", "256",
                           "--window", "64", "--json", "-q")
    assert code == 0
    ev = json.loads(out)
    assert ev["plan_id"] == plan["id"] and 1 < ev["perplexity"] < 1e6 and ev["id"]
    # another database does not know the plan: the evaluation is kept without the link
    code, out, _ = run_cli("eval", str(tmp_path / "q"), "--text", str(text_file), "--tokens", "128",
                           "--window", "64", "--json", "-q", "--db", str(tmp_path / "other.db"))
    assert code == 0 and json.loads(out)["plan_id"] is None
    assert len(Store(str(tmp_path / "other.db")).list_evaluations()) == 1


def test_two_processes_profiling_the_same_thing_share_it(db, tiny_checkpoint, text_file):
    """Two `bitplan profile` runs of one model and settings on one database: one measures, the other waits
    for it and reuses its profile; both succeed with the same id, and one profile is stored."""
    import os
    import subprocess
    import sys

    argv = [sys.executable, "-m", "bitplan.planner.app.cli", "profile", str(tiny_checkpoint), "--calib",
            str(text_file), "--tokens", "128", "--seq-len", "64", "--estimator", "fisher", "--quantizer", "rtn",
            "--json", "-q"]
    env = {**os.environ, "BITPLAN_DB": str(db), "PYTHONSAFEPATH": "1"}
    runs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [r.communicate(timeout=300) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [err for _, err in outs]
    ids = {json.loads(out)["id"] for out, _ in outs}
    assert len(ids) == 1 and [p.id for p in Store(db).list_profiles()] == list(ids)
