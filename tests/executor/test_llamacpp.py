"""Plans carried out and measured by llama.cpp's own tools (executor/llamacpp.py), on a tiny random Llama:
the F16 base, llama-quantize with a plan's type file (types read back, sizes to the byte), the profile's
ΔW equal to what llama-quantize writes, llama-perplexity's perplexity and KL divergence."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitplan.db.types import InvalidInput, Quantizer


def tensors(path):
    import gguf

    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_f16_base_keeps_vectors_in_f32(gguf_checkpoint):
    base = tensors(gguf_checkpoint.parent / "base.gguf")
    assert base["blk.0.attn_q.weight"].tensor_type.name == "F16"
    assert base["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert "output.weight" not in base  # tied: llama.cpp reads token_embd for the head


def test_profile_delta_w_is_what_llama_quantize_writes(gguf_checkpoint, tmp_path):
    """The bytes llama-quantize writes for a tensor are those ggml_quantize_chunk gives the profiler."""
    from bitplan.executor.llamacpp import quantize_gguf
    from bitplan.kernels.llamacpp import quantize_rows

    base = gguf_checkpoint.parent / "base.gguf"
    out = quantize_gguf(base, tmp_path / "q4km.gguf", mix="Q4_K_M")
    src, q = tensors(base), tensors(out)
    kinds = set()
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.0.ffn_gate.weight", "token_embd.weight"):
        t = q[name].tensor_type.name.lower()
        W = np.asarray(src[name].data, dtype=np.float32)
        assert quantize_rows(W, t) == bytes(np.asarray(q[name].data).tobytes()), name
        kinds.add(t)
    assert "q5_0" in kinds or "q8_0" in kinds  # ffn_down's rows of 576 fell back from a K-quant


def gguf_plan(store, gguf_checkpoint, budget: str):
    from bitplan.db.formats import parse_gguf_options
    from bitplan.planner.app.usecases import run_plan
    from bitplan.planner.app.workspace import Workspace
    from bitplan.planner.request import PlanRequest
    from bitplan.profiler.model import load_model
    from bitplan.profiler.profile import profile_model

    loaded = load_model(str(gguf_checkpoint))
    text = gguf_checkpoint.parent / "calib.txt"
    text.write_text("To be, or not to be, that is the question. " * 200)
    profile = profile_model(loaded, parse_gguf_options(None), estimator="fisher", quantizer=Quantizer(method="llamacpp"),
                            calib=str(text), n_tokens=256, seq_len=128, progress=False, embeddings="plan")
    ws = Workspace(store, progress=False).adopt(str(gguf_checkpoint), loaded)
    profile = store.save_profile(profile)
    # the embedding is 90% of this model's weights: held at 4 bits, the budget is the blocks' to share
    return ws, profile, run_plan(ws, profile, PlanRequest(budget=budget, pins=("model.embed_tokens<=4",)))


def test_plan_through_llama_quantize_has_the_planned_types_and_size(store, gguf_checkpoint, tmp_path):
    from bitplan.executor.export import llamacpp_types
    from bitplan.executor.llamacpp import gguf_tensor_bytes
    from bitplan.planner.app.usecases import run_apply

    ws, profile, plan = gguf_plan(store, gguf_checkpoint, "4.65bpw")
    assert plan.params.get("engine", "llamacpp") == "llamacpp"
    out = run_apply(ws, plan, tmp_path / "plan.gguf", fmt="gguf")
    written = {n: t.tensor_type.name.lower() for n, t in tensors(out).items()}
    planned = llamacpp_types(plan, profile.modules)
    assert len(set(planned.values())) > 2  # a mixed plan
    assert {n: written[n] for n in planned} == planned
    # the plan's size is the file's tensor data to the byte (norms in F32 included)
    assert gguf_tensor_bytes(out) * 8 == plan.total_bits + plan.fixed_bits
    assert out.stat().st_size - gguf_tensor_bytes(out) < 4 * 2**20  # header and metadata (the vocabulary)
    with pytest.raises(InvalidInput, match="exists"):
        run_apply(ws, plan, out, fmt="gguf")
    with pytest.raises(InvalidInput, match="--out NAME.gguf"):
        run_apply(ws, plan, tmp_path / "plan-dir", fmt="gguf")


def test_llama_perplexity_measures_ppl_and_kl_to_the_base(store, gguf_checkpoint, tmp_path):
    from bitplan.planner.app.usecases import run_apply, run_eval

    ws, profile, plan = gguf_plan(store, gguf_checkpoint, "4.55bpw")
    out = run_apply(ws, plan, tmp_path / "plan.gguf", fmt="gguf")
    ev = run_eval(ws, str(out), tokens=1024, window=256)  # the file names its plan, whose model is the base
    assert ev.engine == "llamacpp" and ev.plan_id == plan.id and ev.window == 256
    assert ev.n_tokens == 4 * 128 and np.isfinite(ev.perplexity) and ev.perplexity > 1
    assert ev.kl_divergence is not None and ev.kl_divergence > 0
    assert ev.bytes_on_disk == out.stat().st_size
    base = run_eval(ws, str(ws.base_gguf(str(gguf_checkpoint))), tokens=1024, window=256,
                    base=str(gguf_checkpoint))
    assert base.kl_divergence is not None and abs(base.kl_divergence) < 1e-4  # the base against itself
    assert store.get_evaluation(ev.id).kl_divergence == ev.kl_divergence


def test_an_architecture_the_converter_does_not_know_is_refused_first(gguf_checkpoint, tmp_path):
    import shutil

    from bitplan.executor.llamacpp import base_gguf

    odd = tmp_path / "odd"
    shutil.copytree(gguf_checkpoint, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidInput, match="does not know the architecture NoSuchModelForCausalLM"):
        base_gguf(str(odd), tmp_path / "odd.gguf")
    assert not (tmp_path / "odd.gguf").exists()


def test_an_importance_matrix_weighs_the_profile_as_it_weighs_llama_quantize(store, gguf_checkpoint, tmp_path):
    """`--imatrix calibration`: llama-imatrix on the calibration text; the profile's ΔW of each tensor is
    the bytes llama-quantize writes with that file (and not those it writes without), and the plan is
    applied with the same file."""
    from bitplan.executor.llamacpp import quantize_gguf
    from bitplan.kernels.llamacpp import quantize_rows
    from bitplan.planner.app.usecases import ProfileRequest, run_apply, run_plan, run_profile
    from bitplan.planner.app.workspace import Workspace
    from bitplan.planner.request import PlanRequest
    from bitplan.profiler.imatrix import importance_rows, read_imatrix
    from bitplan.profiler.model import load_model, planned_linears

    text = tmp_path / "calib.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 200)
    loaded = load_model(str(gguf_checkpoint))
    ws = Workspace(store, progress=False).adopt(str(gguf_checkpoint), loaded)
    profile = run_profile(ws, str(gguf_checkpoint), ProfileRequest(
        engine="llamacpp", imatrix="calibration", estimator="fisher", calib=str(text), tokens=512, seq_len=128,
        options="q4_k,q5_0,q6_k,q8_0"))
    key = profile.quantizer.imatrix
    assert key is not None and profile.quantizer.label == f"llamacpp:imatrix={key}"
    assert Quantizer.parse(profile.quantizer.label) == profile.quantizer
    imatrix = ws.imatrix(key)
    base = gguf_checkpoint.parent / "base.gguf"
    out = quantize_gguf(base, tmp_path / "q4km-imatrix.gguf", mix="Q4_K_M", imatrix=imatrix)
    importance = importance_rows(read_imatrix(imatrix), [m for m, _ in planned_linears(loaded.model)])
    src, q = tensors(base), tensors(out)
    changed = 0
    for module, name in (("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"),
                         ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight")):
        t = q[name].tensor_type.name.lower()
        W = np.asarray(src[name].data, dtype=np.float32)
        written = bytes(np.asarray(q[name].data).tobytes())
        assert quantize_rows(W, t, importance[module]) == written, name
        changed += quantize_rows(W, t) != written
    assert changed  # the importance matrix changed what was written

    plan = run_plan(ws, profile, PlanRequest(budget="5.5bpw", pins=("model.embed_tokens<=4",)))
    applied = run_apply(ws, plan, tmp_path / "plan.gguf", fmt="gguf")
    import gguf

    fields = gguf.GGUFReader(applied).fields
    assert "quantize.imatrix.file" in fields and "quantize.imatrix.entries_count" in fields
