"""bench/error_shrink.py end to end on a tiny GPTQ profile: at λ = 1 the plan's perplexity is what
`evaluate_plans` gives for the weights `apply` writes, and at λ = 0 with every module shrunk it is the
unquantized model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # tests/bench/ -> the repository root


@pytest.mark.slow  # a whole bench run in a subprocess
def test_error_shrink_ends_are_the_plan_and_the_unquantized_model(gptq_store, text_file, tmp_path):
    from bitplan.db.store import Store
    from bitplan.executor.evaluate import eval_windows, evaluate_plans, perplexity
    from bitplan.planner.app.usecases import run_plan
    from bitplan.planner.app.workspace import Workspace
    from bitplan.planner.request import PlanRequest
    from bitplan.profiler import profile as prof
    from bitplan.profiler.model import load_model, planned_for

    db, profile = gptq_store
    ws = Workspace(Store(db))
    plan = run_plan(ws, profile, PlanRequest(budget="3.5bpw"))
    target = run_plan(ws, profile, PlanRequest(budget="4.5bpw", allocator="uniform"))
    out = tmp_path / "shrink.json"
    cmd = [sys.executable, str(ROOT / "bench" / "error_shrink.py"), "--db", db, "--plan", plan.id, "--target",
           target.id, "--shrink", "0,1", "--below-bits", "99", "--text", str(text_file), "--tokens", "256",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    # λ = 1 last: the target's GPTQ must not see the plan's quantized weights
    assert [(r["plan"], r["shrink"]) for r in rows] == [("plan", 0.0), ("plan", 1.0), ("target", 1.0)]

    loaded = load_model(profile.model.source)
    planned = planned_for(loaded.model, {m.name for m in profile.modules})
    windows = eval_windows(loaded.tokenizer, str(text_file), 256, 256).ids  # as the script takes them
    hessians = prof.gptq_hessians(loaded, profile, planned, progress=False)
    measured = []
    for p in (plan, target):
        cache = prof.gptq_propagated(loaded, profile, planned, p.assignment, progress=False)
        measured.append(evaluate_plans(loaded.model, planned, [p.assignment], windows, quantizer=profile.quantizer,
                                       hessians=hessians, cache=cache, progress=False)[0]["perplexity"])
    base = perplexity(loaded.model, windows, progress=False)  # the loaded weights, as they are
    assert rows[1]["perplexity"] == pytest.approx(measured[0], rel=1e-5)
    assert rows[2]["perplexity"] == pytest.approx(measured[1], rel=1e-5)
    assert rows[0]["perplexity"] == pytest.approx(base, rel=1e-5) and rows[0]["shrunk_weight_share"] > 0.5
