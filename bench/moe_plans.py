"""MoE plans measured: per-expert vs per-layer-tied vs equal-per-block budgets, and engine-constrained plans.

On an MoE checkpoint (default: the trained tiny-Mixtral fixture, very uneven expert loads):

1. For each estimator (`--estimators`, default fisher,calibrated) and quantizer (`--quantizers`, default
   rtn,gptq), `ilp` plans at `--budget` (default 3.0 bpw), all of the same budget:
   - `per-expert`: `--granularity expert` (an expert's three matrices share one option);
   - `per-module`: every matrix on its own (finer still, for reference);
   - `layer-tied experts`: `--granularity layer_experts`, all routed experts of a layer at one option
     (what vLLM's fused MoE, llama.cpp's 3-D expert tensors, exllamav3 and ModelOpt run), attention free;
   - `equal per block`: per-expert units, but every decoder block gets the same bits per weight
     (`budget_split="block"`, MC-MoE's allocation: planner/blocks.py);
   - `uniform`: the best single option that fits.
   Each is measured in memory on the model (`executor.evaluate.evaluate_plans`, the weights `apply`
   writes): held-out perplexity and mean per-token KL(base ‖ plan) on `--eval-tokens` of the evaluation
   text in windows of 512.
2. On the first profile (fisher, rtn): `--engine bitplan|vllm|llamacpp` plans at `--engine-budget` (default
   4.0 bpw; an engine for which it is infeasible is compared at the smallest budget its error names, with
   a `bitplan` plan at that budget too), each exported (`gptqmodel` and `compressed-tensors` for vllm,
   `llamacpp` for llamacpp, our format for bitplan), and the perplexity of each export reloaded by our
   loader (`run_eval`, what `bitplan eval DIR` runs).  llama.cpp's export is a tensor-type file, not
   weights: its plan is measured as our RTN at each GGUF type's code bits (our format).

Every `ilp` plan is re-solved on the `highs` backend as a check on the default `cbc` (a CBC preprocessing
bug returns a worse plan as "optimal" on rare small problems); a disagreement is reported in the JSON
and printed.  Writes `bench/results/moe_plans.json` (`--out`; after the allocation study too, so that a
later failure keeps it); exports go under `--out-dir`.

    python bench/moe_plans.py [--model DIR] [--db /tmp/moe.db] [--budget 3.0bpw] [--eval-tokens 8192]
    python bench/moe_plans.py --quick     # fisher/rtn only, 256 calibration and 1,024 evaluation tokens
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

DEFAULT_MODEL = "/work/shared/fixtures/tiny-mixtral"

QUICK = {"estimators": "fisher", "quantizers": "rtn", "tokens": 256, "eval_tokens": 1024}

# (row name, granularity, budget split, allocator)
PLANS = (
    ("per-expert", "expert", "model", "ilp"),
    ("per-module", "module", "model", "ilp"),
    ("layer-tied experts", "layer_experts", "model", "ilp"),
    ("equal per block", "expert", "block", "ilp"),
    ("uniform", "module", "model", "uniform"),
)


def plan_row(plan) -> dict:
    return {"plan_id": plan.id, "bits_per_weight": plan.bits_per_weight, "size_mib": plan.size_mib,
            "total_bits": plan.total_bits, "budget_bits": plan.budget_bits,
            "predicted_error": plan.predicted_error, "status": plan.status}


def check_ilp(ws, profile, budget: str, plan, **kw) -> dict:
    """The same problem on `highs`: its predicted error, and whether cbc's plan matches it."""
    from bitplan.planner.app.usecases import run_plan
    from bitplan.planner.request import PlanRequest

    other = run_plan(ws, profile, PlanRequest(budget=budget, params={"backend": "highs"}, **kw))
    same = abs(other.predicted_error - plan.predicted_error) <= 1e-9 * max(1.0, abs(plan.predicted_error))
    if not same:
        print(f"warning: ilp cbc and highs disagree on {plan.id}: {plan.predicted_error:.6g} vs "
              f"{other.predicted_error:.6g}", file=sys.stderr)
    return {"highs_predicted_error": other.predicted_error, "cbc_equals_highs": same}


