"""The input embedding as a planned module (`--embeddings plan`): one module (a tied head with it),
estimated by every estimator, RTN whatever the quantizer, restricted to 4 bits or more, and what it
buys: a size budget a 16-bit embedding cannot reach."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bitplan.db.types import (EMBED_ROLE, InfeasibleBudget, InvalidInput, Module, Option, Profile, Quantizer,
                              parse_options)
from bitplan.kernels.quantize import quantize_dequantize
from bitplan.planner.plan import allocate
from bitplan.planner.request import PlanRequest
from bitplan.profiler.fitness import KLFitness
from bitplan.profiler.kl import kl_table
from bitplan.profiler.model import fixed_bits, planned_linears
from bitplan.profiler.profile import profile_model

OPTIONS = parse_options("2,3,4,8")


def test_a_tied_pair_is_one_module(loaded):
    model = loaded.model
    planned = planned_linears(model, embeddings=True)
    m, emb = planned[0]
    assert (m.name, m.role, m.layer, m.shape) == ("model.embed_tokens", EMBED_ROLE, None, tuple(emb.weight.shape))
    assert emb is model.get_input_embeddings() and model.lm_head.weight is emb.weight
    assert not any(m.role == "lm_head" for m, _ in planned)  # the embedding stands for the pair
    # counted once, by the module: nothing of the pair is left in the fixed bits (only the norms)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert fixed_bits(model, planned) == 16 * norms
    assert [m.name for m, _ in planned_linears(model)] == [m.name for m, _ in planned[1:]]  # keep: as before


def test_an_untied_head_stays_a_module_of_its_own(untied_loaded):
    planned = planned_linears(untied_loaded.model, embeddings=True)
    roles = [m.role for m, _ in planned]
    assert roles[0] == EMBED_ROLE and roles[-1] == "lm_head" and roles.count(EMBED_ROLE) == 1


@pytest.mark.parametrize("estimator", ["hessian", "fisher"])
def test_profile_plans_the_embedding(loaded, text_file, estimator):
    kw = dict(estimator=estimator, calib=str(text_file), n_tokens=256, seq_len=64, progress=False)
    keep = profile_model(loaded, OPTIONS, quantizer=Quantizer(), **kw)
    plan = profile_model(loaded, OPTIONS, quantizer=Quantizer(), embeddings="plan", **kw)
    assert not keep.plan_embeddings and plan.plan_embeddings
    assert keep.id != plan.id and keep.modules == plan.modules[1:]
    assert np.array_equal(keep.error, plan.error[1:])  # the other rows are not touched
    row = plan.error[0]
    assert np.all(row > 0) and np.all(np.diff(row) < 0)
    assert plan.fixed_bits == keep.fixed_bits - 16 * plan.modules[0].numel
    # GPTQ profiles quantize the embedding with RTN: a one-hot input has no correlation to spread errors over
    gptq = profile_model(loaded, OPTIONS, quantizer=Quantizer(method="gptq"), embeddings="plan", **kw)
    assert np.array_equal(gptq.error[0], row)


def test_hessian_of_a_tied_pair_adds_the_head(loaded, untied_loaded, text_file):
    """Lookup term `Σ counts_v ||ΔW_v||²` alone for an untied embedding; the tied pair's head adds its own."""
    from bitplan.profiler.calibration import token_batches

    kw = dict(estimator="hessian", quantizer=Quantizer(), calib=str(text_file), n_tokens=256, seq_len=64,
              progress=False, embeddings="plan")
    batches, _ = token_batches(untied_loaded.tokenizer, str(text_file), 256, 64)
    W = untied_loaded.model.get_input_embeddings().weight.detach()
    counts = torch.bincount(batches.reshape(-1), minlength=W.shape[0]).double()
    dW = (quantize_dequantize(W, OPTIONS[0]) - W).double()
    lookup = float(counts @ (dW ** 2).sum(1)) / batches.numel()
    assert profile_model(untied_loaded, OPTIONS, **kw).error[0, 0] == pytest.approx(lookup, rel=1e-9)
    W = loaded.model.get_input_embeddings().weight.detach()
    dW = (quantize_dequantize(W, OPTIONS[0]) - W).double()
    lookup = float(counts @ (dW ** 2).sum(1)) / batches.numel()
    assert profile_model(loaded, OPTIONS, **kw).error[0, 0] > 1.01 * lookup


def quantized_copy(model, option):
    """The model with the embedding (and so a tied head) replaced by its RTN values: the truth KL measures."""
    q = copy.deepcopy(model)
    emb = q.get_input_embeddings()
    emb.weight.data = quantize_dequantize(emb.weight.data, option)
    return q


