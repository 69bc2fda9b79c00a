"""Is per-expert better than layer-tied in perplexity, beyond noise?  A paired bootstrap over eval windows.

    python bench/moe_granularity_noise.py   # reads bench/results/evolutionary_tiny_mixtral_{expert,layer}.json

Reads the two runs of bench/evolutionary.py on tiny-mixtral at 3.0 bpw (`--granularity expert` and
`layer_experts`, `--eval-tokens 32768`; the expert run with `--also` the stored layer-tied and per-block
`ilp` plans), whose per-window NLL and KL sums are on the same 64 windows of 512 tokens.  For each pair of
plans: the mean per-token difference of ln perplexity and of KL, with a 95% interval from 10,000 paired
bootstrap resamples of the windows (seeded), on all windows and on the first 8 (the 4,096 tokens of
bench/results/moe_plans.json).  Prints a table; writes bench/results/evolutionary_tiny_mixtral_noise.json
(`--out`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import numpy as np

# the stored plans that the expert run evaluated with --also, by id
NAMES = {"plan-a52264f19e45fc86": "block-split ilp", "plan-4abd22fd6799e10e": "module ilp",
         "plan-01176c476d3cc7b6": "uniform", "plan-123873e85800d006": "layer ilp (stored)",
         "plan-7bb95318b129a73c": "expert ilp (stored)"}
PAIRS = [("expert evo", "layer evo"), ("expert ilp", "layer ilp"), ("expert evo", "layer ilp"),
         ("expert evo", "block-split ilp"), ("expert ilp", "block-split ilp"), ("expert evo", "expert ilp"),
         ("layer evo", "layer ilp")]
FIRST = 8  # windows: the 4,096 tokens of moe_plans.json


def ppl(nll: np.ndarray, window: int, sel=slice(None)) -> float:
    """Perplexity from per-window NLL sums (each window scores window - 1 next tokens)."""
    return float(np.exp(nll[sel].sum() / (len(nll[sel]) * (window - 1))))


def compare(nll: dict, kl: dict, window: int, a: str, b: str, idx: np.ndarray, rng, resamples: int) -> dict:
    """Paired differences a - b per token, with bootstrap intervals over windows (`idx`: [resamples, n])."""
    d = (nll[a] - nll[b]) / (window - 1)  # per-token NLL difference per window
    dk = (kl[a] - kl[b]) / window
    bs, bk = d[idx].mean(1), dk[idx].mean(1)
    d8 = d[:FIRST]
    b8 = d8[rng.integers(0, FIRST, size=(resamples, FIRST))].mean(1)
    return {"dlnppl": float(d.mean()), "ci": [float(np.percentile(bs, 2.5)), float(np.percentile(bs, 97.5))],
            "p_a_better": float((bs < 0).mean()), "windows_a_better": int((d < 0).sum()),
            "dkl": float(dk.mean()), "kl_ci": [float(np.percentile(bk, 2.5)), float(np.percentile(bk, 97.5))],
            "dlnppl_first8": float(d8.mean()),
            "ci_first8": [float(np.percentile(b8, 2.5)), float(np.percentile(b8, 97.5))]}


PLANS = [("plan", "plan", "<"), ("ppl", "ppl", ".2f"), ("KL", "kl", ".4f")]
DIFFS = [("a", "a", "<"), ("b", "b", "<"), ("dlnppl", "dlnppl", "+.4f"), ("95% CI", lambda r: _ci(r["ci"]), ""),
         ("P(a better)", "p_a_better", ".3f"), ("windows a<b", "windows_a_better", "d"),
         ("first 8", "dlnppl_first8", "+.4f"), ("95% CI (first 8)", lambda r: _ci(r["ci_first8"]), ""),
         ("dKL", "dkl", "+.4f"), ("95% CI (KL)", lambda r: _ci(r["kl_ci"]), "")]


def _ci(ci: list[float]) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def main(argv=None) -> int:
    ap = harness.parser("moe_granularity_noise", __doc__, quick={"resamples": 1000},
                        result="evolutionary_tiny_mixtral_noise")
    ap.add_argument("--expert", default=str(harness.RESULTS / "evolutionary_tiny_mixtral_expert.json"),
                    help="bench/evolutionary.py --granularity expert result")
    ap.add_argument("--layer", default=str(harness.RESULTS / "evolutionary_tiny_mixtral_layer.json"),
                    help="bench/evolutionary.py --granularity layer_experts result")
    ap.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples (default 10,000)")
    args = ap.parse_args(argv)
    meta = harness.metadata(args)
    E = json.loads(Path(args.expert).read_text())
    L = json.loads(Path(args.layer).read_text())
    W = E["eval_window"]
    assert E["eval_tokens"] == L["eval_tokens"]
    plans = {"expert ilp": E["windows"]["ilp"], "expert evo": E["windows"]["evolutionary"],
             "layer ilp": L["windows"]["ilp"], "layer evo": L["windows"]["evolutionary"]}
    plans.update({NAMES[k]: v for k, v in E["windows"].items() if k in NAMES})
    nll = {k: np.array(v["nll"]) for k, v in plans.items()}
    kl = {k: np.array(v["kl"]) for k, v in plans.items()}
    n = len(nll["expert ilp"])
    rng = np.random.default_rng(0)
    idx = rng.integers(0, n, size=(args.resamples, n))

    print(f"{n} windows of {W} tokens")
    for first in (FIRST, n):
        rows = [{"plan": k, "ppl": ppl(nll[k], W, slice(0, first)), "kl": kl[k][:first].sum() / (first * W)}
                for k in nll]
        print(harness.table(rows, PLANS, title=f"\nfirst {first * W} tokens:"))
    out = {f"{a} vs {b}": compare(nll, kl, W, a, b, idx, rng, args.resamples) for a, b in PAIRS}
    print(harness.table([{"a": a, "b": b, **out[f"{a} vs {b}"]} for a, b in PAIRS], DIFFS,
                        title=f"\npaired bootstrap over windows: ln ppl(a) - ln ppl(b) per token, 95% CI; "
                              f"KL(a) - KL(b); 'first 8': the first {FIRST * W} tokens"))
    summary = {k: {"perplexity_all": ppl(nll[k], W), "kl_all": float(kl[k].sum() / (n * W)),
                   "perplexity_first8": ppl(nll[k], W, slice(0, FIRST)),
                   "kl_first8": float(kl[k][:FIRST].sum() / (FIRST * W))}
               for k in nll}
    harness.done(harness.write_result(args.out, {"windows": n, "window": W, "bootstrap": args.resamples,
                                                 "plans": summary, "pairs": out}, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
