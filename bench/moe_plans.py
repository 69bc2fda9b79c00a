"""MoE plans measured: per-expert vs per-layer-tied vs equal-per-block budgets, and engine-constrained plans.

On an MoE checkpoint (default: the trained tiny-Mixtral fixture, very uneven expert loads):

1. For each estimator (`--estimators`, default fisher,calibrated) and quantizer (`--quantizers`, default
   rtn,gptq), and each budget of `--budget` (comma-separated, default 3.0 bpw), plans all of that budget:
   - `per-expert`: `--granularity expert` (an expert's three matrices share one option);
   - `per-module`: every matrix on its own (finer still, for reference);
   - `layer-tied experts`: `--granularity layer_experts`, all routed experts of a layer at one option
     (what vLLM's fused MoE, llama.cpp's 3-D expert tensors, exllamav3 and ModelOpt run), attention free;
   - `equal per block`: per-expert units, but every decoder block gets the same bits per weight
     (`budget_split="block"`, MC-MoE's allocation: planner/blocks.py);
   - `uniform`: the best single option that fits;
   - `per-expert evolutionary` (at the budgets of `--evolutionary`): `bitplan plan --allocator
     evolutionary --granularity expert`, the search started from the per-expert `ilp` plan
     (`--search-params`, JSON, e.g. '{"generations": 40, "patience": 12}').
   Each is measured in memory on the model (`executor.evaluate.evaluate_plans`, the weights `apply`
   writes): held-out perplexity and mean per-token KL(base ‖ plan) on `--eval-tokens` of each text of
   `--texts` (default `shakespeare:eval`, the held-out plays; `code`: Python standard-library source,
   bench/recipes.py's `code_text`) in windows of 512.  Every plan's perplexity is also given over the
   per-expert `ilp` plan's (and the per-expert evolutionary plan's, where run) with a 95 % paired
   bootstrap interval over the windows (bench/recipes.py's `paired_ratio`): an interval wholly above 1
   says the per-expert plan is better beyond the windows' noise.
   Each profile also reports its routed expert matrices with an error of zero at a quantized option (the
   done-when of issue 18: there must be none) and those on the fallback error (no calibration token).
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

    python bench/moe_plans.py [--model DIR] [--db /tmp/moe.db] [--budget 3.0bpw,3.5bpw] [--eval-tokens 8192]
        [--texts shakespeare:eval,code] [--evolutionary 3.0bpw] [--skip-engines]
    python bench/moe_plans.py --quick     # fisher/rtn only, 512 calibration and 1,024 evaluation tokens
"""

from __future__ import annotations

import json
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

QUICK = {"estimators": "fisher", "quantizers": "rtn", "tokens": 512, "eval_tokens": 1024, "resamples": 200}

# (row name, granularity, budget split, allocator)
PLANS = (
    ("per-expert", "expert", "model", "ilp"),
    ("per-module", "module", "model", "ilp"),
    ("layer-tied experts", "layer_experts", "model", "ilp"),
    ("equal per block", "expert", "block", "ilp"),
    ("uniform", "module", "model", "uniform"),
)
EVOLUTIONARY = ("per-expert evolutionary", "expert", "model", "evolutionary")
REFERENCES = ("per-expert", "per-expert evolutionary")  # each row's perplexity is paired against these


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


def zero_errors(profile) -> dict:
    """Routed expert matrices with a predicted error of zero at a quantized option, and those whose row is
    the fallback (no calibration token reached them): issue 18 wants none of the first."""
    import numpy as np

    quantized = [j for j, o in enumerate(profile.options) if o.quantized]
    experts = [i for i, m in enumerate(profile.modules) if m.expert is not None]
    zero = [profile.modules[i].name for i in experts if np.any(profile.error[i, quantized] <= 0)]
    return {"routed_expert_matrices": len(experts), "zero_below_16_bits": zero,
            "min_error_below_16_bits": float(profile.error[np.ix_(experts, quantized)].min()),
            "fallback": [profile.modules[i].name for i in experts if profile.modules[i].fallback],
            "estimated": sorted(n for n in profile.estimated if n in {profile.modules[i].name for i in experts})}


def measure(loaded, planned, plan, texts, profile, hessians, cache) -> dict:
    """Perplexity, KL and per-window NLL of one plan on every text, with the seconds it took."""
    from bitplan.executor.evaluate import evaluate_plans

    out = {}
    for name, windows in texts.items():
        t0 = time.perf_counter()
        r = evaluate_plans(loaded.model, planned, [plan.assignment], windows.ids, quantizer=profile.quantizer,
                           hessians=hessians, cache=cache, per_window=True, progress=False)[0]
        out[name] = {**r, "seconds": time.perf_counter() - t0}
    return out


