"""Every family bitplan claims (`FAMILIES` in conftest.py), end to end as a user runs it: profile with the
default estimator (calibrated, GPTQ), plan, apply, reload; the reloaded checkpoint computes what the
in-memory quantized model computes, and no quantized option of any module is predicted to cost nothing.

tests/profiler/test_architectures.py checks the streamed pass itself on the same families.
"""

import pytest
import torch
from transformers import AutoTokenizer

from bitplan.db.store import Store
from bitplan.executor.apply import quantize_model
from bitplan.executor.load import load_quantized
from bitplan.planner.app.usecases import ProfileRequest, run_apply, run_plan, run_profile
from bitplan.planner.app.workspace import Workspace
from bitplan.planner.request import PlanRequest
from bitplan.profiler.model import load_model, planned_for
from bitplan.profiler.profile import gptq_hessians


@pytest.fixture(scope="module")
def checkpoint(arch_family, build_arch, tiny_checkpoint, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    d = tmp_path_factory.mktemp(f"arch-{arch_family}")
    build_arch(arch_family, len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return arch_family, d


def test_profile_plan_apply_reload(checkpoint, text_file, tmp_path):
    family, path = checkpoint
    with Store(str(tmp_path / "bitplan.db")) as store:
        ws = Workspace(store, progress=False)
        profile = run_profile(ws, str(path), ProfileRequest(options="2,4", calib=str(text_file), tokens=128, seq_len=32))
        assert profile.estimator == "calibrated" and profile.quantizer.method == "gptq"
        quantized = [j for j, o in enumerate(profile.options) if o.quantized and o.bits < 8]
        zero = [(profile.modules[i].name, profile.options[quantized[j]].label)
                for i, j in zip(*(profile.error[:, quantized] <= 0).nonzero())]
        assert not zero, f"{family}: predicted error 0 at a quantized option: {zero[:5]}"
        plan = run_plan(ws, profile, PlanRequest(budget="3.5bpw"))
        assert plan.total_bits <= plan.budget_bits
        # the unquantized model's H, so that the in-memory reference below can take the same
        out = run_apply(ws, plan, tmp_path / "q", gptq_inputs="original")

    reloaded, _, _ = load_quantized(out)
    loaded = load_model(str(path))
    planned = planned_for(loaded.model, plan.assignment)
    base = loaded.model
    in_memory = load_model(str(path)).model
    quantize_model(in_memory, planned_for(in_memory, plan.assignment), plan, quantizer=profile.quantizer,
                   hessians=gptq_hessians(loaded, profile, planned, progress=False))
    ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, fp = reloaded(ids).logits, in_memory(ids).logits, base(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert (got - fp).abs().max() > 1e-3, f"{family}: the quantization changed nothing"
