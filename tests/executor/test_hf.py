"""transformers' own `from_pretrained` loads a bitplan checkpoint (executor/hf.py): the logits of
`load_quantized`, with every width, a quantized tied embedding, MoE experts, and dtype/device_map as
users pass them."""

from __future__ import annotations

import json

import pytest
import torch

from bitplan.db.types import Option
from bitplan.executor.apply import apply_plan
from bitplan.executor.load import load_quantized
from bitplan.executor.quant_linear import QuantEmbedding, QuantLinear
from bitplan.profiler.model import load_model, planned_linears

WIDTHS = {"q_proj": 3, "k_proj": 4, "v_proj": 8, "o_proj": 2, "gate_proj": 4, "up_proj": 3, "down_proj": 2}


def mixed(m) -> Option:
    if m.role == "embed_tokens":
        return Option(bits=4, group_size=32)
    if m.role == "lm_head":
        return Option(bits=8, group_size=32)
    bits = WIDTHS.get(m.role, 4) if m.expert is None else (2, 3, 4, 8)[m.expert % 4]
    return Option(bits=bits, group_size=32, symmetric=m.role == "v_proj")


def from_pretrained(path, **kwargs):
    import bitplan.executor.hf  # noqa: F401  registers quant_method "bitplan"
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def write(source, out, manual_plan):
    loaded = load_model(str(source))
    planned = planned_linears(loaded.model, embeddings=True)
    return apply_plan(manual_plan(planned, mixed), loaded.model, loaded.tokenizer, planned, out, progress=False)


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_from_pretrained_gives_load_quantized_logits(kind, tiny_checkpoint, moe_checkpoint, tmp_path, manual_plan,
                                                      logits):
    source = tiny_checkpoint if kind == "llama" else moe_checkpoint("mixtral")
    out = write(source, tmp_path / "q", manual_plan)
    theirs = from_pretrained(out)
    assert theirs.dtype == torch.bfloat16  # transformers' default: the stored dtype
    ours, _, _ = load_quantized(out, dtype=torch.bfloat16)
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(theirs, ids), logits(ours, ids))
    quantized = [m for m in theirs.modules() if isinstance(m, QuantLinear)]
    assert {m.option.bits for m in quantized} == {2, 3, 4, 8}
    assert all(m.scales.dtype == torch.float16 for m in quantized)
    assert theirs.is_quantized and theirs.config.quantization_config.quant_method == "bitplan"
    if kind == "llama":
        assert isinstance(theirs.get_input_embeddings(), QuantEmbedding)


def test_dtype_and_device_map_as_users_pass_them(tiny_checkpoint, tmp_path, manual_plan, logits):
    out = write(tiny_checkpoint, tmp_path / "q", manual_plan)
    ours, _, _ = load_quantized(out, dtype=torch.float32)
    theirs = from_pretrained(out, dtype=torch.float32, device_map="cpu")
    ids = torch.randint(0, ours.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    got = logits(theirs, ids)
    assert got.dtype == torch.float32 and torch.equal(got, logits(ours, ids))
    layer = theirs.model.layers[0].self_attn.q_proj
    assert layer.scales.dtype == torch.float16 and theirs.model.norm.weight.dtype == torch.float32
    assert {p.device.type for p in theirs.parameters()} == {"cpu"}


def test_another_checkpoint_format_is_named(tiny_checkpoint, tmp_path, manual_plan):
    out = write(tiny_checkpoint, tmp_path / "q", manual_plan)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format"] = "bitplan.packed/0"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match=r"bitplan's format 'bitplan.packed/0'; this bitplan reads 'bitplan.packed/1'"):
        from_pretrained(out)
