import filecmp
import os

import pytest

from bitplan.db.types import InvalidInput, ModelRef, Option, Plan, UnknownModule
from bitplan.executor.apply import apply_plan
from bitplan.executor.load import load_quantized
from bitplan.profiler.model import planned_linears


def mixed_plan(planned, plan_id="plan-test") -> Plan:
    widths = [2, 3, 4, 8, 16]
    assignment = {m.name: Option(bits=widths[i % len(widths)], group_size=64) for i, (m, _) in enumerate(planned)}
    return Plan(id=plan_id, profile_id="prof-test", model=ModelRef(name="tiny"), budget="4bpw", budget_bits=1,
                allocator="manual", assignment=assignment, total_bits=1, n_params=1, bits_per_weight=1.0,
                predicted_error=0.0, status="manual", solve_seconds=0.0)


def test_apply_twice_is_byte_identical(loaded, tmp_path):
    planned = planned_linears(loaded.model)
    plan = mixed_plan(planned)
    a = apply_plan(plan, loaded.model, loaded.tokenizer, planned, tmp_path / "a", progress=False)
    b = apply_plan(plan, loaded.model, loaded.tokenizer, planned, tmp_path / "b", progress=False)
    files = sorted(os.listdir(a))
    assert files == sorted(os.listdir(b)) and "model.safetensors" in files and "config.json" in files
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == []


def test_reloaded_checkpoint_gives_the_in_memory_logits(loaded, tmp_path, assert_reloads_as_in_memory):
    planned = planned_linears(loaded.model)
    plan = mixed_plan(planned)
    out = apply_plan(plan, loaded.model, loaded.tokenizer, planned, tmp_path / "q", progress=False)
    reloaded, tok, qc = load_quantized(out)
    assert qc["plan_id"] == plan.id and tok is not None
    assert_reloads_as_in_memory(loaded.model, reloaded, plan)


def test_quantized_checkpoint_is_smaller(loaded, tmp_path):
    planned = planned_linears(loaded.model)
    plan = mixed_plan(planned)
    two_bit = plan.model_copy(update={"assignment": {k: Option(bits=2) for k in plan.assignment}})
    a = apply_plan(plan, loaded.model, None, planned, tmp_path / "mixed", progress=False)
    b = apply_plan(two_bit, loaded.model, None, planned, tmp_path / "two", progress=False)
    assert (b / "model.safetensors").stat().st_size < (a / "model.safetensors").stat().st_size


def test_existing_output_is_kept(loaded, tmp_path):
    planned = planned_linears(loaded.model)
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="--overwrite"):
        apply_plan(mixed_plan(planned), loaded.model, None, planned, out, progress=False)
    assert os.listdir(out) == ["keep.txt"]
    # --overwrite replaces only what bitplan wrote: not a user's folder, not the one we work in
    with pytest.raises(InvalidInput, match="replaces only a folder bitplan wrote"):
        apply_plan(mixed_plan(planned), loaded.model, None, planned, out, progress=False, overwrite=True)
    assert os.listdir(out) == ["keep.txt"]
    written = apply_plan(mixed_plan(planned), loaded.model, None, planned, tmp_path / "ours", progress=False)
    cwd = os.getcwd()
    try:
        os.chdir(written)
        with pytest.raises(InvalidInput, match="holds the working directory"):
            apply_plan(mixed_plan(planned), loaded.model, None, planned, written, progress=False, overwrite=True)
    finally:
        os.chdir(cwd)
    assert apply_plan(mixed_plan(planned), loaded.model, None, planned, written, progress=False, overwrite=True)


def test_leftovers_of_a_dead_apply_are_removed(loaded, tmp_path):
    planned = planned_linears(loaded.model)
    dead = tmp_path / ".q.tmp-999999999"  # no such process
    (dead / "x").mkdir(parents=True)
    mine = tmp_path / f".q.tmp-{os.getpid()}x"  # not a pid: left alone
    mine.mkdir()
    apply_plan(mixed_plan(planned), loaded.model, None, planned, tmp_path / "q", progress=False)
    assert not dead.exists() and mine.exists()


def test_plan_for_another_model_fails_before_writing(loaded, tmp_path):
    planned = planned_linears(loaded.model)
    plan = mixed_plan(planned)
    wrong = plan.model_copy(update={"assignment": {**plan.assignment, "model.layers.9.mlp.up_proj": Option(bits=4)}})
    with pytest.raises(UnknownModule, match="another model"):
        apply_plan(wrong, loaded.model, None, planned, tmp_path / "never", progress=False)
    assert not any(tmp_path.iterdir())