def paired(rows: list[dict], texts, resamples: int) -> None:
    """Each row's perplexity and mean KL over each reference row's (REFERENCES), with 95 % paired bootstrap
    intervals over windows (bench/recipes.py's `paired_ratio`, `paired_sum_ratio`)."""
    recipes = harness.sibling("recipes")
    by_name = {r["plan"]: r for r in rows}
    for name, windows in texts.items():
        scored = int(windows.ids.shape[1]) - 1
        for row in rows:
            for ref in REFERENCES:
                if ref in by_name and ref != row["plan"]:
                    mine, theirs = row[name], by_name[ref][name]
                    for key, (r, lo, hi) in (
                            (f"vs {ref}", recipes.paired_ratio(mine["window_nll"], theirs["window_nll"], scored,
                                                               draws=resamples)),
                            (f"kl vs {ref}", recipes.paired_sum_ratio(mine["window_kl"], theirs["window_kl"],
                                                                      draws=resamples))):
                        mine[key] = {"ratio": r, "ci95": [lo, hi], "ref_better_beyond_ci": bool(lo > 1.0),
                                     "ref_worse_beyond_ci": bool(hi < 1.0)}
    for row in rows:  # kept in the JSON for later pairings, one list per text
        for name in texts:
            for key in ("window_nll", "window_kl"):
                row[name][key] = [round(x, 6) for x in row[name][key]]


def allocation_study(ws, loaded, texts, args, result, meta) -> list:
    from bitplan.kernels.quantize import GPTQCache
    from bitplan.profiler.model import planned_linears
    from bitplan.planner.app.usecases import ProfileRequest, run_plan, run_profile
    from bitplan.planner.request import PlanRequest
    from bitplan.profiler.profile import gptq_hessians

    planned = planned_linears(loaded.model)
    out = result.setdefault("allocation", [])
    for quantizer in args.quantizers:
        hessians = None
        for estimator in args.estimators:
            t0 = time.perf_counter()
            profile = run_profile(ws, args.model, ProfileRequest(estimator=estimator, quantizer=quantizer,
                                                                 tokens=args.tokens, embeddings=args.embeddings))
            zeros = zero_errors(profile)
            print(f"\n{profile.id} ({estimator}, {quantizer}; {profile.seconds:.0f} s): "
                  f"{len(zeros['zero_below_16_bits'])} of {zeros['routed_expert_matrices']} routed expert matrices "
                  f"with a zero error below 16 bits (smallest {zeros['min_error_below_16_bits']:.3g}); "
                  f"{len(zeros['fallback'])} on the fallback error, {len(zeros['estimated'])} estimated",
                  flush=True)
            if profile.quantizer.method == "gptq" and hessians is None:
                hessians = gptq_hessians(loaded, profile, planned, progress=False)
            cache = GPTQCache().claim(profile.id) if profile.quantizer.method == "gptq" else None
            for budget in args.budget:
                plans = list(PLANS) + ([EVOLUTIONARY] if budget in args.evolutionary else [])
                rows = []
                for name, granularity, split, allocator in plans:
                    kw = dict(granularity=granularity, budget_split=split)
                    extra, state = {}, None
                    if allocator == "evolutionary":
                        extra = harness.search_request(args.search_params)
                        state = args.search_state and f"{args.search_state}-{profile.id}-{budget}.json"
                    tp = time.perf_counter()
                    plan = run_plan(ws, profile, PlanRequest(budget=budget, allocator=allocator, **extra, **kw),
                                    search_state=state)
                    row = {"plan": name, "granularity": granularity, "budget_split": split, "allocator": allocator,
                           **plan_row(plan), "plan_seconds": time.perf_counter() - tp}
                    if allocator == "ilp":
                        row.update(check_ilp(ws, profile, budget, plan, **kw))
                    if allocator == "evolutionary":
                        search = plan.params.get("search") or {}
                        row["search"] = {k: v for k, v in search.items() if k != "history"}
                        row["search_tokens"] = search.get("tokens_used")
                    row.update(measure(loaded, planned, plan, texts, profile, hessians, cache))
                    first = row[next(iter(texts))]
                    row["perplexity"], row["kl"] = first["perplexity"], first["kl"]  # of the first text
                    rows.append(row)
                    print(f"  {budget} {name}: " + "  ".join(f"{t}: ppl {row[t]['perplexity']:.3f} kl "
                                                            f"{row[t]['kl']:.4f} ({row[t]['seconds']:.0f} s)"
                                                            for t in texts), flush=True)
                paired(rows, texts, args.resamples)
                out.append({"estimator": estimator, "quantizer": quantizer, "profile_id": profile.id,
                            "profile_seconds": profile.seconds, "budget": budget, "profile_check": zeros,
                            "seconds": time.perf_counter() - t0, "plans": rows})
                print(format_study(out[-1], texts), flush=True)
                harness.write_result(args.out, result, meta)  # a later failure keeps what is done
                t0 = time.perf_counter()
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


STUDY = [("plan", "plan", "<"), ("bits/w", "bits_per_weight", ".4f"), ("pred.err", "predicted_error", ".4f")]
ENGINES = [("engine", "engine", "<"), ("budget", "budget", ""), ("format", lambda r: r.get("format", "infeasible"), ""),
           ("bits/w", "bits_per_weight", ".4f"), ("pred.err", "predicted_error", ".4f"), ("KL", "kl", ".4f"),
           ("ppl", "perplexity", ".3f")]