def allocation_study(ws, loaded, windows, args) -> dict:
    from bitplan.executor.evaluate import evaluate_plans
    from bitplan.profiler.model import planned_linears
    from bitplan.planner.app.usecases import ProfileRequest, run_plan, run_profile
    from bitplan.planner.request import PlanRequest
    from bitplan.profiler.profile import gptq_hessians

    planned = planned_linears(loaded.model)
    out = []
    for quantizer in args.quantizers:
        hessians = None
        for estimator in args.estimators:
            t0 = time.perf_counter()
            profile = run_profile(ws, args.model, ProfileRequest(estimator=estimator, quantizer=quantizer,
                                                                 tokens=args.tokens))
            rows = []
            for name, granularity, split, allocator in PLANS:
                kw = dict(granularity=granularity, budget_split=split)
                plan = run_plan(ws, profile, PlanRequest(budget=args.budget, allocator=allocator, **kw))
                row = {"plan": name, "granularity": granularity, "budget_split": split, "allocator": allocator,
                       **plan_row(plan)}
                if allocator == "ilp":
                    row.update(check_ilp(ws, profile, args.budget, plan, **kw))
                rows.append((row, plan))
            if profile.quantizer.method == "gptq" and hessians is None:
                hessians = gptq_hessians(loaded, profile, planned, progress=False)
            measured = evaluate_plans(loaded.model, planned, [p.assignment for _, p in rows], windows.ids,
                                      quantizer=profile.quantizer, hessians=hessians, progress=False)
            for (row, _), m in zip(rows, measured):
                row.update(m)
            out.append({"estimator": estimator, "quantizer": quantizer, "profile_id": profile.id,
                        "seconds": time.perf_counter() - t0, "plans": [r for r, _ in rows]})
            print(format_study(out[-1]), flush=True)
    return out


def smallest_bpw(e) -> str:
    """The smallest budget an InfeasibleBudget names (`Budget.describe_bits`: bpw rounded up to 0.001)."""
    return e.args[0].split("smallest feasible plan: ")[1].split("bpw")[0]


def engine_study(ws, loaded, windows, args) -> list[dict]:
    from bitplan.db.types import InfeasibleBudget
    from bitplan.executor.evaluate import evaluate_plans
    from bitplan.profiler.model import planned_linears
    from bitplan.planner.app.usecases import ProfileRequest, run_apply, run_eval, run_plan, run_profile
    from bitplan.planner.request import PlanRequest

    profile = run_profile(ws, args.model, ProfileRequest(estimator=args.estimators[0], quantizer=args.quantizers[0],
                                                         tokens=args.tokens))
    formats = {"bitplan": ["bitplan"], "vllm": ["gptqmodel", "compressed-tensors"], "llamacpp": ["bitplan"]}
    budgets = {args.engine_budget}
    rows, plans = [], {}
    for engine in ("vllm", "llamacpp"):
        try:
            plans[(engine, args.engine_budget)] = run_plan(ws, profile, PlanRequest(budget=args.engine_budget,
                                                                                    engine=engine))
        except InfeasibleBudget as e:
            rows.append({"engine": engine, "budget": args.engine_budget, "error": str(e)})
            print(f"{engine} at {args.engine_budget}: {e}", flush=True)
            least = f"{smallest_bpw(e)}bpw"
            plans[(engine, least)] = run_plan(ws, profile, PlanRequest(budget=least, engine=engine))
            budgets.add(least)
    for b in budgets:
        plans[("bitplan", b)] = run_plan(ws, profile, PlanRequest(budget=b))
    root = Path(args.out_dir)
    for (engine, budget), plan in sorted(plans.items(), key=lambda kv: (float(kv[0][1][:-3]), kv[0][0] != "bitplan")):
        for fmt in formats[engine]:
            out = run_apply(ws, plan, root / f"{engine}-{budget}-{fmt}", overwrite=True, fmt=fmt)
            ev = run_eval(ws, str(out), tokens=args.eval_tokens, plan_id=plan.id)
            row = {"engine": engine, "budget": budget, "format": fmt, "checkpoint": str(out),
                   "perplexity": ev.perplexity, "bytes_on_disk": ev.bytes_on_disk, **plan_row(plan)}
            if engine == "llamacpp":
                tt = run_apply(ws, plan, root / f"{engine}-{budget}-llamacpp", overwrite=True, fmt="llamacpp")
                row["tensor_types"] = str(tt / "tensor_types.txt")
            rows.append(row)
            print(f"{engine:>9} {budget:>9} {fmt:>18} {plan.bits_per_weight:7.4f} {plan.predicted_error:9.4f} "
                  f"{ev.perplexity:9.3f}", flush=True)
    # KL needs the base log-probs: measured in memory (the same weights; its perplexity checks the reload)
    done = [r for r in rows if "plan_id" in r]
    ids = list(dict.fromkeys(r["plan_id"] for r in done))
    measured = dict(zip(ids, evaluate_plans(loaded.model, planned_linears(loaded.model),
                                            [ws.store.get_plan(i).assignment for i in ids], windows.ids, progress=False)))
    for r in done:
        r["kl"], r["in_memory_perplexity"] = measured[r["plan_id"]]["kl"], measured[r["plan_id"]]["perplexity"]
    return rows


