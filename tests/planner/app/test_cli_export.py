"""`bitplan apply --format` then `bitplan eval` on the export: same perplexity as our own format, plan linked."""

import pytest


def test_exports_evaluate_like_our_format(db, tiny_checkpoint, text_file, tmp_path, cli_json):
    profile = cli_json("profile", str(tiny_checkpoint), "--calib", str(text_file), "--tokens", "128",
                      "--seq-len", "64", "--group-sizes", "32", "--json", "-q")
    plan = cli_json("plan", profile["id"], "--budget", "4bpw", "--engine", "vllm", "--json", "-q")
    ppl = {}
    for fmt in ("bitplan", "gptqmodel", "compressed-tensors"):
        out = tmp_path / fmt
        cli_json("apply", plan["id"], "--out", str(out), "--format", fmt, "--json", "-q")
        ev = cli_json("eval", str(out), "--text", str(text_file), "--tokens", "128", "--window", "64",
                     "--json", "-q")
        assert ev["plan_id"] == plan["id"]
        ppl[fmt] = ev["perplexity"]
    assert ppl["gptqmodel"] == pytest.approx(ppl["bitplan"], rel=1e-5)
    assert ppl["compressed-tensors"] == pytest.approx(ppl["bitplan"], rel=1e-5)


def test_compare_evaluate_measures_every_plan(db, tiny_checkpoint, text_file, tmp_path, cli_json):
    """`compare --evaluate`: perplexity and KL of every plan, equal to what its applied checkpoint measures."""
    profile = cli_json("profile", str(tiny_checkpoint), "--calib", str(text_file), "--tokens", "128",
                      "--seq-len", "64", "--json", "-q")
    rows = cli_json("compare", profile["id"], "--budgets", "3bpw,4.5bpw", "--allocators", "ilp,uniform",
                   "--evaluate", "--eval-tokens", "128", "--json", "-q")["rows"]
    assert len(rows) == 4 and all(r["kl"] > 0 and 1 < r["perplexity"] < 1e6 for r in rows)
    by = {(r["budget"], r["allocator"]): r for r in rows}
    assert by["4.5bpw", "ilp"]["kl"] < by["3bpw", "ilp"]["kl"]
    # the in-memory measurement is what the applied checkpoint gives (same quantized weights)
    plan_id = by["3bpw", "ilp"]["plan_id"]
    cli_json("apply", plan_id, "--out", str(tmp_path / "q"), "--json", "-q")
    ev = cli_json("eval", str(tmp_path / "q"), "--text", "shakespeare:eval", "--tokens", "128",
                 "--window", "128", "--json", "-q")
    assert ev["perplexity"] == pytest.approx(by["3bpw", "ilp"]["perplexity"], rel=2e-2)


def test_profile_on_two_axes_plans_among_every_group(db, tiny_checkpoint, text_file, cli_json):
    """`--options 2,4 --group-sizes 32,128`: every combination profiled with its exact size, and planned."""
    profile = cli_json("profile", str(tiny_checkpoint), "--calib", str(text_file), "--tokens", "128",
                      "--seq-len", "64", "--options", "2,4", "--group-sizes", "32,128", "--estimator", "fisher",
                      "--quantizer", "rtn", "--json", "-q")
    labels = [f"{o['bits']}b/g{o['group_size']}" for o in profile["options"]]
    assert labels == ["2b/g32", "2b/g128", "4b/g32", "4b/g128"]
    plan = cli_json("plan", profile["id"], "--budget", "3bpw", "--json", "-q")
    assert plan["bits_per_weight"] <= 3.0
    groups = {o["group_size"] for o in plan["assignment"].values()}
    assert groups <= {32, 128}
