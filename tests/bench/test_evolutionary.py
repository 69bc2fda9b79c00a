"""bench/evolutionary.py end to end, run as the script it is (never imported): at a coarser granularity
the start and the result tie an expert's matrices, stay within budget, and are measured on the same
evaluation windows as a stored plan of the profile.  Its measuring functions are the library's,
`bitplan.executor.evaluate` (tests/executor/test_evaluate.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]  # tests/bench/ -> the repository root


# a whole bench run in a subprocess (a minute or two): with the end-to-end runs, not the fast suite
pytestmark = pytest.mark.slow


def test_expert_granularity_ties_experts_and_measures_on_shared_windows(moe_checkpoint, text_file, tmp_path):
    import torch

    from bitplan.db.store import Store
    from bitplan.db.types import parse_options
    from bitplan.planner.app.usecases import run_plan
    from bitplan.planner.app.workspace import Workspace
    from bitplan.planner.request import PlanRequest
    from bitplan.profiler.model import load_model
    from bitplan.profiler.profile import profile_model

    torch.manual_seed(0)
    db = f"sqlite:///{tmp_path / 'bitplan.db'}"
    loaded = load_model(str(moe_checkpoint("mixtral")))
    store = Store(db)
    profile = store.save_profile(profile_model(loaded, parse_options("2,3,4,8"), calib=str(text_file),
                                               n_tokens=128, seq_len=64, progress=False))
    stored = run_plan(Workspace(store), profile, PlanRequest(budget="3.5bpw", granularity="expert"))
    out = tmp_path / "evo.json"
    args = ["--db", db, "--profile", profile.id, "--budget", "3.5bpw", "--granularity", "expert",
            "--generations", "2", "--offspring", "3", "--patience", "0", "--fitness-tokens", "256",
            "--heldout-tokens", "128", "--row-tokens", "64", "--eval-text", str(text_file),
            "--eval-tokens", "1024", "--report-tokens", "512", "--also", stored.id, "--threads", "1",
            "--out", str(out)]
    env = dict(os.environ, PYTHONSAFEPATH="1")
    r = subprocess.run([sys.executable, "bench/evolutionary.py", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    row = json.loads(out.read_text())

    experts = {}
    for i, m in enumerate(profile.modules):
        if m.expert is not None:
            experts.setdefault((m.layer, m.expert), []).append(i)
    assert experts and row["granularity"] == "expert" and row["profile_id"] == profile.id
    assert row["units"] == len(profile.modules) - sum(len(v) - 1 for v in experts.values())
    for key in ("start_choice", "choice"):
        choice = np.asarray(row[key])
        assert all(len(set(choice[idx])) == 1 for idx in experts.values())  # one option per expert
    assert row["bits"] <= row["budget_bits"] and row["start_bits"] <= row["budget_bits"]
    # the start is the stored expert-granularity ilp plan: equal measurements on the same windows
    assert row["measured"][stored.id] == row["measured"]["ilp"]
    assert row["eval_tokens"] == 1024 and len(row["windows"]["ilp"]["nll"]) == 2
    assert row["measured_first"]["ilp"]["tokens"] == 512
    assert row["ppl_start"] == row["measured"]["ilp"]["perplexity"] > 1
    assert row["eval_kl_start"] == row["measured"]["ilp"]["kl"] >= 0
