"""MoE sensitivity benchmark: does each estimator rank experts the way their measured KL does?

On an MoE checkpoint (default: the trained tiny-Mixtral fixture, very uneven expert loads) it profiles
with the `hessian` and `fisher` estimators, then measures, for every routed expert and for 2 and 3 bits,
KL(base ‖ model with only that expert quantized: its gate, up and down matrices, RTN g64) with the `kl`
machinery's replayer (`bitplan.profiler.kl`: base log-probs cached, only blocks from the expert's layer
on re-run).  An expert's predicted error is the sum of its three matrices' profile errors.  Reports
each expert's routing share (its fraction of the layer's top-k slots), and Spearman ρ of predicted
error against measured KL: over all (expert, bits) pairs, within each bit width, and for routing share
alone as a baseline (does the estimator know more than how often the expert runs?).  Prints a table
and writes JSON (`bench/results/moe_sensitivity.json`, `--out`).

    python bench/moe_sensitivity.py [--model DIR] [--tokens 4096] [--kl-tokens 512]
    python bench/moe_sensitivity.py --quick     # 256 estimator tokens, KL on 64
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import numpy as np

DEFAULT_MODEL = "/work/shared/fixtures/tiny-mixtral"
ROLES = ("gate_proj", "up_proj", "down_proj")


def expert_kl(model, experts, bits, batches, group_size: int, device: str) -> np.ndarray:
    """`[experts, bits]` measured KL with only that expert's three matrices quantized (RTN)."""
    import torch

    from bitplan.db.types import Option
    from bitplan.kernels.quantize import quantize_dequantize
    from bitplan.profiler.kl import Replayer

    out = np.zeros((len(experts), len(bits)))
    with torch.no_grad():
        replayer = Replayer(model, batches, device)
        for i, (layer, _e, mlp) in enumerate(experts):
            linears = [getattr(mlp, r) for r in ROLES]
            originals = [lin.weight.data for lin in linears]
            for j, b in enumerate(bits):
                for lin, W in zip(linears, originals):
                    lin.weight.data = quantize_dequantize(W, Option(bits=b, group_size=group_size))
                try:
                    out[i, j] = replayer.kl_from(layer)
                finally:
                    for lin, W in zip(linears, originals):
                        lin.weight.data = W
    return out


