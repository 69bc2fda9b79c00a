"""How much better a low-bit quantizer must be for a plan to reach a target: its error shrunk, measured.

A plan's quality is bounded by the allocation and by how well each option quantizes.  To put a number on
the second, this takes a stored plan's weights exactly as `apply` writes them (GPTQ on the plan's
quantized inputs for a GPTQ profile) and, for every module below `--below-bits` bits, moves its weight
from the quantized value back towards the original, `W + λ·(Q(W) − W)`, for each λ of `--shrink`; modules
at `--below-bits` or more keep their quantized weights.  λ² is then the squared weight error a better
quantizer of those widths would have to reach (λ = 1 is the plan itself).  Perplexity on `--text` for each
λ, beside the `--target` plan's perplexity (e.g. uniform 4-bit), all on the same windows.

    python bench/error_shrink.py --db /tmp/m18/bitplan.db --plan plan-af3338518c8bf0eb \\
        --target plan-2b287f1709effd52 --shrink 1,0.9,0.8,0.7,0.6

Prints a table and writes JSON (`--out`, default bench/results/error_shrink.json).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import time


def main(argv=None):
    ap = harness.parser("error_shrink", __doc__, quick={"shrink": "1,0.5", "tokens": 1024})
    ap.add_argument("--db", help="the store holding the plans (default: $BITPLAN_DB or the user data dir)")
    ap.add_argument("--plan", required=True, help="stored plan id whose low-bit modules are shrunk")
    ap.add_argument("--target", help="stored plan id of the same profile to measure beside it (unshrunk)")
    ap.add_argument("--shrink", default="1,0.9,0.8,0.7,0.6", help="λ values, comma-separated")
    ap.add_argument("--below-bits", type=int, default=4, help="modules with fewer bits are shrunk")
    ap.add_argument("--text", default="shakespeare:eval")
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args(argv)
    shrink = [float(x) for x in args.shrink.split(",")]

    import torch

    from bitplan.db.store import Store
    from bitplan.executor.evaluate import perplexity
    from bitplan.kernels.quantize import quantize_dequantize, quantizer_for
    from bitplan.planner.app.workspace import Workspace
    from bitplan.profiler import profile as prof
    from bitplan.profiler.model import planned_for

    torch.manual_seed(0)
    ws = Workspace(Store(args.db), progress=True)
    plans = {"plan": ws.store.get_plan(args.plan)}
    if args.target:
        plans["target"] = ws.store.get_plan(args.target)
    if len({p.profile_id for p in plans.values()}) != 1:
        raise SystemExit("--plan and --target must be plans of one profile")
    profile = ws.store.get_profile(plans["plan"].profile_id)
    loaded = ws.model_of(profile, "bench/error_shrink.py")
    planned = planned_for(loaded.model, {m.name for m in profile.modules})
    windows = ws.windows(loaded.tokenizer, text=args.text, tokens=args.tokens)
    hessians = prof.gptq_hessians(loaded, profile, planned, progress=True)
    meta = harness.metadata(args, profile=profile.id, quantizer=profile.quantizer.label)
    originals = {m.name: lin.weight.data for m, lin in planned}

    def quantized(plan) -> dict:
        cache = (prof.gptq_propagated(loaded, profile, planned, plan.assignment, progress=True)
                 if profile.quantizer.method == "gptq" else None)
        return {m.name: quantize_dequantize(originals[m.name], plan.assignment[m.name], quantizer_for(m, profile.quantizer),
                                            hessians.get(m.name) if plan.assignment[m.name].quantized else None,
                                            cache=cache, name=m.name) for m, _ in planned}

    rows = []
    try:
        for key, plan in plans.items():
            for m, lin in planned:  # each plan's GPTQ statistics come from the loaded weights, not the last λ's
                lin.weight.data = originals[m.name]
            q = quantized(plan)
            low = {m.name for m, _ in planned if plan.assignment[m.name].quantized
                   and plan.assignment[m.name].bits < args.below_bits}
            share = sum(m.numel for m in profile.modules if m.name in low) / profile.n_params
            for lam in (shrink if key == "plan" else [1.0]):
                t0 = time.perf_counter()
                for m, lin in planned:
                    W, Q = originals[m.name], q[m.name]
                    lin.weight.data = W + lam * (Q - W) if m.name in low else Q
                ppl = perplexity(loaded.model, windows.ids, progress=False)
                rows.append({"plan": key, "plan_id": plan.id, "bits_per_weight": plan.bits_per_weight,
                             "shrink": lam, "squared_error": lam ** 2, "shrunk_weight_share": share,
                             "perplexity": ppl, "seconds": time.perf_counter() - t0})
                print(f"{key:>6} {plan.bits_per_weight:.3f} bpw  λ {lam:.2f}  ppl {ppl:8.2f}", flush=True)
    finally:
        for m, lin in planned:
            lin.weight.data = originals[m.name]
    columns = [("plan", "plan", "<"), ("bpw", "bits_per_weight", ".3f"), ("λ", "shrink", ".2f"),
               ("λ²", "squared_error", ".2f"), ("shrunk share", "shrunk_weight_share", ".3f"),
               ("ppl", "perplexity", ".2f")]
    print(harness.table(rows, columns, title=f"\n{windows.corpus}, {int(windows.ids.numel())} tokens"))
    harness.done(harness.write_result(args.out, {"rows": rows}, meta))


if __name__ == "__main__":
    main()
