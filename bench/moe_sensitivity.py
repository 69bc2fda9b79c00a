"""MoE sensitivity benchmark: does each estimator rank experts the way their measured KL does?

On an MoE checkpoint (default: the trained tiny-Mixtral fixture, very uneven expert loads) it profiles
with the `hessian` and `fisher` estimators, then measures, for every routed expert and for 2 and 3 bits,
KL(base ‖ model with only that expert quantized: its gate, up and down matrices, RTN g64) with the `kl`
machinery's replayer (`bitplan.profiler.kl`: base log-probs cached, only blocks from the expert's layer
on re-run).  An expert's predicted error is the sum of its three matrices' profile errors.  Reports
each expert's routing share (its fraction of the layer's top-k slots), and Spearman ρ of predicted
error against measured KL: over all (expert, bits) pairs, within each bit width, and for routing share
alone as a baseline (does the estimator know more than how often the expert runs?).  Prints a table
and writes JSON (`bench/results/moe_sensitivity.json`, `--output`).

    python bench/moe_sensitivity.py [--model DIR] [--tokens 4096] [--kl-tokens 512]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "/work/shared/fixtures/tiny-mixtral"
ROLES = ("gate_proj", "up_proj", "down_proj")


def expert_kl(model, experts, bits, batches, group_size: int, device: str) -> np.ndarray:
    """`[experts, bits]` measured KL with only that expert's three matrices quantized (RTN)."""
    import torch

    from bitplan.db.types import Option
    from bitplan.executor.quantize import quantize_dequantize
    from bitplan.profiler.kl import Replayer

    out = np.zeros((len(experts), len(bits)))
    with torch.no_grad():
        replayer = Replayer(model, batches, device)
        for i, (layer, _e, mlp) in enumerate(experts):
            linears = [getattr(mlp, r) for r in ROLES]
            originals = [lin.weight.data for lin in linears]
            for j, b in enumerate(bits):
                for lin, W in zip(linears, originals):
                    lin.weight.data = quantize_dequantize(W, Option(bits=b, group_size=group_size), "rtn")
                try:
                    out[i, j] = replayer.kl_from(layer)
                finally:
                    for lin, W in zip(linears, originals):
                        lin.weight.data = W
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"MoE checkpoint directory (default {DEFAULT_MODEL})")
    ap.add_argument("--calib", default="shakespeare:calib", help="calibration text (default shakespeare:calib)")
    ap.add_argument("--tokens", type=int, default=4096, help="estimators' calibration tokens (default 4096)")
    ap.add_argument("--kl-tokens", type=int, default=512, help="tokens the KL is measured on (default 512)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", default="2,3", help="bit widths (default 2,3)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "moe_sensitivity.json"))
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
    loaded = load_model(args.model)
    model = loaded.model
    options = parse_options(args.bits, group_size=args.group_size)
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
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


def format_table(r: dict) -> str:
    bits = r["bits"]
    head = (f"{'layer':>5} {'exp':>3} {'share':>6} {'tokens':>6} {'mean w':>6}  "
            + " ".join(f"{f'kl {b}b':>9}" for b in bits) + "  "
            + " ".join(f"{f'hess {b}b':>9}" for b in bits) + "  "
            + " ".join(f"{f'fish {b}b':>9}" for b in bits))
    lines = [head, "-" * len(head)]
    for x in r["experts"]:
        w = "-" if x["routing_weight"] is None else f"{x['routing_weight']:.3f}"
        lines.append(f"{x['layer']:>5} {x['expert']:>3} {x['share']:>6.3f} {x['tokens_routed']:>6} {w:>6}  "
                     + " ".join(f"{x[f'kl_{b}b']:>9.2e}" for b in bits) + "  "
                     + " ".join(f"{x[f'hessian_{b}b']:>9.2e}" for b in bits) + "  "
                     + " ".join(f"{x[f'fisher_{b}b']:>9.2e}" for b in bits)
                     + ("  fallback" if x["fallback"] else ""))
    lines.append("")
    lines.append(f"Spearman ρ vs measured KL ({r['tokens']['estimators']} estimator tokens, {r['tokens']['kl']} KL tokens)")
    cols = ["all"] + [f"{b}b" for b in bits]
    lines.append(f"{'predictor':<16}" + "".join(f"{c:>9}" for c in cols) + "   | routed experts only")
    for name, v in r["spearman"].items():
        only = r["spearman_routed_only"][name]
        lines.append(f"{name:<16}" + "".join(f"{v[c]:>9.3f}" for c in cols) + "   | "
                     + "".join(f"{only[c]:>9.3f}" for c in cols))
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
