"""Scale benchmark: every allocator on a synthetic profile shaped like DeepSeek-V3 (45,032 modules x 7 options).

Shape: 61 decoder layers; each has the MLA attention projections (q_a 1536x7168, q_b 24576x1536,
kv_a 576x7168, kv_b 32768x512, o 7168x16384); layers 0-2 a dense MLP (gate/up 18432x7168, down
7168x18432), layers 3-60 an MoE of 256 routed experts + 1 shared expert (gate/up 2048x7168, down
7168x2048). Options: 2, 3, 4, 5, 6, 8 bits with group 128 (fp16 scale + b-bit zero per group) and
16 bits. Errors: seeded convex curves s_u * 2^(-theta_u * b) * (1 + 5% jitter), s_u log-normal times
the module's size. Budget 3.25 bits per weight.

Each allocator runs in its own (spawned) process, so its peak RSS (`resource.getrusage`, problem
included) is its own. Prints a table and writes JSON (`bench/results/scale.json`, `--out`).

    python bench/scale.py [--time-limit 60] [--full] [--full-time-limit 60] [--only greedy,ilp:cpsat]
    python bench/scale.py --quick      # 4 layers, a 10 s limit: checks that it runs
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import numpy as np

BITS = np.array([2, 3, 4, 5, 6, 8, 16])
GROUP = 128
ATTN = [(1536, 7168), (24576, 1536), (576, 7168), (32768, 512), (7168, 16384)]  # q_a, q_b, kv_a, kv_b, o


def shapes(layers: int = 61) -> np.ndarray:
    """[modules, 2] (out, in) of every planned matrix of the first `layers` layers, in layer order."""
    out = []
    for layer in range(layers):
        out += ATTN
        if layer < 3:
            out += [(18432, 7168), (18432, 7168), (7168, 18432)]
        else:
            out += [(2048, 7168), (2048, 7168), (7168, 2048)] * 257  # 256 routed + 1 shared
    return np.array(out, dtype=np.int64)


def deepseek_problem(seed: int = 0, bpw: float = 3.25, layers: int = 61):
    """The AllocationProblem of the module docstring (its first `layers` layers)."""
    from bitplan.planner.problem import AllocationProblem

    rng = np.random.default_rng(seed)
    shp = shapes(layers)
    numel = shp[:, 0] * shp[:, 1]
    groups = shp[:, 0] * -(-shp[:, 1] // GROUP)
    size = numel[:, None] * BITS + np.where(BITS < 16, groups[:, None] * (16 + BITS), 0)
    U = len(shp)
    s = rng.lognormal(0.0, 1.5, U) * numel / 1e7
    theta = rng.uniform(1.6, 2.2, U)
    error = s[:, None] * np.exp2(-theta[:, None] * BITS) * (1 + 0.05 * rng.random((U, len(BITS))))
    error[:, -1] = 0.0  # 16 bits: the unquantized weights
    return AllocationProblem(error, size, np.ones(size.shape, dtype=bool), int(bpw * numel.sum())), int(numel.sum())


def runs(args, registry) -> list[tuple[str, str, dict, float | None]]:
    """(label, allocator, params, time limit) of every run asked for."""
    out = [("greedy", "greedy", {}, None)]
    for name in ("closed_form", "uniform"):
        if name in registry:
            out.append((name, name, {}, None))
    for backend in ("cbc", "cpsat", "highs"):
        out.append((f"ilp:{backend}", "ilp", {"backend": backend}, args.time_limit))
    if args.full:
        for backend in ("cbc", "cpsat", "highs"):
            out.append((f"ilp:{backend}:full", "ilp", {"backend": backend, "reduce": False}, args.full_time_limit))
    if args.only:
        keep = set(args.only.split(","))
        out = [r for r in out if r[0] in keep]
    return out


def worker(label, name, params, time_limit, seed, layers, queue):
    """One allocator in this process: build the problem, solve, report time, status and peak RSS."""
    from bitplan.planner.allocators import ALLOCATORS

    p, numel = deepseek_problem(seed, layers=layers)
    t0 = time.perf_counter()
    a = ALLOCATORS[name](p, seed=0, time_limit=time_limit, **params)
    seconds = time.perf_counter() - t0
    choice = np.asarray(a.choice)
    queue.put({
        "label": label, "allocator": name, "params": params, "time_limit": time_limit,
        "seconds": seconds, "status": a.status, "gap": a.info.get("gap"),
        "predicted_error": p.total_error(choice), "bits": p.total_size(choice), "budget_bits": p.budget,
        "bits_per_weight": p.total_size(choice) / numel, "within_budget": p.total_size(choice) <= p.budget,
        "free_units": a.info.get("free_units"), "solver_seconds": a.info.get("solver_seconds"),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })


COLUMNS = [("allocator", "label", "<"), ("time s", "seconds", ".2f"), ("pred.err", "predicted_error", ".6f"),
           ("bits/w", "bits_per_weight", ".4f"), ("to LP bound", "gap_to_lp_bound", ".2e"),
           ("RSS MiB", "peak_rss_mib", ".0f"), ("status", "status", "<")]


def main(argv=None) -> int:
    ap = harness.parser("scale", __doc__, quick={"layers": 4, "time_limit": 10.0})
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per ilp backend (reduced model)")
    ap.add_argument("--full", action="store_true", help="also run each backend on the whole, unreduced model")
    ap.add_argument("--full-time-limit", type=float, default=60.0, help="seconds per ilp backend, whole model")
    ap.add_argument("--only", help="comma-separated labels, e.g. greedy,ilp:cpsat")
    ap.add_argument("--layers", type=int, default=61, help="decoder layers of the problem (default 61: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    meta = harness.metadata(args)

    from bitplan.planner.allocators import ALLOCATORS

    p, numel = deepseek_problem(args.seed, layers=args.layers)
    ctx = mp.get_context("spawn")
    rows = []
    for label, name, params, limit in runs(args, ALLOCATORS):
        queue = ctx.Queue()
        proc = ctx.Process(target=worker, args=(label, name, params, limit, args.seed, args.layers, queue))
        proc.start()
        row = queue.get()
        proc.join()
        rows.append(row)
        print(f"  {label}: {row['seconds']:.2f} s, {row['status']}", file=sys.stderr, flush=True)

    # The gap every row can be measured against: greedy's LP bound, and the best plan found.
    from bitplan.planner.allocators import greedy
    lp = float(greedy.solve(p).info["bound"])
    best = min(r["predicted_error"] for r in rows)
    for r in rows:
        r["gap_to_lp_bound"] = (r["predicted_error"] - lp) / r["predicted_error"]
        r["excess_over_best"] = (r["predicted_error"] - best) / best

    print(harness.table(rows, COLUMNS, title=f"DeepSeek-V3-shaped: {p.n_units} modules x {p.n_options} options, "
                                              f"budget 3.25 bpw, {os.cpu_count()} cores"))
    out = harness.write_result(args.out, {"problem": {"modules": p.n_units, "options": p.n_options, "bpw": 3.25,
                                                      "layers": args.layers, "budget_bits": p.budget,
                                                      "params": numel, "seed": args.seed, "lp_bound": lp},
                                          "rows": rows}, meta)
    harness.done(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
