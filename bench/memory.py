"""Peak memory of profiling: the whole model on the compute device vs streamed one block at a time.

Each mode runs in its own process (loading the model, then profiling with the `hessian` estimator, RTN,
the error table of every planned module at every option):

- `whole`: the model held entirely on the compute device, one forward pass per calibration sequence
  with hooks accumulating every planned linear's `H = Σ xxᵀ` (float64) at once, then the error table;
- `streamed`: `stream_blocks`, one block and its `H` on the device, the activations carried in memory;
- `streamed-disk`: the same with an activation budget of 0, so the activations go through disk;
- `fisher`: the default estimator, whose backward pass needs the whole model (`profiler/fisher.py`).

Peak host memory is read from the kernel: the child resets its high-water mark (`/proc/self/clear_refs`)
once the model is loaded, so `peak RSS` is the profiling pass's own (loading a GGUF peaks higher, and is
the same for every mode: `load RSS`, from `ru_maxrss` before the reset).  On CUDA also
`torch.cuda.max_memory_allocated` of the pass.  Beside the measurements, the terms of the streamed
formula (docs/profiling.md, "Memory") for this model.  Prints a table and writes JSON
(`bench/results/memory.json`, `--out`).

    python bench/memory.py [--model smollm2-135m|DIR] [--tokens 1024] [--seq-len 512] [--device cpu|cuda]
                           [--modes whole,streamed,streamed-disk,fisher]
    python bench/memory.py --formula     # the formula for Llama-3-70B and DeepSeek-V3 only (no model)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

MODES = ("whole", "streamed", "streamed-disk", "fisher")
MiB = 2**20


def whole_hessian_table(model, planned, options, batches, device: str):
    """The hessian error table with the whole model on `device` and every `H` held at once."""
    import numpy as np
    import torch

    from bitplan.kernels.quantize import quantize_dequantize
    from bitplan.profiler.estimators import hessian
    from bitplan.profiler.stream import BlockHessians, _expert_of

    H = BlockHessians(device, budget=1 << 62)  # every module's statistics in memory at once
    hooks = [h for m, lin in planned if (h := H.hook(m, lin, _expert_of(model, m))) is not None]
    model.to(device)
    try:
        with torch.no_grad():
            for row in batches:
                model(row.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    error = np.zeros((len(planned), len(options)))
    for i, (m, lin) in enumerate(planned):
        W = lin.weight.detach()
        for j, opt in enumerate(options):
            error[i, j] = hessian(quantize_dequantize(W, opt) - W, H[m.name], batches.numel())
    model.to("cpu")
    return error


def terms(model, planned, n_tokens: int) -> dict:
    """Bytes of the streamed formula's terms for this model (docs/profiling.md, "Memory")."""
    from bitplan.profiler.model import decoder_layers

    layers = decoder_layers(model)
    block = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in layers]
    h_block = {}
    for m, lin in planned:
        h_block[m.layer] = h_block.get(m.layer, 0) + lin.in_features ** 2 * 8
    emb = model.get_input_embeddings().weight
    return {"model": sum(p.numel() * p.element_size() for p in model.parameters()),
            "largest_block": max(block), "H_largest_block": max(v for k, v in h_block.items() if k is not None),
            "H_all": sum(h_block.values()), "activations": n_tokens * emb.shape[1] * emb.element_size(),
            "outside_blocks": sum(p.numel() * p.element_size() for p in model.parameters())
            - sum(sum(p.numel() * p.element_size() for p in b.parameters()) for b in layers)}


# (out, in) of every planned matrix of one decoder block, and the model's totals: the docs' examples
ATTN_LLAMA70B = [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192)]  # q, k, v (GQA: 8 kv heads x 128), o
ATTN_DSV3 = [(1536, 7168), (24576, 1536), (576, 7168), (32768, 512), (7168, 16384)]  # MLA: q_a, q_b, kv_a, kv_b, o
SHAPES = {
    "Llama-3-70B": {"hidden": 8192, "vocab": 128256, "params": 70.6e9, "blocks": {
        "block": (80, ATTN_LLAMA70B + [(28672, 8192), (28672, 8192), (8192, 28672)], None)}},
    "DeepSeek-V3": {"hidden": 7168, "vocab": 129280, "params": 671e9, "blocks": {
        "dense block (0-2)": (3, ATTN_DSV3 + [(18432, 7168), (18432, 7168), (7168, 18432)], None),
        # the shared expert's three matrices, and 256 routed experts of 2048, 8 active
        "MoE block (3-60)": (58, ATTN_DSV3 + [(2048, 7168), (2048, 7168), (7168, 2048)], (256, 8, 2048))}},
}


