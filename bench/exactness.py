"""Exactness benchmark: 500 random small problems; every exact allocator / ilp backend against `dp`.

Problems: 2-12 units, 2-7 options, integer sizes 1-40 (ties included), random masks on two thirds,
errors monotone in size on half and arbitrary on the other half, budget uniform in [smallest,
largest]. Exact solvers (`ilp` on each backend, with and without the Lagrangian reduction): how
many equal `dp` (relative 1e-9, or within cpsat's reported rounding) and the largest deviation.
Heuristics (`greedy`, and `closed_form` / `uniform` when registered): median and worst relative
gap to `dp`'s optimum. Prints a table and writes JSON (`bench/results/exactness.json`, `--out`).

    python bench/exactness.py [--problems 500] [--seed 0]
    python bench/exactness.py --quick     # 20 problems
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import numpy as np


def random_problem(seed: int):
    """Somewhat larger than the tests' problems: up to 12 units, 7 options, sizes up to 40."""
    from bitplan.planner.synthetic import random_problem as make
    return make(seed, max_units=12, max_options=7, max_size=40)


COLUMNS = [("allocator", "label", "<"), ("kind", "kind", "<"), ("= dp", lambda r: f"{r['equal']}/{r['solved']}", ""),
           ("status opt", "optimal_status", "d"), ("median gap", "median_gap", ".2e"),
           ("worst gap", "worst_gap", ".2e"), ("ms/problem", "ms_per_problem", ".1f")]


def main(argv=None) -> int:
    ap = harness.parser("exactness", __doc__, quick={"problems": 20})
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    meta = harness.metadata(args)

    from bitplan.planner.allocators import ALLOCATORS

    exact = [(f"ilp:{b}{'' if r else ':full'}", "ilp", {"backend": b, "reduce": r})
             for b in ("cbc", "cpsat", "highs") for r in (True, False)]
    heuristic = [(n, n, {}) for n in ("greedy", "closed_form", "uniform") if n in ALLOCATORS]
    stats = {label: {"kind": "exact" if name == "ilp" else "heuristic", "equal": 0, "optimal_status": 0,
                     "devs": [], "seconds": 0.0} for label, name, _ in exact + heuristic}

    for i in range(args.problems):
        p = random_problem(args.seed + i)
        opt = p.total_error(ALLOCATORS["dp"](p).choice)
        for label, name, params in exact + heuristic:
            t0 = time.perf_counter()
            try:
                a = ALLOCATORS[name](p, seed=0, **params)
            except Exception as e:  # uniform may find nothing that fits: count it, do not stop
                stats[label].setdefault("failures", []).append(f"{i}: {type(e).__name__}")
                continue
            s = stats[label]
            s["seconds"] += time.perf_counter() - t0
            value = p.total_error(a.choice)
            assert p.total_size(a.choice) <= p.budget and p.allowed[np.arange(p.n_units), a.choice].all()
            dev = (value - opt) / opt if opt > 0 else value - opt
            tol = 1e-9 + (2 * a.info.get("rounding_bound", 0.0) / opt if opt > 0 else 0.0)
            s["equal"] += int(abs(dev) <= tol)
            s["optimal_status"] += int(a.status == "optimal")
            s["devs"].append(dev)

    rows = []
    for label, s in stats.items():
        devs = np.array(s.pop("devs"))
        n = len(devs)
        rows.append({"label": label, **s, "solved": n, "median_gap": float(np.median(devs)) if n else None,
                     "worst_gap": float(devs.max()) if n else None,
                     "worst_abs_dev": float(np.abs(devs).max()) if n else None,
                     "ms_per_problem": 1e3 * s["seconds"] / max(n, 1)})
    print(harness.table(rows, COLUMNS, title=f"{args.problems} random problems (2-12 units x 2-7 options), "
                                              f"{os.cpu_count()} cores"))
    out = harness.write_result(args.out, {"problems": args.problems, "seed": args.seed, "rows": rows}, meta)
    harness.done(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
