"""Calibration in context: each module's error rescaled to its measured KL moves inside a plan, re-solved.

The profile's `calibrated` error of a module is its KL with *only* that module quantized.  In a plan every
other module is quantized too, and errors interact (the measured KL of a mixed plan is above the
additive prediction, more than a uniform plan's).  This asks whether the allocation gains when the
knapsack sees each module's cost where the plan puts it:

1. `ilp` at each budget of `--budget` on the stored profile (module granularity).
2. For every module, the plan with that module one level down and one level up (the next smaller and
   larger option; bits are not rebalanced) is scored on `--tokens` of fitness text (KL(base ‖ plan),
   `profiler/fitness.py`'s oracle: variants quantized as the profile's quantizer does, the plan's
   block inputs replayed), beside the plan itself on the same tokens; the measured moves against the
   profile's predicted ones give each module a scale `s = (KL_down − KL_up) / (err_down − err_up)`
   (floored at a tenth of the median, since a noisy move must not make a module free).
3. `ilp` again on the rescaled table `s · error` at the same budget: the in-context plan.

Both plans, and the uniform plans of `--uniform` (budgets whose best single option is the comparison),
are evaluated as `apply` writes them (a GPTQ profile: GPTQ on the plan's quantized inputs) on `--texts`, with perplexity
ratios and 95 % paired bootstrap intervals over windows (bench/recipes.py's `paired_ratio`).

    python bench/in_context.py --db /tmp/m18/bitplan.db --profile prof-... --budget 3.5bpw \\
        --uniform 4.35bpw [--tokens 1024] [--eval-tokens 8192]

Prints a table and writes JSON (`--out`, default bench/results/in_context.json).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import time

import numpy as np

FLOOR = 0.1  # of the median scale: the smallest a module's scale may be


def neighbours(size: np.ndarray, o: int) -> tuple[int | None, int | None]:
    """The options of next smaller and next larger size than option `o` (None where there is none)."""
    lower = [j for j in range(len(size)) if size[j] < size[o]]
    higher = [j for j in range(len(size)) if size[j] > size[o]]
    return (max(lower, key=lambda j: size[j]) if lower else None,
            min(higher, key=lambda j: size[j]) if higher else None)


def scales(error: np.ndarray, size: np.ndarray, choice: np.ndarray, score, base: float) -> tuple[np.ndarray, list]:
    """Each module's measured-over-predicted scale of its moves in the plan `choice` (`score(choice)`:
    the plan's KL on the fitness rows; `base` that of `choice` itself), and the moves measured."""
    s, moves = np.full(len(choice), np.nan), []
    for m in range(len(choice)):
        o = int(choice[m])
        down, up = neighbours(size[m], o)
        measured = predicted = 0.0
        for j in (down, up):
            if j is None:
                continue
            c = choice.copy()
            c[m] = j
            kl = score(c) - base
            sign = 1 if j == down else -1  # a move down costs, a move up gains: both count as positive
            measured += sign * kl
            predicted += sign * (error[m, j] - error[m, o])
            moves.append({"module": m, "from": o, "to": j, "kl": kl, "predicted": float(error[m, j] - error[m, o])})
        if predicted > 0:
            s[m] = measured / predicted
    ok = np.isfinite(s)
    median = float(np.median(s[ok & (s > 0)]))
    s[~ok] = median
    return np.maximum(s, FLOOR * median), moves


