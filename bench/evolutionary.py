"""The evolutionary allocator on a profiled model: fitness KL, held-out KL and perplexity vs its ilp start.

    python bench/evolutionary.py --db /tmp/bitplan.db --profile prof-... [--budget 3.5bpw]
        [--granularity module|expert|layer|layer_experts] [--generations 20] [--offspring 12]
        [--patience 8] [--time-limit S] [--fitness-tokens 1024] [--heldout-tokens 1024]
        [--row-tokens 128] [--eval-tokens 8192] [--report-tokens N] [--also plan-a,plan-b]
        [--out bench/results/evolutionary.json] [--quick]

Needs a stored profile of the model (`bitplan profile smollm2-135m --db ...`).  `--granularity` ties
modules into units exactly as `bitplan plan --granularity` does (`expert`: an expert's matrices share one
option; `layer_experts`: all routed experts of a layer, attention free), and both the `ilp` start and the
search work on those units.  Perplexity and mean per-token KL(base ‖ plan) are measured on the held-out
evaluation text (`--eval-text`, default the tragedies, `shakespeare:eval`, in windows of 512) with the
plan's weights swapped into the loaded model (the RTN dequantized values `apply` writes), for the ilp
start, the evolutionary result and any stored plans of the same profile named by `--also`, all on the
same windows; per-window NLL and KL sums are kept in the JSON (`windows`) for paired noise estimates,
and `--report-tokens N` also reports every plan on the first N evaluation tokens only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import numpy as np

from bitplan.planner.plan import GRANULARITIES

QUICK = {"generations": 2, "offspring": 3, "patience": 0, "fitness_tokens": 256, "heldout_tokens": 128,
         "row_tokens": 64, "eval_tokens": 1024}


MEASURED = [("plan", "plan", "<"), ("perplexity", "perplexity", ".2f"), ("KL", "kl", ".4f"), ("tokens", "tokens", "d")]


def main(argv=None) -> int:
    ap = harness.parser("evolutionary", __doc__, quick=QUICK)
    ap.add_argument("--db", required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--budget", default="3.5bpw")
    ap.add_argument("--granularity", default="module", choices=GRANULARITIES,
                    help="units that share one option (default module)")
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--offspring", type=int, default=12)
    ap.add_argument("--fitness-tokens", type=int, default=1024)
    ap.add_argument("--heldout-tokens", type=int, default=1024)
    ap.add_argument("--row-tokens", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-text", default=None, help="evaluation text (default shakespeare:eval)")
    ap.add_argument("--report-tokens", type=int, help="also report on the first N evaluation tokens")
    ap.add_argument("--also", default="", help="stored plans of the profile to evaluate on the same windows")
    ap.add_argument("--patience", type=int, default=8,
                    help="generations without held-out improvement (0: none)")
    ap.add_argument("--time-limit", type=float, help="seconds of search")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state", help="search state file (resume)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (1 on a shared, busy machine)")
    args = ap.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = harness.metadata(args)

    from bitplan.db.store import Store
    from bitplan.db.types import Budget
    from bitplan.planner.allocators import evolutionary, ilp
    from bitplan.planner.plan import problem_from_profile
    from bitplan.executor.evaluate import eval_windows, evaluate_choices, summarize_windows
    from bitplan.profiler.fitness import kl_fitness_for_profile
    from bitplan.profiler.model import load_model

    store = Store(args.db)
    _, profile = store.find(args.profile)
    t0 = time.perf_counter()
    loaded = load_model(profile.model.source)
    oracle = kl_fitness_for_profile(loaded, profile, fitness_tokens=args.fitness_tokens,
                                    heldout_tokens=args.heldout_tokens, row_tokens=args.row_tokens)
    setup = time.perf_counter() - t0

    # the search itself (not through allocate) so that its whole report is at hand
    budget_bits = Budget.parse(args.budget).planned_bits(profile.n_params, profile.fixed_bits)
    problem, unit = problem_from_profile(profile, budget_bits, granularity=args.granularity)
    t0 = time.perf_counter()
    result = evolutionary.solve(problem, seed=args.seed, unit=unit, generations=args.generations,
                                offspring=args.offspring, patience=args.patience or None,
                                time_limit=args.time_limit,
                                context=evolutionary.SearchContext(oracle, args.state, progress=True))
    search = time.perf_counter() - t0
    start = ilp.solve(problem, seed=args.seed).choice
    start_m, final_m = np.asarray(start)[unit], np.asarray(result.choice)[unit]  # per module

    windows = eval_windows(loaded.tokenizer, args.eval_text, tokens=args.eval_tokens)
    choices = {"ilp": start_m, "evolutionary": final_m}
    for plan_id in [p.strip() for p in args.also.split(",") if p.strip()]:
        plan = store.get_plan(plan_id)
        if plan.profile_id != profile.id:
            raise SystemExit(f"{plan_id} is a plan of {plan.profile_id}, not of {profile.id}")
        choices[plan_id] = np.array([profile.options.index(plan.assignment[m.name]) for m in profile.modules])
    t0 = time.perf_counter()
    per_window = evaluate_choices(oracle, loaded.model, windows.ids, choices)
    window = int(windows.ids.shape[1])
    measured = summarize_windows(per_window, window)
    ev_seconds = time.perf_counter() - t0
    info = {k: v for k, v in result.info.items() if k != "history"}
    row = {"status": result.status, "profile_id": profile.id, "model": profile.model.name,
           "estimator": profile.estimator, "budget": args.budget, "granularity": args.granularity,
           "units": int(problem.n_units), "bits": problem.total_size(result.choice),
           "start_bits": problem.total_size(start), "budget_bits": problem.budget,
           "units_changed": int((np.asarray(start) != result.choice).sum()),
           "modules_changed": int((start_m != final_m).sum()),
           "ppl_start": measured["ilp"]["perplexity"], "ppl": measured["evolutionary"]["perplexity"],
           "eval_kl_start": measured["ilp"]["kl"], "eval_kl": measured["evolutionary"]["kl"],
           "eval_text": windows.corpus, "eval_tokens": int(windows.ids.numel()), "eval_window": window,
           "measured": measured, "eval_seconds": ev_seconds,
           "setup_seconds": setup, "search_seconds": search, "forward_blocks": oracle.forward_blocks,
           "n_blocks": len(oracle.replayer.layers), "variants_quantized": oracle.store.quantized,
           "packed_mib": oracle.store.packed_bytes() / 2**20, **info,
           "start_choice": start_m.tolist(), "choice": final_m.tolist()}
    if args.report_tokens:
        n = max(1, args.report_tokens // window)
        row["measured_first"] = summarize_windows(per_window, window, n)
    row.update(windows=per_window, history=result.info["history"])
    bulky = ("history", "windows", "start_choice", "choice", "measured", "measured_first")
    print(json.dumps({k: v for k, v in row.items() if k not in bulky}, indent=2, default=str))
    for key, what in (("measured", ""), ("measured_first", "the first ")):
        if key in row:
            tokens = next(iter(row[key].values()))["tokens"]
            print(harness.table([{"plan": name, **m} for name, m in row[key].items()], MEASURED,
                                title=f"\nmeasured on {what}{tokens} tokens of {row['eval_text']}"))
    harness.done(harness.write_result(args.out, row, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
