"""`bitplan profile --quantizer/--estimator/--validate` end to end on a tiny real checkpoint."""

import json

from bitplan.planner.app.cli import format_validation


def test_gptq_profile_is_applied_with_gptq(db, tiny_checkpoint, text_file, tmp_path, run_cli):
    common = ["--calib", str(text_file), "--tokens", "256", "--seq-len", "64", "--json", "-q"]
    code, out, _ = run_cli("profile", str(tiny_checkpoint), "--estimator", "fisher", *common)
    assert code == 0
    gptq = json.loads(out)  # GPTQ is the default quantizer
    code, out, _ = run_cli("profile", str(tiny_checkpoint), "--estimator", "fisher", "--quantizer", "rtn",
                           *common)
    rtn = json.loads(out)
    assert gptq["estimator"] == rtn["estimator"] == "fisher" and gptq["id"] != rtn["id"]
    assert gptq["quantizer"]["method"] == "gptq" and rtn["quantizer"] == {"method": "rtn"}
    # GPTQ's ΔW is smaller in the metric it optimises, so its predicted errors differ from RTN's
    assert [m["error"] for m in gptq["modules"]] != [m["error"] for m in rtn["modules"]]
    code, out, _ = run_cli("plan", gptq["id"], "--budget", "3.5bpw", "--json", "-q")
    plan = json.loads(out)
    code, out, err = run_cli("apply", plan["id"], "--out", str(tmp_path / "q"), "--gptq-inputs", "original",
                             "--json", "-q")
    assert code == 0, err
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quantizer"] == "gptq"
    assert config["quantization_config"]["gptq_inputs"] == "original"
    # GPTQ on the activations of the plan's own quantized model (the default): other codes, recorded, the
    # same bytes twice
    for name, flags in (("p1", ["--gptq-inputs", "quantized"]), ("p2", [])):
        code, out, err = run_cli("apply", plan["id"], "--out", str(tmp_path / name), *flags, "--json", "-q")
        assert code == 0, err
    qc = json.loads((tmp_path / "p1" / "config.json").read_text())["quantization_config"]
    assert qc["gptq_inputs"] == "quantized"
    shards = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("q", "p1", "p2")]
    assert shards[1] == shards[2] and shards[0] != shards[1]
    code, out, _ = run_cli("eval", str(tmp_path / "q"), "--text", str(text_file), "--tokens", "128",
                           "--window", "64", "--json", "-q")
    assert code == 0 and 1 < json.loads(out)["perplexity"] < 1e6


def test_a_bad_quantizer_is_refused_before_the_store_is_made(db, tiny_checkpoint, run_cli):
    from pathlib import Path

    for text in ("rtn:clip=maybe", "rtn:damp=0.1", "llamacpp:clip=true"):
        code, out, err = run_cli("profile", str(tiny_checkpoint), "--quantizer", text)
        assert code != 0 and out == "" and len(err.strip().splitlines()) == 1, err
        assert not Path(db).exists()


def test_kl_estimator_and_validate(db, tiny_checkpoint, text_file, run_cli):
    code, out, _ = run_cli("profile", str(tiny_checkpoint), "--estimator", "kl", "--quantizer", "rtn",
                           "--options", "2,4", "--calib", str(text_file), "--tokens", "64", "--seq-len", "32", "--json", "-q")
    assert code == 0
    kl = json.loads(out)
    assert kl["estimator"] == "kl"
    flat = [x for m in kl["modules"] for x in m["error"]]
    assert min(flat) >= 0 and max(flat) > 0
    code, out, err = run_cli("profile", str(tiny_checkpoint), "--validate", "--validate-layers", "1",
                             "--options", "2,4", "--calib", str(text_file), "--tokens", "128", "--seq-len", "32",
                             "--json", "-q")
    assert code == 0, err
    r = json.loads(out)
    assert set(r["spearman"]) == {"hessian", "fisher"} and r["n_modules"] == 7
    assert all(-1 <= rho <= 1 for rho in r["spearman"].values())
    assert "Spearman" in format_validation(r) and "fisher" in format_validation(r)
    # with GPTQ, the KL truth quantizes with H of the estimators' 128 tokens, not of its own 64
    code, out, err = run_cli("profile", str(tiny_checkpoint), "--validate", "--validate-layers", "1",
                             "--options", "2,4", "--quantizer", "gptq", "--calib", str(text_file), "--tokens", "128",
                             "--seq-len", "32", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["quantizer"] == "gptq"


def test_profile_kl_experts_from_the_cli(db, moe_checkpoint, text_file, run_cli):
    """`profile --kl-experts K`: its own profile id (the default's is unchanged), the experts left out named
    in `estimated`, no zero at a quantized option; refused in one line for another estimator or K < 1."""
    common = [str(moe_checkpoint("qwen2_moe")), "--calib", str(text_file), "--tokens", "256", "--seq-len", "64",
              "--options", "2,4", "--quantizer", "rtn", "--json", "-q"]
    code, out, err = run_cli("profile", *common, "--kl-experts", "1")
    assert code == 0, err
    sampled = json.loads(out)
    code, out, err = run_cli("profile", *common)
    assert code == 0, err
    full = json.loads(out)
    assert sampled["id"] != full["id"] and sampled["estimator"] == full["estimator"] == "calibrated"
    left_out = {n for n, why in sampled["estimated"].items() if "not in the sample" in why}
    experts = {m["name"] for m in full["modules"] if m.get("expert") is not None}
    assert left_out and left_out < experts
    assert all(min(m["error"][:2]) > 0 for m in sampled["modules"])
    for bad, says in ((["--kl-experts", "2", "--estimator", "fisher"], "drop it for --estimator fisher"),
                      (["--kl-experts", "0"], "1 or more")):
        code, out, err = run_cli("profile", *common, *bad)
        assert code != 0 and says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
