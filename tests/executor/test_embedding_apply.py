"""A planned embedding through apply, load and the exports: the reloaded model computes what the
in-memory quantized one does, a tied pair is one stored tensor read by the lookup and the head, and
formats that cannot carry a quantized embedding refuse it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from bitplan.db.types import InvalidInput, Option
from bitplan.executor.apply import apply_plan, quantize_model
from bitplan.executor.evaluate import dense_twin
from bitplan.executor.export import export_plan
from bitplan.executor.foreign import load_foreign
from bitplan.executor.load import load_quantized
from bitplan.executor.quant_linear import QuantEmbedding, QuantLinear, QuantTiedHead
from bitplan.kernels.quantize import rtn
from bitplan.profiler.model import planned_linears


@pytest.fixture(scope="module")
def models(loaded, untied_loaded):
    """The tiny Llama by whether its head is tied to its embedding."""
    return {True: loaded, False: untied_loaded}


def mixed(m) -> Option:
    """The embedding at 4 bits (groups of 32 inside each 96-wide row), the head at 8, the rest mixed."""
    if m.role == "embed_tokens":
        return Option(bits=4, group_size=32)
    if m.role == "lm_head":
        return Option(bits=8, group_size=32)
    return Option(bits={"q_proj": 3, "k_proj": 4, "v_proj": 8, "o_proj": 2}.get(m.role, 4), group_size=64)


@pytest.mark.parametrize("tie", [True, False])
def test_reloaded_embedding_gives_the_in_memory_logits(models, tie, tmp_path, manual_plan, logits):
    loaded = models[tie]
    planned = planned_linears(loaded.model, embeddings=True)
    plan = manual_plan(planned, mixed)
    out = apply_plan(plan, loaded.model, loaded.tokenizer, planned, tmp_path / "q", progress=False)
    reloaded, _, qc = load_quantized(out)
    assert qc["modules"]["model.embed_tokens"]["bits"] == 4
    in_memory = copy.deepcopy(loaded.model)
    quantize_model(in_memory, planned_linears(in_memory, embeddings=True), plan)
    ids = torch.randint(0, loaded.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    want, got, base = logits(in_memory, ids), logits(reloaded, ids), logits(loaded.model, ids)
    assert torch.equal(got, want)
    assert (got - base).abs().max() > 1e-3
    emb = reloaded.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding) and isinstance(in_memory.get_input_embeddings(), QuantEmbedding)
    keys = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert "model.embed_tokens" in keys and ("lm_head" in keys) != tie
    from safetensors import safe_open
    with safe_open(out / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    assert "model.embed_tokens.qweight_s0" in stored and "model.embed_tokens.weight" not in stored
    if tie:  # one stored tensor, read by both: the head is the embedding's packed weight as a linear
        assert not any(k.startswith("lm_head.") for k in stored)
        head = reloaded.get_output_embeddings()
        assert isinstance(head, QuantTiedHead) and head.embedding is emb
        x = torch.randn(3, emb.embedding_dim)
        torch.testing.assert_close(head(x), x @ emb.dequantized_weight().T)
    else:
        assert isinstance(reloaded.get_output_embeddings(), QuantLinear)
    # the speed test's unquantized twin: plain modules holding the same values, a tied pair tied again
    twin = dense_twin(reloaded, torch.float32)
    assert type(twin.get_input_embeddings()) is torch.nn.Embedding
    assert (twin.get_output_embeddings().weight is twin.get_input_embeddings().weight) == tie
    torch.testing.assert_close(logits(twin, ids), got, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("option", [Option(bits=3, group_size=32), Option(bits=4, group_size=64, symmetric=True),
                                    Option(bits=8, group_size=None)])
def test_a_lookup_dequantizes_the_gathered_rows(option):
    W = torch.randn(300, 96, generator=torch.Generator().manual_seed(0))
    emb = QuantEmbedding.from_quantized(rtn(W, option))
    ids = torch.tensor([[5, 299, 0, 5], [17, 17, 3, 250]])
    rows = emb(ids)
    assert rows.shape == (2, 4, 96) and rows.dtype == torch.float32
    assert torch.equal(rows, emb.dequantized_weight()[ids])
    assert torch.equal(emb.dequantized_weight(), rtn(W, option).dequantize())
    assert emb.to(torch.bfloat16)(ids).dtype == torch.bfloat16


@pytest.mark.parametrize("tie", [True, False])
def test_llamacpp_types_name_the_embedding(models, tie, tmp_path, manual_plan):
    loaded = models[tie]
    planned = planned_linears(loaded.model, embeddings=True)
    # rows of 96: legacy types only (Q4_0 / Q8_0)
    plan = manual_plan(planned, lambda m: Option(bits=8 if m.role == "embed_tokens" else 4, group_size=32))
    out = export_plan(plan, loaded.model, loaded.tokenizer, planned, tmp_path / "gguf", "llamacpp", progress=False)
    lines = (out / "tensor_types.txt").read_text().splitlines()
    assert r"^token_embd\.weight$=q8_0" in lines
    assert (r"^output\.weight$=q4_0" in lines) != tie  # a tied pair is token_embd alone


@pytest.mark.parametrize("fmt", ["gptqmodel", "compressed-tensors"])
def test_gptq_formats_refuse_a_quantized_embedding(models, fmt, tmp_path, manual_plan, logits):
    loaded = models[False]
    planned = planned_linears(loaded.model, embeddings=True)
    vllm = lambda m: Option(bits=4, group_size=32)  # noqa: E731 (every dimension x 4 bits fills whole words)
    head = lambda m: Option(bits=8, group_size=32) if m.role == "lm_head" else vllm(m)  # noqa: E731 (300 outputs)
    with pytest.raises(InvalidInput, match="cannot carry a quantized embedding.*--embeddings keep"):
        export_plan(manual_plan(planned, head), loaded.model, loaded.tokenizer, planned, tmp_path / "no", fmt,
                    progress=False)
    assert not (tmp_path / "no").exists()
    # the embedding kept at 16 bits: written as the plan says, and the untied quantized head reloads
    plan = manual_plan(planned, lambda m: Option(bits=16) if m.role == "embed_tokens" else head(m))
    out = export_plan(plan, loaded.model, loaded.tokenizer, planned, tmp_path / "ok", fmt, progress=False)
    assert "embed_tokens" not in (out / "config.json").read_text()
    model, _, _ = load_foreign(out)
    assert isinstance(model.get_output_embeddings(), QuantLinear)
    own = apply_plan(plan, loaded.model, loaded.tokenizer, planned, tmp_path / "own", progress=False)
    ids = torch.randint(0, loaded.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(model, ids), logits(load_quantized(own)[0], ids))
