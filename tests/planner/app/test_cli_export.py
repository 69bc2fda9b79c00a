"""`bitplan apply --format` then `bitplan eval` on the export: same perplexity as our own format, plan linked."""

import pytest


def test_exports_evaluate_like_our_format(db, tiny_checkpoint, text_file, tmp_path, cli_json):
    profile = cli_json("profile", str(tiny_checkpoint), "--calib", str(text_file), "--tokens", "128",
                      "--seq-len", "64", "--group-size", "32", "--json", "-q")
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