def main(argv=None):
    ap = harness.parser("in_context", __doc__, quick={"tokens": 128, "eval_tokens": 1024})
    ap.add_argument("--db", help="the store holding the profile (default: $BITPLAN_DB or the user data dir)")
    ap.add_argument("--profile", required=True, help="stored profile id")
    ap.add_argument("--budget", default="3.5bpw", help="budgets, comma-separated")
    ap.add_argument("--uniform", default="4.35bpw", help="budgets of the uniform plans to compare with")
    ap.add_argument("--tokens", type=int, default=1024, help="fitness tokens the moves are measured on")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="evaluation tokens per text")
    ap.add_argument("--texts", default="shakespeare:eval,code", help="comma-separated: shakespeare:eval, code, "
                                                                     "or a file or glob")
    args = ap.parse_args(argv)
    recipes = harness.sibling("recipes")

    import torch

    from bitplan.db.store import Store
    from bitplan.db.types import Budget
    from bitplan.planner.allocators import ilp, uniform
    from bitplan.planner.app.workspace import Workspace
    from bitplan.planner.plan import problem_from_profile
    from bitplan.planner.problem import AllocationProblem
    from bitplan.profiler import profile as prof
    from bitplan.profiler.fitness import kl_fitness_for_profile
    from bitplan.profiler.model import planned_for

    torch.manual_seed(0)
    ws = Workspace(Store(args.db), progress=True)
    profile = ws.store.get_profile(args.profile)
    loaded = ws.model_of(profile, "bench/in_context.py")
    planned = planned_for(loaded.model, {m.name for m in profile.modules})
    texts = {}
    for name in args.texts.split(","):
        path, _ = recipes.code_text() if name == "code" else (name, None)
        texts[name] = ws.windows(loaded.tokenizer, text=path, tokens=args.eval_tokens)
    meta = harness.metadata(args, profile=profile.id, estimator=profile.estimator, quantizer=profile.quantizer.label)
    hessians = prof.gptq_hessians(loaded, profile, planned, progress=True)
    oracle = kl_fitness_for_profile(loaded, profile, fitness_tokens=args.tokens, heldout_tokens=128)
    rows_all = list(range(oracle.n_rows))

    def bits(budget: str) -> int:
        return Budget.parse(budget).planned_bits(profile.n_params, profile.fixed_bits)

    plans, studies = {}, []
    for budget in args.budget.split(","):
        problem, _ = problem_from_profile(profile, bits(budget))
        start = np.asarray(ilp.solve(problem).choice)
        t0 = time.perf_counter()
        oracle.prepare(start, rows_all)
        base = oracle.fitness(start, rows_all)
        s, moves = scales(problem.error, problem.size, start, lambda c: oracle.fitness(c, rows_all), base)
        measure_seconds = time.perf_counter() - t0
        rescaled = AllocationProblem(problem.error * s[:, None], problem.size, problem.allowed, problem.budget)
        again = np.asarray(ilp.solve(rescaled).choice)
        fitted = oracle.fitness(again, rows_all)
        plans[f"ilp@{budget}"], plans[f"ilp in context@{budget}"] = start, again
        studies.append({"budget": budget, "fitness_kl_start": base, "fitness_kl_in_context": fitted,
                        "modules_changed": int((again != start).sum()), "measure_seconds": measure_seconds,
                        "scale": s.tolist(), "moves": moves,
                        "scale_quartiles": np.percentile(s, [25, 50, 75]).tolist()})
        print(f"{budget}: {int((again != start).sum())} modules changed; fitness KL {base:.4f} -> {fitted:.4f} on "
              f"{args.tokens} tokens; scales (quartiles) {np.round(np.percentile(s, [25, 50, 75]), 3)} "
              f"({measure_seconds:.0f} s)", flush=True)
    oracle.close()
    for budget in [b for b in args.uniform.split(",") if b]:
        problem, _ = problem_from_profile(profile, bits(budget))
        plans[f"uniform@{budget}"] = np.asarray(uniform.solve(problem).choice)

    rows, nll, scored = [], {}, texts[next(iter(texts))].ids.shape[1] - 1
    for name, choice in plans.items():
        assignment = {m.name: profile.options[int(o)] for m, o in zip(profile.modules, choice)}
        t0 = time.perf_counter()
        cache = (prof.gptq_propagated(loaded, profile, planned, assignment, progress=True)
                 if profile.quantizer.method == "gptq" else None)
        row = {"plan": name, "bits_per_weight": float(
            sum(profile.size_bits[m, o] for m, o in enumerate(choice)) / profile.n_params)}
        measured, window_nll = recipes.on_texts(loaded, planned, assignment, texts, quantizer=profile.quantizer,
                                                hessians=hessians, cache=cache)
        row.update(measured)
        nll.update({(name, text): v for text, v in window_nll.items()})
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"{name:>24}  {row['bits_per_weight']:.3f} bpw  " + "  ".join(
            f"{t}: ppl {row[t]['perplexity']:8.2f}" for t in texts), flush=True)
    for row in rows:
        for text in texts:
            for other in plans:
                if other != row["plan"]:
                    r, lo, hi = recipes.paired_ratio(nll[row["plan"], text], nll[other, text], scored)
                    row[text][f"vs {other}"] = {"ratio": r, "ci95": [lo, hi]}
    columns = [("plan", "plan", "<"), ("bpw", "bits_per_weight", ".3f")]
    columns += [(f"{t} ppl", lambda r, t=t: r[t]["perplexity"], ".2f") for t in texts]
    print(harness.table(rows, columns, title=""))
    harness.done(harness.write_result(args.out, {"studies": studies, "rows": rows}, meta))


if __name__ == "__main__":
    main()
