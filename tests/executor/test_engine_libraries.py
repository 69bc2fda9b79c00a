"""Our exports, loaded by the libraries their users run: transformers with compressed-tensors
(`--format compressed-tensors`) and GPTQModel (`--format gptqmodel`).  Each gives the logits of the same
plan applied in our own format and loaded by `load_quantized`.

Tolerances (logits of these tiny random models are ~1 in size; one quantization step moves them by
~0.05-0.1, which every test checks against the unquantized model):
- transformers, compressed weights (the default): decompressed on the first forward pass in float32 from the
  same codes, fp16 scales and zeros as ours: `atol=1e-4` (measured 0 on the dense Llama, 3.6e-5 on the
  Mixtral, whose experts transformers runs as one batched matmul);
- transformers, `dequantize=True`: compressed-tensors dequantizes in the scales' dtype (fp16) before the
  float32 model runs: `atol=1e-3` (measured 2.6e-4);
- GPTQModel's CPU kernel (`TorchLinear`) computes in bfloat16 only: its dequantized weights must equal ours
  to bf16 rounding (each within 2^-7 of the module's largest weight, and on average within 2^-8 of the mean
  weight, which one step off in a code, zero or scale exceeds), and its logits ours within `atol=2e-2` (bf16
  through two layers; measured 5e-3).  The weight check is what catches a wrong layout or zero here.

GPTQModel (7.7.0, in the `engines` extra beside compressed-tensors) runs in a child process of this same
interpreter: importing it patches safetensors' `save_file`, Triton and transformers' GPTQ quantizer, which the
other tests of this process must not see.  Where the extra is installed, a GPTQModel that is missing or fails
fails the test; it is never skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bitplan.db.types import Option
from bitplan.executor.apply import apply_plan
from bitplan.executor.export import export_plan, pack_words
from bitplan.executor.load import load_quantized
from bitplan.profiler.model import load_model, planned_linears

ct = pytest.importorskip("compressed_tensors", reason="the `engines` extra: pip install -e '.[engines]'")

COMPRESSED_ATOL = 1e-4
DEQUANTIZED_ATOL = 1e-3


def symmetric_mixed(m) -> Option:
    """2, 3, 4 and 8 bits, grouped and per-channel, and 16 bits, all symmetric (asymmetric: see below)."""
    return {"q_proj": Option(bits=4, group_size=32, symmetric=True),
            "k_proj": Option(bits=8, group_size=32, symmetric=True),
            "v_proj": Option(bits=8, group_size=None, symmetric=True), "o_proj": Option(bits=16),
            "gate_proj": Option(bits=2, group_size=32, symmetric=True),
            "up_proj": Option(bits=3, group_size=32, symmetric=True),
            "down_proj": Option(bits=4, group_size=32, symmetric=True)}[m.name.rsplit(".", 1)[1]]


def own_logits(plan, loaded, planned, directory, ids, logits):
    """Logits of `plan` in our own format, reloaded, and of the unquantized model."""
    own = apply_plan(plan, loaded.model, loaded.tokenizer, planned, directory, progress=False)
    return logits(load_quantized(own)[0], ids), logits(loaded.model, ids)


def hf_logits(export_dir, ids, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(ids).logits


def token_ids(vocab_size: int):
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------- compressed-tensors


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_is_compressed_tensors_own(bits, dim):
    """`pack_words` equals compressed-tensors' `pack_to_int32` (signed codes offset by 2^(b-1)), 3/5/6-bit
    codes straddling words included, and its `unpack_from_int32` reads ours back."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    q = torch.randint(0, 2**bits, (45, 70), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    packed = pack_words(q, bits, dim)
    assert torch.equal(packed, pack_to_int32((q - 2 ** (bits - 1)).to(torch.int8), bits, packed_dim=dim))
    back = unpack_from_int32(packed, bits, q.shape, packed_dim=dim).to(torch.int32) + 2 ** (bits - 1)
    assert torch.equal(back, q)


def test_config_validates_with_compressed_tensors(loaded, tmp_path, manual_plan):
    from compressed_tensors.quantization import QuantizationConfig

    planned = planned_linears(loaded.model)
    plan = manual_plan(planned, symmetric_mixed)
    out = export_plan(plan, loaded.model, None, planned, tmp_path / "ct", "compressed-tensors", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qc)
    assert config.format == "pack-quantized" and config.quantization_status == "compressed"
    schemes = {(g.weights.num_bits, g.weights.strategy, g.weights.group_size, g.weights.symmetric)
               for g in config.config_groups.values()}
    assert schemes == {(2, "group", 32, True), (3, "group", 32, True), (4, "group", 32, True),
                       (8, "group", 32, True), (8, "channel", None, True)}
    assert sorted(config.ignore) == [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]


def test_partial_groups_are_refused(loaded, tmp_path, manual_plan):
    """compressed-tensors raises on a group size that does not divide the inputs (hidden size 96)."""
    from bitplan.db.types import InvalidInput

    planned = planned_linears(loaded.model)
    plan = manual_plan(planned, lambda m: Option(bits=4, group_size=64, symmetric=True))
    with pytest.raises(InvalidInput, match="96 inputs and group size 64"):
        export_plan(plan, loaded.model, None, planned, tmp_path / "ct", "compressed-tensors", progress=False)
    assert not (tmp_path / "ct").exists()


