"""bench/in_context.py: the scales it fits recover a known per-module factor of an additive score, and the
script runs end to end on a tiny GPTQ profile with both plans within budget and paired intervals that hold
their ratio."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]  # tests/bench/ -> the repository root
_spec = importlib.util.spec_from_file_location("bench_in_context", ROOT / "bench" / "in_context.py")
in_context = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(in_context)  # it takes bench/ off sys.path again itself


def test_scales_recover_a_per_module_factor_of_an_additive_score():
    rng = np.random.default_rng(0)
    M, sizes = 12, np.array([2, 3, 4, 8])
    size = np.tile(sizes, (M, 1)) * rng.integers(50, 200, size=(M, 1))
    error = rng.uniform(0.5, 2, size=(M, 1)) * 4.0 ** -sizes  # falls as bits grow
    k = rng.uniform(0.5, 2, size=M)
    choice = rng.integers(0, 4, size=M)  # ends too: a module with one neighbour is scaled by it alone

    def score(c):
        return float((k * error[np.arange(M), c]).sum())

    s, moves = in_context.scales(error, size, choice, score, score(choice))
    np.testing.assert_allclose(s, k, rtol=1e-9)
    assert len(moves) == sum(int(c > 0) + int(c < 3) for c in choice)


def test_a_noisy_free_module_is_floored_not_free():
    error = np.array([[4.0, 1.0], [4.0, 1.0], [4.0, 1.0]])
    size = np.array([[2, 4]] * 3)
    choice = np.array([1, 1, 1])
    k = {0: 1.0, 1: 2.0, 2: -0.5}  # module 2's move measured as a gain: noise

    def score(c):
        return sum(k[m] * error[m, o] for m, o in enumerate(c))

    s, _ = in_context.scales(error, size, choice, score, score(choice))
    median = np.median([1.0, 2.0])
    assert s[0] == pytest.approx(1) and s[1] == pytest.approx(2) and s[2] == pytest.approx(in_context.FLOOR * median)


@pytest.mark.slow  # a whole bench run in a subprocess
def test_in_context_runs_end_to_end(gptq_store, text_file, tmp_path):
    db, profile = gptq_store
    out = tmp_path / "in_context.json"
    cmd = [sys.executable, str(ROOT / "bench" / "in_context.py"), "--db", db, "--profile", profile.id,
           "--budget", "3.5bpw", "--uniform", "4.5bpw", "--tokens", "128", "--texts", str(text_file),
           "--eval-tokens", "256", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    (study,) = result["studies"]
    assert len(study["scale"]) == len(profile.modules) and min(study["scale"]) > 0
    rows = {r["plan"]: r for r in result["rows"]}
    assert set(rows) == {"ilp@3.5bpw", "ilp in context@3.5bpw", "uniform@4.5bpw"}
    for name, r in rows.items():
        assert r["bits_per_weight"] <= float(name.split("@")[1].removesuffix("bpw"))
        m = r[str(text_file)]
        assert 1 < m["perplexity"] < 1e6
        for other in set(rows) - {name}:
            lo, hi = m[f"vs {other}"]["ci95"]  # a degenerate interval is its ratio up to rounding
            assert lo - 1e-12 <= m[f"vs {other}"]["ratio"] <= hi + 1e-12