STUDY = [("plan", "plan", "<"), ("bits/w", "bits_per_weight", ".4f"), ("pred.err", "predicted_error", ".4f"),
         ("KL", "kl", ".4f"), ("ppl", "perplexity", ".3f"), ("status", "status", "<")]
ENGINES = [("engine", "engine", "<"), ("budget", "budget", ""), ("format", lambda r: r.get("format", "infeasible"), ""),
           ("bits/w", "bits_per_weight", ".4f"), ("pred.err", "predicted_error", ".4f"), ("KL", "kl", ".4f"),
           ("ppl", "perplexity", ".3f")]


def format_study(s: dict) -> str:
    return harness.table(s["plans"], STUDY,
                         title=f"\n{s['estimator']} estimator, {s['quantizer']} quantizer ({s['profile_id']})")


def format_engines(rows: list[dict], profile: str) -> str:
    errors = [f"{r['engine']} at {r['budget']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join([harness.table(rows, ENGINES, title=f"\nengines ({profile}; ilp)"), *errors])


def main(argv=None) -> int:
    ap = harness.parser("moe_plans", __doc__, quick=QUICK)
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"MoE checkpoint directory (default {DEFAULT_MODEL})")
    ap.add_argument("--db", default=None, help="database (default: $BITPLAN_DB, else a temporary file)")
    ap.add_argument("--budget", default="3.0bpw", help="budget of the allocation study (default 3.0bpw)")
    ap.add_argument("--engine-budget", default="4.0bpw", help="budget of the engine study (default 4.0bpw)")
    ap.add_argument("--estimators", default="fisher,calibrated", help="default fisher,calibrated")
    ap.add_argument("--quantizers", default="rtn,gptq", help="default rtn,gptq")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens of the profiles (default 4096)")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens, windows of 512 (default 8192)")
    ap.add_argument("--skip-engines", action="store_true", help="only the allocation study")
    ap.add_argument("--out-dir", default=None, help="where the engine study's exports go (default: a temporary dir)")
    args = ap.parse_args(argv)
    args.estimators = [x.strip() for x in args.estimators.split(",") if x.strip()]
    args.quantizers = [x.strip() for x in args.quantizers.split(",") if x.strip()]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    tmp = tempfile.mkdtemp(prefix="moe_plans-")
    args.out_dir = args.out_dir or tmp

    import torch

    from bitplan.db.store import Store
    from bitplan.executor.evaluate import perplexity
    from bitplan.planner.app.workspace import Workspace
    from bitplan.profiler.model import load_model

    torch.manual_seed(0)
    meta = harness.metadata(args)
    store = Store(args.db or os.environ.get("BITPLAN_DB") or str(Path(tmp) / "bitplan.db"))
    loaded = load_model(args.model)
    ws = Workspace(store, progress=False).adopt(args.model, loaded)
    windows = ws.windows(loaded.tokenizer, tokens=args.eval_tokens)
    t0 = time.perf_counter()
    base = perplexity(loaded.model, windows.ids, progress=False)
    print(f"unquantized: perplexity {base:.3f} on {windows.ids.numel()} tokens of {windows.corpus} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    result = {"model": args.model, "budget": args.budget, "engine_budget": args.engine_budget,
              "eval": {"corpus": windows.corpus, "tokens": int(windows.ids.numel()), "window": int(windows.ids.shape[1])},
              "unquantized_perplexity": base}
    t0 = time.perf_counter()
    result["allocation"] = allocation_study(ws, loaded, windows, args)
    harness.write_result(args.out, result, meta)  # a later failure keeps this part
    if not args.skip_engines:
        result["engines"] = engine_study(ws, loaded, windows, args)
        print(format_engines(result["engines"], f"{args.estimators[0]}, {args.quantizers[0]}"), flush=True)
    result["seconds"] = time.perf_counter() - t0
    harness.done(harness.write_result(args.out, result, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
