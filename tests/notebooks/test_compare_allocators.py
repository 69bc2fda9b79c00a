"""notebooks/compare_allocators.ipynb runs top to bottom (small settings) on each of its data sources,
and the committed copy has the cells its generator writes, so neither can rot."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

from bitplan.db.store import Store  # noqa: E402
from bitplan.db.types import Evaluation  # noqa: E402
from bitplan.planner import synthetic  # noqa: E402
from bitplan.planner.app.usecases import run_plan  # noqa: E402
from bitplan.planner.app.workspace import Workspace  # noqa: E402
from bitplan.planner.request import PlanRequest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]  # tests/notebooks/ -> the repository root
NOTEBOOKS = ROOT / "notebooks"
NOTEBOOK = NOTEBOOKS / "compare_allocators.ipynb"


def _load(name: str):
    """A module of notebooks/ (not a package, and not on sys.path under PYTHONSAFEPATH)."""
    spec = importlib.util.spec_from_file_location(f"notebooks_{name}", NOTEBOOKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


builder = _load("build_compare_allocators")


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def _text(nb) -> str:
    return "".join(o.get("text", "") for o in _outputs(nb) if o.output_type == "stream")


def test_committed_notebook_is_what_the_generator_writes():
    """Edit build_compare_allocators.py, then rerun it (`--execute`) to refresh the committed notebook."""
    committed = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(committed)
    built = builder.build()
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells]


def _store_evaluated_plans(db: Path) -> None:
    """A stored dense synthetic profile with three ilp and two uniform plans 'evaluated' (perplexity made
    up from the predicted error), plus an unquantized baseline: what `bitplan demo` leaves, without a model."""
    with Store(str(db)) as store:
        profile = store.save_profile(synthetic.synthetic_profile(seed=3))
        for i, (budget, alloc) in enumerate([("3bpw", "ilp"), ("3.5bpw", "ilp"), ("4bpw", "ilp"),
                                             ("3bpw", "uniform"), ("4bpw", "uniform")]):
            plan = run_plan(Workspace(store), profile, PlanRequest(budget=budget, allocator=alloc))
            store.save_evaluation(Evaluation(plan_id=plan.id, checkpoint=f"/nowhere/{plan.id}", corpus="synthetic",
                                             n_tokens=1024, window=256,
                                             perplexity=20 * math.exp(plan.predicted_error * (0.9 + 0.05 * i))))
        store.save_evaluation(Evaluation(checkpoint=profile.model.name, corpus="synthetic", n_tokens=1024,
                                         window=256, perplexity=20.0))


def _write_bench_results(db: Path, results: Path) -> None:
    """What `bitplan compare --evaluate --output` and bench/evolutionary.py write, for the stored profile's
    plans (made-up KL), and two evolutionary files of other profiles that the notebook must leave out."""
    with Store(str(db)) as store:
        profile = store.list_profiles()[0]
        plans = store.list_plans(profile.id)
    rows = [{"allocator": p.allocator, "budget": p.budget, "bits_per_weight": p.bits_per_weight,
             "predicted_error": p.predicted_error, "plan_id": p.id, "kl": 0.5 * p.predicted_error,
             "perplexity": 20 * math.exp(0.5 * p.predicted_error)} for p in plans]
    rows.append(dict(rows[0], plan_id="plan-of-another-profile"))
    (results / "compare_synthetic.json").write_text(json.dumps({"rows": rows}))
    start = next(p for p in plans if p.allocator == "ilp" and p.budget == "3bpw")
    run = {"profile_id": profile.id, "budget": "3bpw", "granularity": "module", "bits": start.total_bits - 64,
           "start_bits": start.total_bits, "predicted_error": start.predicted_error * 1.01,
           "start_predicted_error": start.predicted_error, "fitness_kl": 0.30, "start_fitness_kl": 0.33,
           "heldout_kl": 0.31, "start_heldout_kl": 0.34, "eval_kl": 0.32, "eval_kl_start": 0.35, "ppl": 25.0,
           "ppl_start": 26.0, "eval_tokens": 1024, "tokens_used": 12345, "search_seconds": 7.0}
    (results / "evolutionary_synthetic.json").write_text(json.dumps(run))
    (results / "evolutionary_other.json").write_text(json.dumps(dict(run, profile_id="prof-another")))
    legacy = {k: v for k, v in run.items() if k not in ("profile_id", "eval_kl", "eval_kl_start")}
    (results / "evolutionary_legacy.json").write_text(json.dumps(dict(legacy, start_predicted_error=9.0)))


@pytest.mark.parametrize("source", ["synthetic", "file", "stored"])
def test_notebook_runs_small(source, tmp_path, monkeypatch):
    monkeypatch.setenv("BITPLAN_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("BITPLAN_DB", str(tmp_path / "notebook.db"))
    monkeypatch.delenv("BITPLAN_PROFILE_ID", raising=False)
    monkeypatch.delenv("BITPLAN_PROFILE_FILE", raising=False)
    results = tmp_path / "results"  # bench results: none, except in the stored case
    results.mkdir()
    monkeypatch.setenv("BITPLAN_BENCH_RESULTS", str(results))
    figures = 3  # predicted error, heat map, solve time
    if source == "file":  # an MoE profile: the layer x expert heat map too
        path = tmp_path / "moe.json"
        path.write_text(json.dumps(synthetic.synthetic_profile(n_layers=4, n_experts=8).to_dict()))
        monkeypatch.setenv("BITPLAN_PROFILE_FILE", str(path))
        figures += 1
    elif source == "stored":  # evaluations: measured perplexity, predicted vs measured, measured KL
        _store_evaluated_plans(tmp_path / "notebook.db")
        _write_bench_results(tmp_path / "notebook.db", results)
        figures += 3

    nb = builder.execute(nbformat.read(NOTEBOOK, as_version=4), NOTEBOOKS, timeout=120)

    outputs, text = _outputs(nb), _text(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    assert f"kernel python  {sys.executable}\n" in text  # the kernel is this interpreter (this venv)
    assert "mode           small (CI)" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == figures
    assert "12 (budget, allocator) pairs solved" in text
    expected = {"synthetic": "data           synthetic", "file": "data           profile file",
                "stored": "data           stored profile"}[source]
    assert expected in text
    if source == "stored":
        assert "5 evaluated plans" in text and "unquantized: perplexity 20.00" in text
        assert "rank correlation" in text
        assert "additive allocators, measured by `bitplan compare --evaluate` (5 plans)" in text
        assert "plan-of-another-profile" not in text
        assert "evolutionary search from the ilp optimum (1 runs)" in text
        assert "evolutionary_synthetic.json" in text and "12345" in text
        assert "evolutionary_other.json" not in text and "evolutionary_legacy.json" not in text
    else:
        assert "No evaluations of this profile's plans are stored" in text
        assert "No measured KL of this profile's plans" in text