def _vs(ref: str, text: str, what: str = ""):
    def cell(r: dict) -> str | None:
        v = r[text].get(f"{what}vs {ref}")
        return None if v is None else f"{v['ratio']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
    return cell


def format_study(s: dict, texts) -> str:
    columns = list(STUDY)
    refs = [ref for ref in REFERENCES if any(r["plan"] == ref for r in s["plans"])]
    for t in texts:
        columns += [(f"{t} KL", lambda r, t=t: r[t]["kl"], ".4f"), (f"{t} ppl", lambda r, t=t: r[t]["perplexity"], ".3f")]
        columns += [(f"÷ {ref} (95% CI)", _vs(ref, t), "") for ref in refs]
        columns += [(f"KL ÷ {ref}", _vs(ref, t, "kl "), "") for ref in refs[:1]]
    return harness.table(s["plans"], columns, title=f"\n{s['estimator']} estimator, {s['quantizer']} quantizer "
                                                    f"({s['profile_id']}), {s['budget']}")


def format_engines(rows: list[dict], profile: str) -> str:
    errors = [f"{r['engine']} at {r['budget']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join([harness.table(rows, ENGINES, title=f"\nengines ({profile}; ilp)"), *errors])


def main(argv=None) -> int:
    ap = harness.parser("moe_plans", __doc__, quick=QUICK)
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"MoE checkpoint directory (default {DEFAULT_MODEL})")
    ap.add_argument("--db", default=None, help="database (default: $BITPLAN_DB, else a temporary file)")
    ap.add_argument("--budget", default="3.0bpw",
                    help="budgets of the allocation study, comma-separated (default 3.0bpw)")
    ap.add_argument("--evolutionary", default="",
                    help="budgets (of --budget) at which the per-expert evolutionary plan is added too")
    ap.add_argument("--search-params", default="{}",
                    help="the evolutionary allocator's parameters, JSON (time_limit: seconds of search; seed)")
    ap.add_argument("--search-state", default=None,
                    help="path prefix of the search's state files (resume: the same command again)")
    ap.add_argument("--texts", default="shakespeare:eval",
                    help="evaluation texts, comma-separated: shakespeare:eval, code, or a file (default "
                         "shakespeare:eval)")
    ap.add_argument("--embeddings", default=None, choices=("plan", "keep"),
                    help="the allocation study's profiles: plan or keep the input embedding (default: the "
                         "profiler's, plan; tiny-Mixtral's embedding is 56 %% of its weights and takes 4 bits or "
                         "more, so budgets under 3.41 bpw need keep)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (1 on a shared, busy machine)")
    ap.add_argument("--resamples", type=int, default=2000, help="paired bootstrap resamples (default 2,000)")
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
    args.budget = [x.strip() for x in args.budget.split(",") if x.strip()]
    args.evolutionary = [x.strip() for x in args.evolutionary.split(",") if x.strip()]
    if set(args.evolutionary) - set(args.budget):
        ap.error(f"--evolutionary budgets must be among --budget ({', '.join(args.budget)})")
    harness.search_request(args.search_params)  # a malformed one fails in one line, before any work
    args.search_params = json.loads(args.search_params)
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
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = harness.metadata(args)
    store = Store(args.db or os.environ.get("BITPLAN_DB") or str(Path(tmp) / "bitplan.db"))
    loaded = load_model(args.model)
    ws = Workspace(store, progress=False).adopt(args.model, loaded)
    texts, evals, base = {}, {}, {}
    for name in [x.strip() for x in args.texts.split(",") if x.strip()]:
        path, digest = harness.sibling("recipes").code_text() if name == "code" else (name, None)
        texts[name] = w = ws.windows(loaded.tokenizer, text=None if name == "shakespeare:eval" else path,
                                     tokens=args.eval_tokens)
        evals[name] = {"corpus": w.corpus, "tokens": int(w.ids.numel()), "window": int(w.ids.shape[1]),
                       **({"sha256": digest} if digest else {})}
        t0 = time.perf_counter()
        base[name] = perplexity(loaded.model, w.ids, progress=False)
        print(f"unquantized: perplexity {base[name]:.3f} on {w.ids.numel()} tokens of {w.corpus} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    windows = next(iter(texts.values()))
    result = {"model": args.model, "budgets": args.budget, "engine_budget": args.engine_budget,
              "eval": evals[next(iter(texts))], "texts": evals, "unquantized_perplexity": base[next(iter(texts))],
              "unquantized": base, "search_params": args.search_params, "embeddings": args.embeddings}
    t0 = time.perf_counter()
    allocation_study(ws, loaded, texts, args, result, meta)
    harness.write_result(args.out, result, meta)  # a later failure keeps this part
    if not args.skip_engines:
        result["engines"] = engine_study(ws, loaded, windows, args)
        print(format_engines(result["engines"], f"{args.estimators[0]}, {args.quantizers[0]}"), flush=True)
    result["seconds"] = time.perf_counter() - t0
    harness.done(harness.write_result(args.out, result, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
