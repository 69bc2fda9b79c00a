"""Profiling a model larger than this machine's memory: weights streamed from disk, one block at a time.

Writes a random-weight Llama-shaped bf16 checkpoint of about `--size-gb` GB (shard by shard: writing holds
one shard; the tokenizer is the embedded SmolLM2's), then, in this process, loads it with
`load_model(stream_weights="on")` (a skeleton on `meta`; the fingerprint reads each tensor once, one at a
time) and profiles it with `--estimator hessian` on a few hundred calibration tokens (CPU).  Peak RSS is
read from the kernel (`VmHWM`, reset through `/proc/self/clear_refs` between phases, and a thread sampling
`VmRSS`), set against the formula of docs/profiling.md ("Streamed weights"):

    peak ≈ base + W_b + 8 · Σ_b K² + T · d · 4 + E      (float32 weights, float64 H)
    E = 12 · max N·K + min(24 · max N·K, 3 · CHUNK_BYTES)

`base` the process before profiling (Python, torch, transformers), `W_b` one block's weights in float32,
`Σ_b K²` over the block's planned matrices (each one's float64 `H`), `T · d · 4` the carried activations,
`E` the error table's temporaries for the largest matrix (W, Ŵ, ΔW in float32; ΔW's rows in float64, their
product with `H` and that times the rows, `CHUNK_BYTES` of rows at a time: profiler/estimators.py).
Then the best uniform plan is applied with the weights streamed too (`executor.apply.apply_plan_streamed`:
one block in memory, the output written from parts), its peak RSS reported the same way.  The parts
outside the blocks (embedding, final norm, head) are read for the passes that run them, never with a
block.  The checkpoint is deleted at the end unless `--keep`; free disk is checked first
(at least 15 GB must stay free).  Prints a table and writes `bench/results/big_model.json`.

    nice -n 10 python bench/big_model.py [--size-gb 30] [--hidden 4096 --intermediate 14336] [--tokens 256]
                                         [--folder DIR] [--keep] [--reuse [--eval-only]]
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

GB, GiB, MiB = 10**9, 2**30, 2**20
KEEP_FREE = 15 * GB  # what the checkpoint must leave free on its disk


def shapes(args) -> dict[str, tuple[int, ...]]:
    """Every tensor of one decoder block (names after `model.layers.<i>.`), Llama's layout."""
    d, f, hd = args.hidden, args.intermediate, args.hidden // args.heads
    kv = args.kv_heads * hd
    return {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
            "self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (kv, d),
            "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, d),
            "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_checkpoint(folder: Path, args, vocab: int) -> dict:
    """A random bf16 Llama in `folder`, one shard (about `--shard-gb`) in memory at a time; its config."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    block = shapes(args)
    # a tied head: an untied one, planned, takes a second streamed pass for its H (profiler/stream.py
    # `outside_hessians`), doubling the time without changing the peak's formula
    outside = {"model.embed_tokens.weight": (vocab, args.hidden), "model.norm.weight": (args.hidden,)}
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=4096, tie_word_embeddings=True,
                      dtype="bfloat16")
    cfg.save_pretrained(folder)
    tensors = list(outside.items()) + [(f"model.layers.{i}.{k}", s) for i in range(args.layers)
                                       for k, s in block.items()]
    g = torch.Generator().manual_seed(0)
    shards, current, size = [], [], 0
    for name, shape in tensors:
        current.append((name, shape))
        size += 2 * numel(shape)
        if size >= args.shard_gb * GB:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    weight_map = {}
    for j, shard in enumerate(shards):
        fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        # std 0.02 weights, unit norms: the activations of a random model stay finite through many layers
        data = {n: (torch.ones(s, dtype=torch.bfloat16) if len(s) == 1 else
                    (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)) for n, s in shard}
        save_file(data, folder / fname, metadata={"format": "pt"})
        del data
        weight_map.update({n: fname for n, _ in shard})
        print(f"  wrote {fname} ({j + 1}/{len(shards)})", flush=True)
    total = sum(2 * numel(s) for _, s in tensors)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return {"bytes": total, "shards": len(shards)}


def eval_phase(loaded, args, sampler) -> dict:
    """Perplexity of the (random) model on `--eval-tokens` of the held-out plays, its weights streamed: what
    `bitplan eval` does with a model larger than memory (the figure itself means nothing for random weights)."""
    from bitplan.executor.evaluate import eval_windows, perplexity

    windows = eval_windows(loaded.tokenizer, tokens=args.eval_tokens, window=args.seq_len)
    harness.reset_peak()
    sampler.peak = 0
    before = harness.rss()
    t = time.perf_counter()
    ppl = perplexity(loaded.model, windows.ids, progress=False)
    return {"phase": f"eval (streamed, {windows.ids.numel()} tokens)", "seconds": time.perf_counter() - t,
            "before": before, "peak": harness.rss("VmHWM"), "sampled": sampler.peak, "perplexity": ppl}


def phase_table(rows: list[dict], title: str | None = None) -> str:
    """The phases' table (each row gains its RSS figures in GiB, kept in the result)."""
    for r in rows:
        r["peak_gib"] = r["peak"] / GiB
        r["before_gib"] = r.get("before", 0) / GiB or None
    return harness.table(rows, [("phase", "phase", "<"), ("time s", "seconds", ".0f"),
                                ("RSS before GiB", "before_gib", ".2f"), ("peak RSS GiB", "peak_gib", ".2f"),
                                ("perplexity", lambda r: r.get("perplexity"), ".1f")], title=title)


def formula(args, n_tokens: int, vocab: int) -> dict:
    """The streamed-weights peak's terms in bytes (float32 weights and activations, float64 H): the block
    pass's, or recording block 0's inputs with the embedding read, whichever is larger."""
    block = shapes(args)
    W_b = 4 * sum(numel(s) for s in block.values())
    H = 8 * sum(s[1] ** 2 for s in block.values() if len(s) == 2)
    act = 4 * n_tokens * args.hidden
    from bitplan.profiler.estimators import CHUNK_BYTES

    nk = max(numel(s) for s in block.values())
    temps = 12 * nk + min(24 * nk, 3 * CHUNK_BYTES)
    embedding = 4 * vocab * args.hidden
    return {"block_weights": W_b, "H": H, "activations": act, "error_temporaries": temps,
            "embedding": embedding, "total": max(W_b + H + act + temps, embedding + act)}


def main(argv=None) -> int:
    ap = harness.parser("big_model", __doc__, quick={"size_gb": 0.3, "hidden": 512, "intermediate": 1536,
                                                      "heads": 8, "kv_heads": 2, "tokens": 128, "seq_len": 64})
    ap.add_argument("--size-gb", type=float, default=30.0, help="checkpoint size in GB (default 30): sets --layers")
    ap.add_argument("--layers", type=int, help="decoder blocks (default: as many as --size-gb holds)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--shard-gb", type=float, default=1.0, help="shard size in GB (default 1)")
    ap.add_argument("--tokens", type=int, default=256, help="calibration tokens (default 256)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--options", default="4", help="bit widths profiled (default 4)")
    ap.add_argument("--quantizer", default="rtn", help="rtn (default) or gptq")
    ap.add_argument("--folder", default="/var/tmp/bitplan-big-model", help="where the checkpoint goes")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint (it is deleted otherwise)")
    ap.add_argument("--reuse", action="store_true", help="profile the checkpoint already in --folder")
    ap.add_argument("--eval-tokens", type=int, default=512, help="held-out tokens of the streamed eval (default 512)")
    ap.add_argument("--eval-only", action="store_true",
                    help="with --reuse: only load the checkpoint and evaluate it streamed (no profile, no apply)")
    args = ap.parse_args(argv)

    from bitplan.profiler.model import EMBEDDED, resolve

    if args.eval_only and not args.reuse:
        ap.error("--eval-only evaluates the checkpoint already in --folder: give --reuse too")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = Path(args.folder)
    tok_dir, gguf = resolve(next(iter(EMBEDDED)))
    block_bytes = 2 * sum(numel(s) for s in shapes(args).values())
    if args.layers is None:
        args.layers = max(1, round(args.size_gb * GB / block_bytes))
    meta = harness.metadata(args)
    rows = []
    t0 = time.perf_counter()
    written = {"bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")) if args.reuse else 0}
    if not args.reuse:
        free = shutil.disk_usage(folder.parent if not folder.exists() else folder).free
        # the checkpoint, and the applied one (4-bit codes: about 0.3 of it) with its parts beside it
        want = int(1.6 * (args.layers * block_bytes + 2 * 49152 * args.hidden * 2))
        if free - want < KEEP_FREE:
            print(f"not enough disk: the checkpoint needs {want / GB:.1f} GB and {KEEP_FREE / GB:.0f} GB must stay "
                  f"free; {free / GB:.1f} GB are free on {folder.parent}", file=sys.stderr)
            return 2
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir, gguf_file=gguf)
        tok.save_pretrained(folder)
        print(f"writing {args.layers} blocks of {block_bytes / GiB:.3f} GiB (bf16) to {folder}", flush=True)
        written = write_checkpoint(folder, args, len(tok))
        rows.append({"phase": "write checkpoint", "seconds": time.perf_counter() - t0, "peak": harness.rss("VmHWM")})
    try:
        import torch

        from bitplan.db.types import Quantizer, parse_options
        from bitplan.profiler.model import load_model
        from bitplan.executor.apply import apply_plan_streamed
        from bitplan.planner.plan import allocate
        from bitplan.planner.request import PlanRequest
        from bitplan.profiler.model import planned_for
        from bitplan.profiler.profile import calibration_batches, profile_model
        from bitplan.profiler.weights import streamed

        torch.set_num_threads(os.cpu_count() or 1)
        sampler = harness.RssSampler()
        sampler.start()
        harness.reset_peak()
        base = harness.rss()
        t = time.perf_counter()
        loaded = load_model(str(folder), stream_weights="on")
        n_params = sum(p.numel() for p in loaded.model.parameters())
        vocab = loaded.model.config.vocab_size
        rows.append({"phase": "skeleton + fingerprint", "seconds": time.perf_counter() - t, "before": base,
                     "peak": harness.rss("VmHWM")})
        if args.eval_only:
            rows.append(eval_phase(loaded, args, sampler))
            print(phase_table(rows))
            harness.done(harness.write_result(args.out, {
                "model": {"folder": str(folder), "parameters": n_params, "checkpoint_bytes": written["bytes"]},
                "phases": rows}, meta))
            return 0
        harness.reset_peak()
        sampler.peak = 0
        before = harness.rss()
        t = time.perf_counter()
        profile = profile_model(loaded, parse_options(args.options), estimator="hessian",
                                quantizer=Quantizer.parse(args.quantizer), n_tokens=args.tokens, seq_len=args.seq_len,
                                device="cpu", progress=False, embeddings="keep")
        rows.append({"phase": "profile (streamed)", "seconds": time.perf_counter() - t, "before": before,
                     "peak": harness.rss("VmHWM"), "sampled": sampler.peak})
        profiled_before = before
        assert streamed(loaded.model) is not None
        # the plan applied with the weights streamed too: the best single option that fits, written shard by shard
        plan = allocate(profile, PlanRequest(budget="16bpw", allocator="uniform"))
        harness.reset_peak()
        sampler.peak = 0
        before = harness.rss()
        t = time.perf_counter()
        out = apply_plan_streamed(plan, loaded.model, loaded.tokenizer, planned_for(loaded.model, plan.assignment),
                                  Path(f"{folder}-applied"), overwrite=True, progress=False,
                                  quantizer=profile.quantizer,
                                  batches=calibration_batches(loaded, profile) if args.quantizer != "rtn" else None)
        applied_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        rows.append({"phase": f"apply (streamed, {plan.bits_per_weight:.2f} bpw)", "seconds": time.perf_counter() - t,
                     "before": before, "peak": harness.rss("VmHWM"), "sampled": sampler.peak})
        rows.append(eval_phase(loaded, args, sampler))
        sampler.stop.set()
    finally:
        if not args.keep and not args.eval_only:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(f"{folder}-applied", ignore_errors=True)
    terms = formula(args, profile.calibration.n_tokens, vocab)
    predicted = profiled_before + terms["total"]
    print(phase_table(rows, title=f"{args.layers} blocks, {n_params / 1e9:.2f} B parameters, "
                                  f"{written['bytes'] / GB:.1f} GB of bf16 weights ({2 * written['bytes'] / GiB:.1f} "
                                  f"GiB in float32), {profile.calibration.n_tokens} tokens"))
    print(harness.table([{"term": k, "gib": v / GiB} for k, v in terms.items()],
                        [("formula term", "term", "<"), ("GiB", "gib", ".3f")]))
    measured = next(r for r in rows if r["phase"].startswith("profile"))["peak_gib"]
    print(f"profile: predicted peak = RSS before ({profiled_before / GiB:.2f} GiB) + formula "
          f"({terms['total'] / GiB:.2f} GiB) = {predicted / GiB:.2f} GiB; measured {measured:.2f} GiB")
    path = harness.write_result(args.out, {
        "model": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                  "heads": args.heads, "kv_heads": args.kv_heads, "vocab": vocab, "parameters": n_params,
                  "checkpoint_bytes": written["bytes"], "float32_bytes": 4 * n_params},
        "profile": {"id": profile.id, "modules": len(profile.modules), "tokens": profile.calibration.n_tokens,
                    "options": args.options, "quantizer": args.quantizer, "estimator": "hessian"},
        "applied": {"plan": plan.id, "bits_per_weight": plan.bits_per_weight, "checkpoint_bytes": applied_bytes},
        "phases": rows, "formula_bytes": terms, "predicted_peak_bytes": predicted,
        "machine_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}, meta)
    harness.done(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
