"""Where an MoE plan's bits meet each text's tokens: routed (token, slot) pairs per expert bit width, per text.

A per-expert plan gives few bits to the experts the calibration text rarely routes to.  On text of another
domain the router may send more of its tokens there.  For each stored plan (`--plans`) and each text of
`--texts` (default the calibration text's held-out plays, `shakespeare:eval`, and `code`, Python standard
library source as bench/recipes.py's `code_text`), this counts, over all MoE layers, the share of routed
(token, slot) pairs that reach experts planned at each bit width (an expert's bits: the mean of its three
matrices' code bits), and the routing-weighted share (each pair weighted by its routing weight).  Also per
text: how far each layer's routing distribution is from the plays' (total variation, averaged over layers).

    python bench/moe_routing_shift.py --db /tmp/moe18.db --plans plan-...,plan-... [--texts shakespeare:eval,code]
        [--tokens 16384]

One forward pass of the unquantized model per text (the routing is the unquantized model's).  Writes
bench/results/moe_routing_shift.json (`--out`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import re

import numpy as np

EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.")


def expert_bits(plan) -> dict[tuple[str, int], float]:
    """(expert set, expert) -> mean code bits of its matrices in `plan`."""
    bits: dict[tuple[str, int], list[int]] = {}
    for name, opt in plan.assignment.items():
        m = EXPERT.match(name)
        if m and "shared_expert" not in name:
            bits.setdefault((m.group(1), int(m.group(2))), []).append(opt.bits)
    return {k: float(np.mean(v)) for k, v in bits.items()}


def main(argv=None) -> int:
    ap = harness.parser("moe_routing_shift", __doc__, quick={"tokens": 1024})
    ap.add_argument("--db", required=True, help="the store holding the plans")
    ap.add_argument("--plans", required=True, help="stored plan ids of one model, comma-separated")
    ap.add_argument("--texts", default="shakespeare:eval,code")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, help="torch intra-op threads")
    args = ap.parse_args(argv)

    import torch

    from bitplan.db.store import Store
    from bitplan.planner.app.workspace import Workspace
    from bitplan.profiler.profile import routing_stats

    if args.threads:
        torch.set_num_threads(args.threads)
    meta = harness.metadata(args)
    ws = Workspace(Store(args.db), progress=False)
    plans = [ws.store.get_plan(p.strip()) for p in args.plans.split(",") if p.strip()]
    profile = ws.store.get_profile(plans[0].profile_id)
    loaded = ws.model_of(profile, "bench/moe_routing_shift.py")
    routing, corpora = {}, {}
    for name in [t.strip() for t in args.texts.split(",") if t.strip()]:
        path = harness.sibling("recipes").code_text()[0] if name == "code" else None if name == "shakespeare:eval" else name
        windows = ws.windows(loaded.tokenizer, text=path, tokens=args.tokens)
        corpora[name] = windows.corpus
        routing[name] = {k: (r.tokens.numpy().astype(float), r.weight.numpy()) for k, r in
                         routing_stats(loaded.model, windows.ids).items()}
    first = next(iter(routing))
    out = {"texts": corpora, "tokens": args.tokens, "plans": {}}
    tv = {}
    for name, sets in routing.items():
        d = [0.5 * np.abs(t / t.sum() - routing[first][k][0] / routing[first][k][0].sum()).sum()
             for k, (t, _) in sets.items()]
        tv[name] = float(np.mean(d))
    out["routing_tv_from_" + first] = tv
    rows = []
    for plan in plans:
        bits = expert_bits(plan)
        widths = sorted(set(bits.values()))
        per_text = {}
        for name, sets in routing.items():
            pairs = {b: 0.0 for b in widths}
            weight = {b: 0.0 for b in widths}
            for k, (t, w) in sets.items():
                for e in range(len(t)):
                    pairs[bits[(k, e)]] += t[e]
                    weight[bits[(k, e)]] += w[e]
            tp, tw = sum(pairs.values()), sum(weight.values())
            per_text[name] = {"pairs": {str(b): pairs[b] / tp for b in widths},
                              "weighted": {str(b): weight[b] / tw for b in widths},
                              "mean_bits_per_pair": sum(b * pairs[b] for b in widths) / tp}
            rows.append({"plan": plan.id, "granularity": plan.granularity if hasattr(plan, "granularity") else "",
                         "text": name, "mean bits": per_text[name]["mean_bits_per_pair"],
                         **{f"{b:g}-bit": per_text[name]["pairs"][str(b)] for b in widths}})
        out["plans"][plan.id] = {"bits_per_weight": plan.bits_per_weight, "per_text": per_text,
                                 "experts_at": {str(b): sum(v == b for v in bits.values()) for b in widths}}
    widths = sorted({k for r in rows for k in r if k.endswith("-bit")}, key=lambda s: float(s[:-4]))
    print(harness.table(rows, [("plan", "plan", "<"), ("text", "text", "<"), ("mean bits", "mean bits", ".3f"),
                               *[(w, w, ".3f") for w in widths]],
                        title="share of routed (token, slot) pairs by the bits of the expert they reach"))
    print("routing total variation from " + first + ": " + ", ".join(f"{k} {v:.3f}" for k, v in tv.items()))
    harness.done(harness.write_result(args.out, out, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