def kl_to(model, other, ids):
    with torch.no_grad():
        p = torch.log_softmax(model(ids).logits.float(), -1)
        q = torch.log_softmax(other(ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("tie", [True, False])
def test_kl_and_fitness_swap_the_weight_the_model_uses(loaded, untied_loaded, tie):
    """Measured KL of the embedding alone equals a model whose embedding (and tied head) really changed."""
    model = (loaded if tie else untied_loaded).model
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    planned = planned_linears(model, embeddings=True)[:1]
    two = Option(bits=2)
    truth = kl_to(model, quantized_copy(model, two), ids)
    assert truth > 1e-4
    measured = kl_table(model, planned, [two], ids, progress=False)[0, 0]
    assert measured == pytest.approx(truth, rel=1e-4)
    truth = kl_to(model, quantized_copy(model, two), ids[1:])
    with KLFitness(model, planned, [two, Option(bits=8)], ids[:1], ids[1:], device="cpu") as oracle:
        assert oracle.layer[0] == 0  # the embedding changes every block's input
        assert oracle.heldout(np.array([0])) == pytest.approx(truth, rel=1e-4)
        if tie:
            assert model.lm_head.weight is model.get_input_embeddings().weight
        assert oracle.fitness(np.array([0]), [0]) > oracle.fitness(np.array([1]), [0]) > 0
    assert kl_to(model, copy.deepcopy(model), ids) == 0.0  # the original weight is back


def embedding_profile() -> Profile:
    """A synthetic profile: an embedding that fears 2-bit least of all (so a planner would pick it; 40 % of
    the weights) and 4 linears."""
    modules = [Module(name="model.embed_tokens", shape=(4096, 576), role=EMBED_ROLE)] + [
        Module(name=f"model.layers.{i}.mlp.down_proj", shape=(576, 1536), layer=i, role="down_proj") for i in range(4)]
    options = parse_options("2,3,4,8,16")
    error = np.array([[1e-3 * 4.0 ** -o.bits if o.quantized else 0.0 for o in options] for _ in modules])
    error[1:] *= 100
    size = np.array([[o.size_bits(*m.shape) for o in options] for m in modules])
    return Profile(model={"name": "synthetic"}, estimator="synthetic", options=options, modules=modules,
                   error=error, size_bits=size, id="prof-emb")


@pytest.mark.parametrize("allocator", ["ilp", "greedy", "uniform"])
def test_the_embedding_takes_4_bits_or_more(allocator):
    profile = embedding_profile()
    plan = allocate(profile, PlanRequest(budget="3.2bpw", allocator=allocator))
    assert plan.assignment["model.embed_tokens"].bits >= 4
    # 2.5 bpw would fit the embedding at 2 bits (everything at 2b/g64 is 2.28 bpw), but it may not take it
    with pytest.raises(InfeasibleBudget, match=r"3\.09"):
        allocate(profile, PlanRequest(budget="2.5bpw", allocator=allocator))
    # vLLM quantizes no embedding: its plans leave it at 16 bits, in the fixed bits, as `--embeddings keep` would
    vllm = allocate(profile, PlanRequest(budget="3bpw", allocator="ilp", engine="vllm"))
    emb = profile.modules[0]
    assert emb.name not in vllm.assignment and vllm.fixed_bits == profile.fixed_bits + 16 * emb.numel
    assert vllm.n_params == profile.n_params - emb.numel and vllm.bits_per_weight <= 3
    only_low = profile.model_copy(update={"options": profile.options[:2], "error": profile.error[:, :2],
                                          "size_bits": profile.size_bits[:, :2]})
    with pytest.raises(InvalidInput, match="embedding model.embed_tokens takes 4 bits .*--embeddings keep"):
        allocate(only_low, PlanRequest(budget="3bpw", allocator=allocator))


def test_planning_the_embedding_makes_a_smaller_budget_feasible(loaded, text_file):
    kw = dict(estimator="fisher", quantizer=Quantizer(), calib=str(text_file), n_tokens=256, seq_len=64, progress=False)
    keep = profile_model(loaded, OPTIONS, **kw)
    plan = profile_model(loaded, OPTIONS, embeddings="plan", **kw)
    # the embedding at 4 bits and every linear at 2 fits; with the embedding at 16 bits nothing does
    emb = plan.modules[0]
    smallest = plan.fixed_bits + OPTIONS[2].size_bits(*emb.shape) + sum(plan.size_bits[1:, 0])
    budget = f"{(smallest + 8 * 64) / 8 / 1024:.3f}KiB"
    with pytest.raises(InfeasibleBudget):
        allocate(keep, PlanRequest(budget=budget, allocator="ilp"))
    p = allocate(plan, PlanRequest(budget=budget, allocator="ilp"))
    assert p.assignment[emb.name].bits == 4 and p.total_bits + p.fixed_bits <= smallest + 8 * 64
