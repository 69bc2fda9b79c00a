"""How well a profile with several group sizes estimates the options its calibration did not measure.

`calibrated` measures KL at one option per code width (its smallest group) and gives the other group
sizes of that width the module's Fisher row times the scale fitted there.  The planner chooses between
group sizes by the *differences* of those entries, so this measures KL(base ‖ model with only this
module quantized) for every module at every option of the chosen widths (`profiler/kl.py`, GPTQ with
the profile's quantizer, H from its calibration text, on the same 512-token KL sample) and compares:
sums, Spearman's rho per option, and the sum and rank agreement of the gaps between each group size
and the measured one.

    python bench/calibrated_groups.py --db DB --profile prof-... [--bits 2,3]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()


def main(argv=None):
    ap = harness.parser("calibrated_groups", __doc__, quick={"bits": "3", "layers": "0"})
    ap.add_argument("--db", required=True, help="the store holding the profile")
    ap.add_argument("--profile", required=True, help="a stored profile with more than one group size")
    ap.add_argument("--bits", default="2,3", help="code widths whose options are all measured")
    ap.add_argument("--layers", help="only these decoder layers (comma-separated; default all)")
    args = ap.parse_args(argv)

    import torch
    from scipy.stats import spearmanr

    from bitplan.db.store import Store
    from bitplan.profiler.calibrate import DEFAULT_POINTS, calibration_points
    from bitplan.profiler.calibration import token_batches
    from bitplan.profiler.kl import DEFAULT_KL_TOKENS, kl_table
    from bitplan.profiler.model import load_model, planned_linears

    torch.manual_seed(0)
    meta = harness.metadata(args)
    profile = Store(args.db).get_profile(args.profile)
    loaded = load_model(profile.model.source)
    layers = {int(x) for x in args.layers.split(",")} if args.layers else None
    index = {m.name: i for i, m in enumerate(profile.modules)}
    planned = [(m, lin) for m, lin in planned_linears(loaded.model) if m.name in index and m.role != "embed_tokens"
               and (layers is None or m.layer in layers)]
    widths = {int(b) for b in args.bits.split(",")}
    cols = [j for j, o in enumerate(profile.options) if o.quantized and o.bits in widths]
    measured_at = set(calibration_points(profile.options, DEFAULT_POINTS,
                                         widths=sorted({m.shape[1] for m in profile.modules})))
    batches, _ = token_batches(loaded.tokenizer, profile.calibration.name, profile.calibration.n_tokens,
                               profile.calibration.seq_len)
    kl_rows = batches[:max(1, DEFAULT_KL_TOKENS // batches.shape[1])]
    truth = kl_table(loaded.model, planned, [profile.options[j] for j in cols], kl_rows, quantizer=profile.quantizer,
                     hessian_batches=batches, progress=True)
    predicted = profile.error[[index[m.name] for m, _ in planned]][:, cols]
    rows = []
    for k, j in enumerate(cols):
        o = profile.options[j]
        ref = next(cols.index(c) for c in cols if c in measured_at and profile.options[c].bits == o.bits)
        gap_p, gap_m = predicted[:, k] - predicted[:, ref], truth[:, k] - truth[:, ref]
        rows.append(dict(option=o.label, calibrated=j in measured_at, predicted_sum=float(predicted[:, k].sum()),
                         measured_sum=float(truth[:, k].sum()),
                         rho=float(spearmanr(predicted[:, k], truth[:, k]).statistic),
                         gap_to=profile.options[cols[ref]].label, predicted_gap=float(gap_p.sum()),
                         measured_gap=float(gap_m.sum()),
                         gap_rho=None if k == ref else float(spearmanr(gap_p, gap_m).statistic)))
    result = {"profile": profile.id, "modules": [m.name for m, _ in planned], "options": [r["option"] for r in rows],
              "predicted": predicted.tolist(), "measured": truth.tolist(), "kl_tokens": int(kl_rows.numel()),
              "rows": rows}
    print(harness.table(rows, [("option", "option", "<"), ("measured by calibration", "calibrated", "<"),
                               ("Σ predicted", "predicted_sum", ".3f"), ("Σ measured", "measured_sum", ".3f"),
                               ("ρ", "rho", ".3f"), ("gap to", "gap_to", "<"), ("Σ predicted gap", "predicted_gap", ".3f"),
                               ("Σ measured gap", "measured_gap", ".3f"), ("ρ of gaps", "gap_rho", ".3f")],
                        title=f"\n{len(planned)} modules of {profile.id}, KL on {result['kl_tokens']} tokens"))
    harness.done(harness.write_result(args.out, result, meta))


if __name__ == "__main__":
    main()
