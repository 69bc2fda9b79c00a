"""What the executor's tests share: a manual plan of any per-module choice, a model's logits, the check
that a reloaded checkpoint computes what the model quantized in memory computes, and where the Triton
kernels can run.

conftest.py is not importable under `--import-mode=importlib`: each helper is handed out by a fixture.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch


def manual_plan(planned, choose, plan_id: str = "plan-manual-test"):
    """A Plan giving each planned module `choose(module)`, its totals computed (allocator `manual`)."""
    from bitplan.db.types import ModelRef, Plan

    assignment = {m.name: choose(m) for m, _ in planned}
    total = sum(assignment[m.name].size_bits(*m.shape) for m, _ in planned)
    n = sum(m.numel for m, _ in planned)
    return Plan(id=plan_id, profile_id="prof-test", model=ModelRef(name="tiny"), budget="4bpw",
                budget_bits=total, allocator="manual", assignment=assignment, total_bits=total, n_params=n,
                bits_per_weight=total / n, predicted_error=0.0, status="manual", solve_seconds=0.0)


def logits(model, ids):
    """`model(ids).logits`, without gradients."""
    import torch

    with torch.no_grad():
        return model(ids).logits


def assert_reloads_as_in_memory(model, reloaded, plan) -> None:
    """`reloaded` (an applied checkpoint of `plan`, loaded) gives the logits of `model` quantized in memory
    with `plan` (RTN), and not the unquantized model's."""
    import torch

    from bitplan.executor.apply import quantize_model
    from bitplan.profiler.model import planned_linears

    in_memory = copy.deepcopy(model)
    quantize_model(in_memory, planned_linears(in_memory), plan)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, base = reloaded(ids).logits, in_memory(ids).logits, model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the quantization did something


@pytest.fixture(scope="session", name="manual_plan")
def manual_plan_fixture():
    """`manual_plan(planned, choose, plan_id=...)`: see `manual_plan` above."""
    return manual_plan


@pytest.fixture(scope="session", name="logits")
def logits_fixture():
    """`logits(model, ids)`: see `logits` above."""
    return logits


@pytest.fixture(scope="session", name="assert_reloads_as_in_memory")
def assert_reloads_as_in_memory_fixture():
    """`assert_reloads_as_in_memory(model, reloaded, plan)`: see above."""
    return assert_reloads_as_in_memory


@pytest.fixture
def kernel_device() -> str:
    """Where a test of the Triton kernels inside a model runs: `"cuda"` on a GPU, `"cpu"` under
    TRITON_INTERPRET=1; elsewhere the test skips."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("the kernels run on CUDA tensors, or on the CPU under TRITON_INTERPRET=1")


@pytest.fixture
def fp32_tolerance(kernel_device) -> dict:
    """`assert_close`'s tolerance for an fp32 product through the kernels against the reference on
    `kernel_device`: exact to rounding under the interpreter; on a GPU a product may round through TF32 in
    one path and not the other, while a defect (a row missing or doubled) is off by O(1)."""
    return dict(rtol=1e-4, atol=1e-5) if kernel_device == "cpu" else dict(rtol=1e-2, atol=1e-2)
