"""`apply` with the weights streamed from disk: one block in memory, the same checkpoint to the byte."""

import filecmp

import pytest
import torch

from bitplan.db.store import Store
from bitplan.db.types import InvalidInput, Quantizer, parse_options
from bitplan.executor import apply as apply_mod
from bitplan.executor.apply import apply_plan, apply_plan_streamed
from bitplan.executor.load import load_quantized
from bitplan.planner.app.usecases import run_apply
from bitplan.planner.app.workspace import Workspace
from bitplan.planner.plan import allocate
from bitplan.planner.request import PlanRequest
from bitplan.profiler.model import load_model, planned_for
from bitplan.profiler.profile import calibration_batches, gptq_hessians, profile_model


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, untied_checkpoint):
    """The tiny Llama with its head tied (True) and untied (False)."""
    return {True: tiny_checkpoint, False: untied_checkpoint}


def _same_files(a, b) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(filecmp.cmp(a / n, b / n, shallow=False)
                                                                for n in names)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_streamed_apply_writes_the_same_files(checkpoints, text_file, tmp_path, monkeypatch, tie, quantizer):
    whole = load_model(str(checkpoints[tie]))
    lazy = load_model(str(checkpoints[tie]), stream_weights="on")
    profile = profile_model(whole, parse_options("2,3,4,16"), estimator="hessian", quantizer=Quantizer.parse(quantizer),
                            calib=str(text_file), n_tokens=256, seq_len=64, progress=False, embeddings="plan")
    plan = allocate(profile, PlanRequest(budget="3.5bpw"))
    assert len(set(plan.assignment.values())) > 1  # a mixed plan: several options, the embedding among them
    planned = planned_for(whole.model, plan.assignment)
    H = gptq_hessians(whole, profile, planned, progress=False) if quantizer == "gptq" else None
    monkeypatch.setattr(apply_mod, "MAX_SHARD_BYTES", 40_000)  # several shards, each mixing blocks
    a = apply_plan(plan, whole.model, whole.tokenizer, planned, tmp_path / "whole", quantizer=profile.quantizer,
                   hessians=H, progress=False)
    b = apply_plan_streamed(plan, lazy.model, lazy.tokenizer, planned_for(lazy.model, plan.assignment),
                            tmp_path / "streamed", quantizer=profile.quantizer, progress=False,
                            batches=calibration_batches(lazy, profile) if quantizer == "gptq" else None)
    assert len(list(b.glob("*.safetensors"))) > 2
    assert _same_files(a, b)
    assert not (b / ".parts").exists()
    assert all(p.is_meta for p in lazy.model.parameters())  # nothing left in memory
    model, _, qc = load_quantized(b)
    assert qc["plan_id"] == plan.id
    ids = torch.arange(12).unsqueeze(0)
    assert torch.isfinite(model(ids).logits).all()


def test_the_use_case_streams_and_refuses_what_it_cannot_stream(checkpoints, text_file, tmp_path):
    store = Store(str(tmp_path / "db.sqlite"))
    ws = Workspace(store, progress=False)
    source = str(checkpoints[False])
    profile = store.save_profile(profile_model(load_model(source), parse_options("2,4"), estimator="hessian",
                                               quantizer=Quantizer.parse("gptq"), calib=str(text_file), n_tokens=256,
                                               seq_len=64, progress=False))
    plan = store.save_plan(allocate(profile, PlanRequest(budget="3bpw")))
    with pytest.raises(InvalidInput, match="--gptq-inputs original"):
        run_apply(ws, plan, tmp_path / "q", stream_weights="on")  # quantized inputs: the default
    with pytest.raises(InvalidInput, match="--format bitplan only"):
        run_apply(ws, plan, tmp_path / "g", stream_weights="on", fmt="gptqmodel", gptq_inputs="original")
    assert not any(p.name.startswith((".q", ".g", "q", "g")) for p in tmp_path.iterdir())
    streamed = run_apply(ws, plan, tmp_path / "s", stream_weights="on", gptq_inputs="original")
    loaded = run_apply(ws, plan, tmp_path / "l", stream_weights="off", gptq_inputs="original")
    assert _same_files(streamed, loaded)
    store.close()


@pytest.mark.parametrize("tie", [True, False])
def test_streamed_perplexity_equals_the_in_memory_one(checkpoints, tie):
    """`eval` of a model whose weights stay on disk runs the blocks one at a time over every window and the
    head on the replayed last block: the same perplexity as the whole model's forward."""
    from bitplan.executor.evaluate import perplexity
    from bitplan.profiler.weights import streamed

    whole = load_model(str(checkpoints[tie]))
    lazy = load_model(str(checkpoints[tie]), stream_weights="on")
    assert streamed(lazy.model) is not None
    windows = torch.randint(0, whole.model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    want = perplexity(whole.model, windows, progress=False)
    assert perplexity(lazy.model, windows, progress=False) == pytest.approx(want, rel=1e-6)
    assert all(p.is_meta for p in lazy.model.model.layers.parameters())  # the blocks' weights stayed on disk
