"""Exactness benchmark: 500 random small problems; every exact allocator / ilp backend against `dp`.

Problems: 2-12 units, 2-7 options, integer sizes 1-40 (ties included), random masks on two thirds,
errors monotone in size on half and arbitrary on the other half, budget uniform in [smallest,
largest]. Exact solvers (`ilp` on each backend, with and without the Lagrangian reduction): how
many equal `dp` (relative 1e-9, or within cpsat's reported rounding) and the largest deviation.
Heuristics (`greedy`, and `closed_form` / `uniform` when registered): median and worst relative
gap to `dp`'s optimum. Prints a table and writes JSON (`bench/results/exactness.json`, `--output`).

    python bench/exactness.py [--problems 500] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def random_problem(seed: int):
    """Somewhat larger than the tests' problems: up to 12 units, 7 options, sizes up to 40."""
    from bitplan.planner.synthetic import random_problem as make
    return make(seed, max_units=12, max_options=7, max_size=40)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "exactness.json"))
    args = ap.parse_args(argv)

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

    head = f"{'allocator':<16}{'kind':<11}{'= dp':>9}{'status opt':>12}{'median gap':>12}{'worst gap':>12}{'ms/problem':>12}"
    print(f"{args.problems} random problems (2-12 units x 2-7 options), {os.cpu_count()} cores")
    print(head + "\n" + "-" * len(head))
    rows = []
    for label, s in stats.items():
        devs = np.array(s.pop("devs"))
        n = len(devs)
        row = {"label": label, **s, "solved": n, "median_gap": float(np.median(devs)) if n else None,
               "worst_gap": float(devs.max()) if n else None, "worst_abs_dev": float(np.abs(devs).max()) if n else None,
               "ms_per_problem": 1e3 * s["seconds"] / max(n, 1)}
        rows.append(row)
        print(f"{label:<16}{s['kind']:<11}{s['equal']:>5}/{n:<3}{s['optimal_status']:>12}"
              f"{row['median_gap']:>12.2e}{row['worst_gap']:>12.2e}{row['ms_per_problem']:>12.1f}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"problems": args.problems, "seed": args.seed, "cpus": os.cpu_count(),
                               "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
