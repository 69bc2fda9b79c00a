"""Is per-expert better than layer-tied in perplexity, beyond noise?  A paired bootstrap over eval windows.

    python bench/moe_granularity_noise.py   # reads bench/results/evolutionary_tiny_mixtral_{expert,layer}.json

Reads the two runs of bench/evolutionary.py on tiny-mixtral at 3.0 bpw (`--granularity expert` and
`layer_experts`, `--eval-tokens 32768`; the expert run with `--also` the stored layer-tied and per-block
`ilp` plans), whose per-window NLL and KL sums are on the same 64 windows of 512 tokens.  For each pair of
plans: the mean per-token difference of ln perplexity and of KL, with a 95% interval from 10,000 paired
bootstrap resamples of the windows (seeded), on all windows and on the first 8 (the 4,096 tokens of
bench/results/moe_plans.json).  Prints a table; writes evolutionary_tiny_mixtral_noise.json.
"""
import json
from pathlib import Path

import numpy as np

RES = Path(__file__).resolve().parent / "results"
E = json.load(open(RES / "evolutionary_tiny_mixtral_expert.json"))
L = json.load(open(RES / "evolutionary_tiny_mixtral_layer.json"))
W = E["eval_window"]
assert E["eval_tokens"] == L["eval_tokens"]
plans = {"expert ilp": E["windows"]["ilp"], "expert evo": E["windows"]["evolutionary"],
         "layer ilp": L["windows"]["ilp"], "layer evo": L["windows"]["evolutionary"]}
names = {"plan-a52264f19e45fc86": "block-split ilp", "plan-4abd22fd6799e10e": "module ilp",
         "plan-01176c476d3cc7b6": "uniform", "plan-123873e85800d006": "layer ilp (stored)",
         "plan-7bb95318b129a73c": "expert ilp (stored)"}
for k, v in E["windows"].items():
    if k in names: plans[names[k]] = v
nll = {k: np.array(v["nll"]) for k, v in plans.items()}
kl = {k: np.array(v["kl"]) for k, v in plans.items()}
n = len(nll["expert ilp"])
rng = np.random.default_rng(0)
B = 10000
idx = rng.integers(0, n, size=(B, n))
def ppl(x, sel=slice(None)):
    return float(np.exp(x[sel].sum() / (len(x[sel]) * (W - 1))))
print(f"{n} windows of {W} tokens")
for first in (8, n):
    print(f"\nfirst {first * W} tokens:")
    for k in nll:
        mean_kl = kl[k][:first].sum() / (first * W)
        print(f"  {k:<22} ppl {ppl(nll[k], slice(0, first)):8.2f}  KL {mean_kl:.4f}")
pairs = [("expert evo", "layer evo"), ("expert ilp", "layer ilp"), ("expert evo", "layer ilp"),
         ("expert evo", "block-split ilp"), ("expert ilp", "block-split ilp"), ("expert evo", "expert ilp"),
         ("layer evo", "layer ilp")]
print("\npaired bootstrap over windows (all windows): ln ppl(a) - ln ppl(b), 95% CI; KL(a) - KL(b)")
out = {}
for a, b in pairs:
    d = (nll[a] - nll[b]) / (W - 1)  # per-token nll difference per window
    dk = (kl[a] - kl[b]) / W
    bs = d[idx].mean(1); bk = dk[idx].mean(1)
    # also on the first 8 windows only
    d8 = d[:8]; i8 = rng.integers(0, 8, size=(B, 8)); b8 = d8[i8].mean(1)
    r = {"dlnppl": float(d.mean()), "ci": [float(np.percentile(bs, 2.5)), float(np.percentile(bs, 97.5))],
         "p_a_better": float((bs < 0).mean()), "windows_a_better": int((d < 0).sum()),
         "dkl": float(dk.mean()), "kl_ci": [float(np.percentile(bk, 2.5)), float(np.percentile(bk, 97.5))],
         "dlnppl_first8": float(d8.mean()),
         "ci_first8": [float(np.percentile(b8, 2.5)), float(np.percentile(b8, 97.5))]}
    out[f"{a} vs {b}"] = r
    print(f"  {a:>12} vs {b:<16} dlnppl {r['dlnppl']:+.4f} [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}] "
          f"P(a better) {r['p_a_better']:.3f} windows a<b {r['windows_a_better']}/{n}; "
          f"first 8: {r['dlnppl_first8']:+.4f} [{r['ci_first8'][0]:+.4f}, {r['ci_first8'][1]:+.4f}]; "
          f"dKL {r['dkl']:+.4f} [{r['kl_ci'][0]:+.4f}, {r['kl_ci'][1]:+.4f}]")
summary = {k: {"perplexity_all": ppl(nll[k]), "kl_all": float(kl[k].sum() / (n * W)),
               "perplexity_first8": ppl(nll[k], slice(0, 8)), "kl_first8": float(kl[k][:8].sum() / (8 * W))}
           for k in nll}
(RES / "evolutionary_tiny_mixtral_noise.json").write_text(json.dumps(
    {"windows": n, "window": W, "bootstrap": B, "plans": summary, "pairs": out}, indent=1) + "\n")
