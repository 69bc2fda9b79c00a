"""bench/recipes.py end to end, run as the script it is, on a tiny GPTQ profile: both GPTQ inputs for each
plan, two texts, and paired intervals that hold their ratio; the per-window NLLs it pairs add up to the
perplexity `evaluate_plans` reports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # tests/bench/ -> the repository root

@pytest.mark.slow  # a whole bench run in a subprocess
def test_recipes_pairs_plans_on_shared_windows(gptq_store, text_file, tmp_path):
    db, profile = gptq_store
    out = tmp_path / "recipes.json"
    cmd = [sys.executable, str(ROOT / "bench" / "recipes.py"), "--db", db, "--profile", profile.id,
           "--plans", "uniform@3.5bpw,ilp@3.5bpw,ilp@5bpw", "--pairs", "ilp@3.5bpw:ilp@5bpw",
           "--texts", f"{text_file},code", "--tokens", "256", "--window", "64", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    base, *rows = json.loads(out.read_text())["rows"]
    assert base["allocator"] == "unquantized" and base["code"]["kl"] == pytest.approx(0, abs=1e-6)
    assert [(r["allocator"], r["gptq_inputs"]) for r in rows] == [
        ("uniform", "original"), ("uniform", "quantized"), ("ilp", "original"), ("ilp", "quantized"),
        ("ilp", "original"), ("ilp", "quantized")]
    assert "vs_ilp@5bpw" in rows[2]["code"]
    for r in rows:
        assert r["bits_per_weight"] <= float(r["budget"].removesuffix("bpw"))
        for text in (str(text_file), "code"):
            m = r[text]
            assert 1 < m["perplexity"] < 1e6 and m["kl"] >= 0
            for key in ("vs_original_inputs", "vs_uniform"):
                if key in m:
                    lo, hi = m[key]["ci95"]
                    assert lo <= m[key]["ratio"] <= hi
    assert "vs_original_inputs" in rows[1][str(text_file)] and "vs_uniform" in rows[2]["code"]


def test_per_window_nll_and_kl_add_up_to_the_plan_s_figures(loaded):
    import torch

    from bitplan.db.types import Option
    from bitplan.executor.evaluate import evaluate_plans
    from bitplan.profiler.model import planned_linears

    planned = planned_linears(loaded.model)
    windows = torch.randint(0, loaded.model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    plans = [{m.name: Option(bits=b) for m, _ in planned} for b in (3, 2)]
    plain, paired = (evaluate_plans(loaded.model, planned, plans[:1], windows, progress=False, per_window=w)[0]
                     for w in (False, True))
    nll, kl = paired.pop("window_nll"), paired.pop("window_kl")
    assert len(nll) == len(kl) == 3 and paired == plain
    assert math.exp(sum(nll) / (3 * 15)) == pytest.approx(plain["perplexity"], rel=1e-12)
    assert sum(kl) / (3 * 16) == pytest.approx(plain["kl"], rel=1e-12)

    recipes = harness_sibling("recipes")
    two = evaluate_plans(loaded.model, planned, plans, windows, progress=False, per_window=True)
    r, lo, hi = recipes.paired_sum_ratio(two[1]["window_kl"], two[0]["window_kl"])
    assert r == pytest.approx(two[1]["kl"] / two[0]["kl"], rel=1e-9) and lo <= r <= hi and r > 1  # 2 bits worse


def harness_sibling(name: str):
    """bench/<name>.py as a module (bench/harness.py's `sibling`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "bench" / "harness.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    return harness.sibling(name)


@pytest.mark.slow  # a whole bench run in a subprocess
def test_recipes_passes_search_params_to_the_evolutionary_plan(gptq_store, text_file, tmp_path):
    from bitplan.db.store import Store

    db, profile = gptq_store
    out = tmp_path / "recipes.json"
    params = '{"generations": 1, "offspring": 2, "fitness_tokens": 256, "heldout_tokens": 128, "seed": 3}'
    cmd = [sys.executable, str(ROOT / "bench" / "recipes.py"), "--db", db, "--profile", profile.id,
           "--plans", "evolutionary@3.5bpw", "--gptq-inputs", "original", "--texts", str(text_file),
           "--tokens", "128", "--window", "64", "--search-params", params, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    _, row = json.loads(out.read_text())["rows"]
    plan = Store(db).get_plan(row["plan_id"])
    assert plan.allocator == "evolutionary" and plan.params["generations"] == 1
    assert (plan.params["fitness"]["fitness_tokens"], plan.params["fitness"]["heldout_tokens"]) == (256, 128)
    bad = subprocess.run(cmd[:-4] + ["--search-params", "{generations: 1}"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("--search-params must be")