def test_transformers_loads_mixed_widths(loaded, tmp_path, manual_plan, logits):
    """2/3/4/8 bits and 16 in one plan, loaded as users load it (compressed, decompressed on CPU)."""
    planned = planned_linears(loaded.model)
    plan = manual_plan(planned, symmetric_mixed)
    ids = token_ids(loaded.model.config.vocab_size)
    expected, base = own_logits(plan, loaded, planned, tmp_path / "own", ids, logits)
    out = export_plan(plan, loaded.model, loaded.tokenizer, planned, tmp_path / "ct", "compressed-tensors",
                      progress=False)
    got = hf_logits(out, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=COMPRESSED_ATOL)
    assert (got - base).abs().max() > 1e-2  # the quantization did something


def test_transformers_loads_asymmetric_dequantized(loaded, tmp_path, manual_plan, logits):
    """Asymmetric (packed zero points): transformers 5.25 with compressed-tensors 0.20 loads them only with
    `dequantize=True` (compressed, it builds unpacked zero points and refuses the packed ones), and then
    with one scheme for every module: a plan of one asymmetric option."""
    from transformers import CompressedTensorsConfig

    planned = planned_linears(loaded.model)
    plan = manual_plan(planned, lambda m: Option(bits=4, group_size=32, symmetric=False))
    ids = token_ids(loaded.model.config.vocab_size)
    expected, base = own_logits(plan, loaded, planned, tmp_path / "own", ids, logits)
    out = export_plan(plan, loaded.model, None, planned, tmp_path / "ct", "compressed-tensors", progress=False)
    got = hf_logits(out, ids, quantization_config=CompressedTensorsConfig(dequantize=True))
    torch.testing.assert_close(got, expected, rtol=0, atol=DEQUANTIZED_ATOL)
    assert (got - base).abs().max() > 1e-2


def test_transformers_loads_mixtral(moe_checkpoint, tmp_path, manual_plan, logits):
    """Experts under Mixtral's checkpoint names (`block_sparse_moe.experts.E.w1`), which transformers fuses on
    load; attention at 8 bits, experts at 4 (transformers runs every expert with one scheme), router 16."""
    loaded = load_model(str(moe_checkpoint("mixtral")))
    planned = planned_linears(loaded.model)
    plan = manual_plan(planned, lambda m: Option(bits=4 if m.expert is not None else 8, group_size=32,
                                                 symmetric=True))
    ids = token_ids(loaded.model.config.vocab_size)
    expected, base = own_logits(plan, loaded, planned, tmp_path / "own", ids, logits)
    out = export_plan(plan, loaded.model, None, planned, tmp_path / "ct", "compressed-tensors", progress=False)
    got = hf_logits(out, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=COMPRESSED_ATOL)
    assert (got - base).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------- GPTQModel

GPTQMODEL_SCRIPT = textwrap.dedent("""
    import sys, torch
    from gptqmodel import BACKEND, GPTQModel
    export, inputs, result = sys.argv[1:]
    model = GPTQModel.load(export, device="cpu", backend=BACKEND.TORCH, dtype=torch.bfloat16).model.eval()
    ids = torch.load(inputs)
    weights = {name: (m.bits, m.dequantize_weight().T.float()) for name, m in model.named_modules()
               if hasattr(m, "dequantize_weight") and hasattr(m, "qweight")}
    with torch.no_grad():
        torch.save({"logits": model(ids).logits.float(), "weights": weights}, result)
""")


@pytest.mark.slow
def test_gptqmodel_loads_dynamic_export(loaded, tmp_path, manual_plan, logits):
    """GPTQModel's own loader and CPU kernel on a `dynamic` export (4-bit at the top, 8- and 3-bit rules,
    one module kept at 16 bits by a `-:` rule), run in a child process (see the top of this file)."""
    assert importlib.util.find_spec("gptqmodel"), "gptqmodel is not installed: the `engines` extra pins it"
    planned = planned_linears(loaded.model)

    def choose(m):
        leaf = m.name.rsplit(".", 1)[1]
        if leaf == "o_proj" and m.layer == 1:
            return Option(bits=16)
        bits = {"o_proj": 8, "down_proj": 8, "up_proj": 3}.get(leaf, 4)
        return Option(bits=bits, group_size=32, symmetric=True)

    plan = manual_plan(planned, choose)
    ids = token_ids(loaded.model.config.vocab_size)
    own = apply_plan(plan, loaded.model, None, planned, tmp_path / "own", progress=False)
    ours = load_quantized(own)[0]
    expected, base = logits(ours, ids), logits(loaded.model, ids)
    out = export_plan(plan, loaded.model, loaded.tokenizer, planned, tmp_path / "g", "gptqmodel", progress=False)
    torch.save(ids, tmp_path / "ids.pt")
    run = subprocess.run([sys.executable, "-c", GPTQMODEL_SCRIPT, str(out), str(tmp_path / "ids.pt"),
                          str(tmp_path / "r.pt")],
                         capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(tmp_path / "r.pt")
    weights = result["weights"]
    assert set(weights) == {m.name for m, _ in planned if plan.assignment[m.name].quantized}
    for m, _ in planned:
        option = plan.assignment[m.name]
        if option.quantized:
            bits, w = weights[m.name]
            assert bits == option.bits, m.name
            want = ours.get_submodule(m.name).dequantized_weight()
            # bf16 keeps 8 significant bits of s·q − s·z, whose terms reach twice the largest weight
            torch.testing.assert_close(w, want, rtol=0, atol=2**-7 * float(want.abs().max()),
                                       msg=lambda text, name=m.name: f"{name}: {text}")
            # and rounds without bias: one step off in a code, zero or scale (8 bits included) is not
            assert float((w - want).abs().mean()) < 2**-8 * float(want.abs().mean()), m.name
    torch.testing.assert_close(result["logits"], expected, rtol=0, atol=2e-2)
    assert (result["logits"] - base).abs().max() > 5e-2