def formula(tokens: int = 4096, weight_bytes: int = 2, act_bytes: int = 2) -> list[dict]:
    """Streamed peak device memory of the docs' examples: the largest of `W_b + H_b` over blocks, plus
    the activations; `H` float64 (8 bytes a value), one `K x K` per planned matrix outside the routed
    experts, theirs as `bench/moe_statistics.py` counts it (routing spread evenly)."""
    routed_terms = harness.sibling("moe_statistics").formula
    rows = []
    for model, spec in SHAPES.items():
        d = spec["hidden"]
        for kind, (n, shapes, routed) in spec["blocks"].items():
            w = sum(o * i for o, i in shapes) * weight_bytes
            h = sum(i * i for _, i in shapes) * 8
            if routed is not None:
                experts, active, inter = routed
                w += experts * 3 * d * inter * weight_bytes
                t = routed_terms(d, inter, [tokens * active // experts] * experts, [])
                h += t["routed_inputs"] + t["one_read_H"]
            a = tokens * d * act_bytes
            rows.append({"model": model, "block": kind, "n_blocks": n, "block_weights": w, "H": h,
                         "activations": a, "streamed_peak": w + h + a,
                         "outside_blocks": 2 * spec["vocab"] * d * weight_bytes,
                         "whole_model": spec["params"] * weight_bytes,
                         "fisher": spec["params"] * (weight_bytes + 4 + weight_bytes)})
    return rows


def child(args) -> dict:
    """One mode in this process; returns the measurements."""
    import torch

    from bitplan.db.types import parse_options
    from bitplan.profiler import stream
    from bitplan.profiler.calibration import CALIB, token_batches
    from bitplan.profiler.model import load_model, planned_linears
    from bitplan.profiler.profile import error_table

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    load_s = time.perf_counter() - t0
    model = loaded.model
    options = parse_options(args.options, 64)
    batches, _ = token_batches(loaded.tokenizer, CALIB, args.tokens, args.seq_len)
    planned = planned_linears(model)
    load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    harness.reset_peak()  # the peak below is the pass's own
    base = harness.rss()
    t0 = time.perf_counter()
    if args.mode == "whole":
        error = whole_hessian_table(model, planned, options, batches, args.device)
    elif args.mode == "fisher":
        error = error_table(model, planned, options, batches, "fisher", device=args.device, progress=False)
    else:
        if args.mode == "streamed-disk":
            stream.default_activation_budget = lambda device: 0
        error = error_table(model, planned, options, batches, "hessian", device=args.device, progress=False)
    seconds = time.perf_counter() - t0
    return {"mode": args.mode, "seconds": seconds, "load_seconds": load_s, "load_rss": load_rss,
            "rss_before": base, "peak_rss": harness.rss("VmHWM"),
            "gpu_peak": torch.cuda.max_memory_allocated() if cuda else None,
            "terms": terms(model, planned, batches.numel()), "n_tokens": int(batches.numel()),
            "n_modules": len(planned), "error": error.tolist()}


GiB = 2**30
FORMULA = [("model", "model", "<"), ("block", "block", "<"),
           *[(head, lambda r, k=k: r[k] / GiB, ".2f") for head, k in
             (("weights", "block_weights"), ("H (f64)", "H"), ("acts", "activations"), ("peak", "streamed_peak"),
              ("outside", "outside_blocks"), ("whole", "whole_model"), ("fisher", "fisher"))]]
MEASURED = [("mode", "mode", "<"), ("time s", "seconds", ".1f"), ("load RSS", lambda r: r["load_rss"] / MiB, ".0f"),
            ("RSS before", lambda r: r["rss_before"] / MiB, ".0f"), ("peak RSS", lambda r: r["peak_rss"] / MiB, ".0f"),
            ("pass +", lambda r: (r["peak_rss"] - r["rss_before"]) / MiB, ".0f"),
            ("GPU peak", lambda r: None if r["gpu_peak"] is None else r["gpu_peak"] / MiB, ".0f")]


def main(argv=None) -> int:
    ap = harness.parser("memory", __doc__, quick={"tokens": 128, "seq_len": 64, "options": "4", "modes": "streamed"})
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a HF directory or .gguf")
    ap.add_argument("--tokens", type=int, default=1024, help="calibration tokens (default 1024)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--options", default="2,3,4,8")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {','.join(MODES)}")
    ap.add_argument("--formula", action="store_true",
                    help="only print the streamed formula for Llama-3-70B and DeepSeek-V3 (bf16, 4096 tokens)")
    ap.add_argument("--child", dest="mode", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.formula:
        print(harness.table(formula(), FORMULA, title="GiB; bf16, 4096 tokens"))
        return 0
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mode:
        print(json.dumps(child(args)))
        return 0

    import numpy as np

    import torch  # noqa: F401  (the metadata names the GPU when there is one)

    meta = harness.metadata(args)
    rows = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            ap.error(f"unknown mode {mode!r}")
        cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--tokens", str(args.tokens),
               "--seq-len", str(args.seq_len), "--options", args.options, "--device", args.device]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  {mode}: {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    ref = next((np.array(r["error"]) for r in rows if r["mode"] == "streamed"), None)
    for r in rows:
        e = np.array(r.pop("error"))
        # the whole-model pass sums the same H in another association order: equal up to rounding
        r["max_rel_diff_vs_streamed"] = (None if ref is None or r["mode"] == "fisher" else
                                         float(np.max(np.abs(e - ref) / np.maximum(np.abs(ref), 1e-30))))
    t = rows[0]["terms"]
    print(f"{args.model}: {rows[0]['n_modules']} modules x {len(args.options.split(','))} options, "
          f"{rows[0]['n_tokens']} tokens, device {args.device}, {os.cpu_count()} cores")
    print(f"  model {t['model'] / MiB:.0f} MiB (largest block {t['largest_block'] / MiB:.1f}, outside the blocks "
          f"{t['outside_blocks'] / MiB:.1f}); H: all {t['H_all'] / MiB:.0f} MiB, largest block "
          f"{t['H_largest_block'] / MiB:.1f} MiB; activations {t['activations'] / MiB:.1f} MiB")
    print(harness.table(rows, MEASURED, title="MiB"))
    out = harness.write_result(args.out, {"model": args.model, "tokens": args.tokens, "seq_len": args.seq_len,
                                          "options": args.options, "device": args.device, "rows": rows}, meta)
    harness.done(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
