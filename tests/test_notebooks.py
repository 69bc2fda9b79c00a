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
from bitplan.planner.workflow import run_plan  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
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
            plan = run_plan(store, profile, budget, alloc)
            store.save_evaluation(Evaluation(plan_id=plan.id, checkpoint=f"/nowhere/{plan.id}", corpus="synthetic",
                                             n_tokens=1024, window=256,
                                             perplexity=20 * math.exp(plan.predicted_error * (0.9 + 0.05 * i))))
        store.save_evaluation(Evaluation(checkpoint=profile.model.name, corpus="synthetic", n_tokens=1024,
                                         window=256, perplexity=20.0))


@pytest.mark.parametrize("source", ["synthetic", "file", "stored"])
def test_notebook_runs_small(source, tmp_path, monkeypatch):
    monkeypatch.setenv("BITPLAN_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("BITPLAN_DB", str(tmp_path / "notebook.db"))
    monkeypatch.delenv("BITPLAN_PROFILE_ID", raising=False)
    monkeypatch.delenv("BITPLAN_PROFILE_FILE", raising=False)
    figures = 3  # predicted error, heat map, solve time
    if source == "file":  # an MoE profile: the layer x expert heat map too
        path = tmp_path / "moe.json"
        path.write_text(json.dumps(synthetic.synthetic_profile(n_layers=4, n_experts=8).to_dict()))
        monkeypatch.setenv("BITPLAN_PROFILE_FILE", str(path))
        figures += 1
    elif source == "stored":  # evaluations: measured perplexity, predicted vs measured
        _store_evaluated_plans(tmp_path / "notebook.db")
        figures += 2

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
    else:
        assert "No evaluations of this profile's plans are stored" in text