def main(argv=None) -> int:
    ap = harness.parser("moe_sensitivity", __doc__, quick={"tokens": 256, "kl_tokens": 64, "seq_len": 64})
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"MoE checkpoint directory (default {DEFAULT_MODEL})")
    ap.add_argument("--calib", default="shakespeare:calib", help="calibration text (default shakespeare:calib)")
    ap.add_argument("--tokens", type=int, default=4096, help="estimators' calibration tokens (default 4096)")
    ap.add_argument("--kl-tokens", type=int, default=512, help="tokens the KL is measured on (default 512)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", default="2,3", help="bit widths (default 2,3)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch

    from bitplan.db.types import parse_options
    from bitplan.profiler.calibration import token_batches
    from bitplan.profiler.model import load_model
    from bitplan.profiler.moe import expert_sets
    from bitplan.profiler.profile import profile_model
    from bitplan.profiler.validate import spearman

    torch.manual_seed(0)
    meta = harness.metadata(args)
    loaded = load_model(args.model)
    model = loaded.model
    options = parse_options(args.bits, group_sizes=args.group_size)
    bits = [o.bits for o in options]
    experts = [(int(name.split(".")[2]), e, mlp) for name, ex in expert_sets(model) for e, mlp in enumerate(ex)]
    if not experts:
        print(f"error: {args.model} has no routed experts; give an MoE checkpoint", file=sys.stderr)
        return 2

    seconds, predicted, profiles = {}, {}, {}
    for est in ("hessian", "fisher"):
        t0 = time.perf_counter()
        p = profile_model(loaded, options, estimator=est, calib=args.calib, n_tokens=args.tokens,
                          seq_len=args.seq_len, device=args.device, progress=False)
        seconds[est] = time.perf_counter() - t0
        row = {(m.layer, m.expert): [] for m in p.modules if m.expert is not None}
        for i, m in enumerate(p.modules):
            if m.expert is not None:
                row[(m.layer, m.expert)].append(i)
        predicted[est] = np.array([p.error[row[(l, e)]].sum(axis=0) for l, e, _ in experts])
        profiles[est] = p

    t0 = time.perf_counter()
    kl_len = min(args.seq_len, args.kl_tokens)
    batches, _ = token_batches(loaded.tokenizer, args.calib, args.kl_tokens, kl_len)
    kl = expert_kl(model, experts, bits, batches, args.group_size, args.device)
    seconds["kl"] = time.perf_counter() - t0

    stats = {(m.layer, m.expert): m for m in profiles["fisher"].modules if m.role == "down_proj" and m.expert is not None}
    slots = {}
    for (l, _), m in stats.items():
        slots[l] = slots.get(l, 0) + m.tokens_routed
    share = np.array([stats[(l, e)].tokens_routed / slots[l] for l, e, _ in experts])
    fallback = np.array([stats[(l, e)].fallback for l, e, _ in experts])
    routed = ~fallback

    def rho(pred: np.ndarray, keep=slice(None)) -> dict:
        return {"all": spearman(pred[keep], kl[keep]),
                **{f"{b}b": spearman(pred[keep][:, [j]], kl[keep][:, [j]]) for j, b in enumerate(bits)}}

    # the baseline knows only how often an expert runs, and RTN's error scaling with bits (4^-b)
    share_pred = share[:, None] * 4.0 ** -np.array(bits, float)[None, :]
    result = {
        "model": args.model,
        "tokens": {"estimators": profiles["fisher"].calibration.n_tokens, "kl": int(batches.numel())},
        "bits": bits, "group_size": args.group_size,
        "seconds": seconds,
        "spearman": {est: rho(predicted[est]) for est in predicted} | {"routing share": rho(share_pred)},
        "spearman_routed_only": {est: rho(predicted[est], routed) for est in predicted}
        | {"routing share": rho(share_pred, routed)},
        "experts": [
            {"layer": l, "expert": e, "share": float(share[i]), "tokens_routed": stats[(l, e)].tokens_routed,
             "routing_weight": stats[(l, e)].routing_weight, "fallback": bool(fallback[i]),
             **{f"kl_{b}b": float(kl[i, j]) for j, b in enumerate(bits)},
             **{f"{est}_{b}b": float(predicted[est][i, j]) for est in predicted for j, b in enumerate(bits)}}
            for i, (l, e, _) in enumerate(experts)],
    }
    print(format_table(result))
    harness.done(harness.write_result(args.out, result, meta))
    return 0


def format_table(r: dict) -> str:
    bits = r["bits"]
    experts = [("layer", "layer", "d"), ("exp", "expert", "d"), ("share", "share", ".3f"),
               ("tokens", "tokens_routed", "d"), ("mean w", "routing_weight", ".3f"),
               *[(f"{short} {b}b", f"{key}_{b}b", ".2e") for short, key in (("kl", "kl"), ("hess", "hessian"),
                                                                            ("fish", "fisher")) for b in bits],
               ("", lambda x: "fallback" if x["fallback"] else "", "<")]
    cols = ["all"] + [f"{b}b" for b in bits]
    rho = [("predictor", "name", "<"), *[(c, lambda x, c=c: x["all_experts"][c], ".3f") for c in cols],
           *[(f"routed {c}", lambda x, c=c: x["routed"][c], ".3f") for c in cols]]
    rows = [{"name": name, "all_experts": v, "routed": r["spearman_routed_only"][name]}
            for name, v in r["spearman"].items()]
    return "\n".join([
        harness.table(r["experts"], experts),
        harness.table(rows, rho, title=f"\nSpearman ρ vs measured KL ({r['tokens']['estimators']} estimator tokens, "
                                       f"{r['tokens']['kl']} KL tokens; 'routed': routed experts only)"),
        "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items())])


if __name__ == "__main__":
    sys.exit(main())
