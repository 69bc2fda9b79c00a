"""The main job on the embedded SmolLM2-135M, shrunk: profile, plan (ilp and uniform), apply, reload, evaluate."""

import pytest

from bitplan.db.store import Store
from bitplan.planner.app.usecases import ProfileRequest, run_demo
from bitplan.planner.app.workspace import Workspace

pytestmark = pytest.mark.slow


def test_demo_on_the_embedded_model(tmp_path):
    pytest.importorskip("gguf")
    store = Store(str(tmp_path / "e2e.db"))
    rows = run_demo(Workspace(store, progress=False, keep_gptq=True), budgets=["3.5bpw"],
                    profile_request=ProfileRequest(tokens=1024), eval_tokens=2048, out_dir=tmp_path / "runs")
    base, ilp, uniform = (r.model_dump() for r in rows)
    assert base["allocator"] == "unquantized" and 10 < base["perplexity"] < 100
    assert ilp["allocator"] == "ilp" and uniform["allocator"] == "uniform"
    assert ilp["bits_per_weight"] <= 3.5 and uniform["bits_per_weight"] <= 3.5
    assert ilp["status"] == "optimal"
    # the planned mix of 3 and 4 bits beats 3 bits everywhere, and both are worse than unquantized
    assert base["perplexity"] < ilp["perplexity"] < uniform["perplexity"]
    plans = store.list_plans()
    assert len(plans) == 2 and len(store.list_evaluations()) == 3 and len(store.list_profiles()) == 1
