"""The `calibrated` estimator with a sample of the experts measured: its cost and its accuracy.

On an MoE checkpoint (default: the trained tiny-Mixtral fixture, very uneven expert loads) it builds the
cheap table once (`fisher`, with the default quantizer: GPTQ, H from the calibration text) and the truth
once: KL(base ‖ model with only this module quantized) measured for *every* module at *every* option
(`profiler/kl.py`, on the same KL sample the estimator measures on).  Then it runs `calibrate` measuring
every expert (today's default) and measuring only `K` experts per layer and role (`--experts`), and
reports for each its KL passes, its time, and Spearman's rho against the truth over the options the
calibration does not measure (its points are the two lowest widths, where a measured module's row *is*
the truth): over all modules, over the routed experts alone, and per option.

    python bench/calibrated_experts.py [--model DIR] [--experts 1,2,4] [--tokens 4096]
    python bench/calibrated_experts.py --quick
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import numpy as np

DEFAULT_MODEL = str(Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tiny-mixtral")


def main(argv=None):
    ap = harness.parser("calibrated_experts", __doc__, quick={"tokens": 512, "experts": "2"})
    ap.add_argument("--model", default=DEFAULT_MODEL, help="an MoE checkpoint folder")
    ap.add_argument("--experts", default="1,2,4", help="experts measured per layer and role, comma-separated")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens (the KL sample is its first 512)")
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args(argv)

    import torch
    from scipy.stats import spearmanr

    from bitplan.kernels.quantize import GPTQCache
    from bitplan.planner.app.usecases import ProfileRequest, profile_options
    from bitplan.profiler.calibrate import DEFAULT_POINTS, calibrate, calibration_points
    from bitplan.profiler.calibration import token_batches
    from bitplan.profiler.kl import DEFAULT_KL_TOKENS, kl_table
    from bitplan.profiler.model import load_model, planned_linears
    from bitplan.profiler.profile import error_table, routing_stats

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    meta = harness.metadata(args)
    loaded = load_model(args.model)
    model = loaded.model
    options, quantizer = profile_options(ProfileRequest())
    batches, calib = token_batches(loaded.tokenizer, "shakespeare:calib", args.tokens, min(args.seq_len, args.tokens))
    planned = planned_linears(model)
    modules = [m for m, _ in planned]
    routed = np.array([m.expert is not None for m in modules])
    if not routed.any():
        sys.exit(f"error: {args.model} has no routed experts; give an MoE checkpoint")
    kl_rows = batches[:max(1, DEFAULT_KL_TOKENS // batches.shape[1])]
    cache = GPTQCache()
    t0 = time.perf_counter()
    cheap = error_table(model, planned, options, batches, "fisher", quantizer, progress=True, cache=cache)
    cheap_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    truth = kl_table(model, planned, options, kl_rows, quantizer=quantizer, progress=True, hessian_batches=batches,
                     cache=cache)
    truth_seconds = time.perf_counter() - t0
    records = routing_stats(model, kl_rows)
    tokens = {name: np.asarray(r.tokens) for name, r in records.items()}
    cols = calibration_points(options, DEFAULT_POINTS, widths=sorted({m.shape[1] for m in modules}))
    others = [j for j, o in enumerate(options) if o.quantized and j not in cols]

    def rho(a, b):
        return float(spearmanr(np.ravel(a), np.ravel(b)).statistic)

    rows = []
    for k in [None, *(int(x) for x in args.experts.split(","))]:
        t0 = time.perf_counter()
        cal = calibrate(model, planned, options, cheap, kl_rows, quantizer=quantizer, progress=False,
                        hessian_batches=batches, cache=cache, experts=k, routed_tokens=tokens)
        seconds = time.perf_counter() - t0
        measured = len(modules) - sum("not in the sample" in why for why in cal.estimated.values())
        rows.append(dict(
            experts="all" if k is None else k, modules_measured=measured, kl_passes=measured * len(cols),
            seconds=seconds,
            rho_all=rho(cal.error[:, others], truth[:, others]),
            rho_experts=rho(cal.error[routed][:, others], truth[routed][:, others]),
            **{f"rho_{options[j].label}": rho(cal.error[:, j], truth[:, j]) for j in others},
            rho_measured_points=rho(cal.error[:, cols], truth[:, cols])))
    rows.append(dict(experts="fisher (uncalibrated)", modules_measured=0, kl_passes=0, seconds=0.0,
                     rho_all=rho(cheap[:, others], truth[:, others]),
                     rho_experts=rho(cheap[routed][:, others], truth[routed][:, others]),
                     **{f"rho_{options[j].label}": rho(cheap[:, j], truth[:, j]) for j in others},
                     rho_measured_points=rho(cheap[:, cols], truth[:, cols])))
    result = {"model": args.model, "n_modules": len(modules), "n_experts": int(routed.sum()),
              "options": [o.label for o in options], "measured_points": [options[j].label for j in cols],
              "quantizer": quantizer.label, "calibration": calib.name, "tokens": int(batches.numel()),
              "kl_tokens": int(kl_rows.numel()), "cheap_seconds": cheap_seconds, "truth_seconds": truth_seconds,
              "truth_passes": len(modules) * (len(options) - sum(not o.quantized for o in options)), "rows": rows}
    columns = [("experts measured", "experts", "<"), ("modules", "modules_measured", "d"), ("KL passes", "kl_passes", "d"),
               ("seconds", "seconds", ".1f"), ("ρ unmeasured options", "rho_all", ".3f"),
               ("ρ experts", "rho_experts", ".3f")] + [(f"ρ {options[j].label}", f"rho_{options[j].label}", ".3f")
                                                       for j in others]
    print(harness.table(rows, columns, title=f"\n{len(modules)} modules ({int(routed.sum())} routed expert matrices), "
                                             f"truth: {result['truth_passes']} KL passes in {truth_seconds:.0f} s"))
    harness.done(harness.write_result(args.out, result, meta))


if __name__ == "__main__":
    main()
