"""The evolutionary allocator on the embedded model: fitness KL, held-out KL and perplexity vs its ilp start.

    python bench/evolutionary.py --db /tmp/bitplan.db --profile prof-... [--budget 3.5bpw]
        [--generations 20] [--offspring 12] [--fitness-tokens 1024] [--heldout-tokens 1024]
        [--row-tokens 128] [--eval-tokens 8192] [--out evolutionary.json]

Needs a stored profile of the model (`bitplan profile smollm2-135m --db ...`).  Perplexity is measured
on the held-out tragedies (`shakespeare:eval`) with the plan's weights swapped into the loaded model
(the RTN dequantized values `apply` writes), for the ilp start and the evolutionary result.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--budget", default="3.5bpw")
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--offspring", type=int, default=12)
    ap.add_argument("--fitness-tokens", type=int, default=1024)
    ap.add_argument("--heldout-tokens", type=int, default=1024)
    ap.add_argument("--row-tokens", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state", help="search state file (resume)")
    ap.add_argument("--out", default="evolutionary.json")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (1 on a shared, busy machine)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)

    from bitplan.db.store import Store
    from bitplan.db.types import Budget
    from bitplan.executor.evaluate import perplexity
    from bitplan.planner.allocators import evolutionary, ilp
    from bitplan.planner.plan import problem_from_profile
    from bitplan.planner.workflow import eval_windows
    from bitplan.profiler.fitness import kl_fitness_for_profile
    from bitplan.profiler.model import load_model

    _, profile = Store(args.db).find(args.profile)
    t0 = time.perf_counter()
    loaded = load_model(profile.model.source)
    oracle = kl_fitness_for_profile(loaded, profile, fitness_tokens=args.fitness_tokens,
                                    heldout_tokens=args.heldout_tokens, row_tokens=args.row_tokens)
    setup = time.perf_counter() - t0

    # the search itself (not through allocate) so that its whole report is at hand
    budget_bits = Budget.parse(args.budget).planned_bits(profile.n_params, profile.fixed_bits)
    problem, unit = problem_from_profile(profile, budget_bits)
    t0 = time.perf_counter()
    result = evolutionary.solve(problem, seed=args.seed, unit=unit, generations=args.generations,
                                offspring=args.offspring,
                                context=evolutionary.SearchContext(oracle, args.state, progress=True))
    search = time.perf_counter() - t0
    start = ilp.solve(problem, seed=args.seed).choice

    windows = eval_windows(loaded.tokenizer, tokens=args.eval_tokens)
    ppl = {}
    for name, choice in (("ilp", start), ("evolutionary", result.choice)):
        oracle._install(np.asarray(choice)[unit])
        ppl[name] = perplexity(loaded.model, windows.ids, progress=False)
    oracle.close()
    info = {k: v for k, v in result.info.items() if k != "history"}
    row = {"status": result.status, "budget": args.budget, "bits": problem.total_size(result.choice),
           "start_bits": problem.total_size(start), "budget_bits": problem.budget,
           "modules_changed": int((np.asarray(start) != result.choice).sum()),
           "ppl_start": ppl["ilp"], "ppl": ppl["evolutionary"], "eval_tokens": int(windows.ids.numel()),
           "setup_seconds": setup, "search_seconds": search, "forward_blocks": oracle.forward_blocks,
           "n_blocks": len(oracle.replayer.layers), "variants_quantized": oracle.store.quantized,
           "packed_mib": oracle.store.packed_bytes() / 2**20, **info, "history": result.info["history"]}
    print(json.dumps({k: v for k, v in row.items() if k != "history"}, indent=2, default=str))
    with open(args.out, "w") as f:
        json.dump(row, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
