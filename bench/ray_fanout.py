"""A profile fanned out over a local Ray cluster against the same profile in one process.

For each model (default: the embedded SmolLM2 and, where it exists, the tiny-Mixtral fixture) and each
estimator (`--estimators`, default the default `calibrated` with GPTQ), `profile_model` runs twice in this
process with torch on `--threads` threads: alone, then with `cluster=` a local Ray cluster of `--cpus`
CPUs, whose workers run the same number of threads each (`--cpus / --threads` workers).  Reported: each
one's wall time, the speed-up, and whether the error tables are bit-identical (and the profile ids equal).
The cluster's start (its workers' first imports) is timed apart, once, before the runs.

    python bench/ray_fanout.py [--models smollm2-135m,DIR] [--estimators calibrated,hessian]
                               [--cpus 2] [--threads 1] [--tokens 4096]
    python bench/ray_fanout.py --quick      # tiny-Mixtral only, 512 tokens
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import numpy as np

def _warm() -> str:
    import torch  # the workers' first import of torch, timed with the cluster's start

    return torch.__version__


TINY_MIXTRAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tiny-mixtral"


def main(argv=None):
    ap = harness.parser("ray_fanout", __doc__, quick={"models": str(TINY_MIXTRAL), "tokens": 512})
    ap.add_argument("--models", default=",".join(["smollm2-135m"] + [str(TINY_MIXTRAL)] * TINY_MIXTRAL.is_dir()),
                    help="comma-separated models (default: the embedded SmolLM2 and tiny-Mixtral)")
    ap.add_argument("--estimators", default="calibrated", help="comma-separated estimators (GPTQ quantizer)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads here and in each worker (default 1)")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    args = ap.parse_args(argv)

    import ray
    import torch

    from bitplan.planner.app.usecases import ProfileRequest, profile_options
    from bitplan.profiler.cluster import Cluster
    from bitplan.profiler.model import load_model
    from bitplan.profiler.profile import profile_model

    torch.set_num_threads(args.threads)
    meta = harness.metadata(args, torch_threads=torch.get_num_threads())
    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cluster = Cluster("local")
    workers = cluster.workers("cpu")[0]
    ray.get([ray.remote(num_cpus=1)(_warm).remote() for _ in range(args.cpus)])
    start = time.perf_counter() - t0
    options, quantizer = profile_options(ProfileRequest())
    rows = []
    for source in args.models.split(","):
        loaded = load_model(source)
        for estimator in args.estimators.split(","):
            runs = {}
            for how, where in (("alone", None), ("ray", cluster)):
                t = time.perf_counter()
                runs[how] = profile_model(loaded, options, estimator=estimator, quantizer=quantizer,
                                          n_tokens=args.tokens, embeddings="plan", cluster=where)
                runs[how + "_s"] = time.perf_counter() - t
                print(f"{Path(source).name} {estimator} {how}: {runs[how + '_s']:.1f} s", flush=True)
            a, b = runs["alone"], runs["ray"]
            rows.append({"model": Path(source).name, "estimator": estimator, "modules": len(a.modules),
                         "alone_s": runs["alone_s"], "ray_s": runs["ray_s"],
                         "speedup": runs["alone_s"] / runs["ray_s"], "same_id": a.id == b.id,
                         "identical": bool(np.array_equal(a.error, b.error)),
                         "max_abs_diff": float(np.abs(a.error - b.error).max()), "profile_id": a.id})
            harness.write_result(args.out, {"workers": workers, "threads": args.threads, "cluster_start_s": start, "rows": rows}, meta)
    ray.shutdown()
    print(harness.table(rows, [("model", "model", "<"), ("estimator", "estimator", "<"), ("modules", "modules", "d"),
                               ("alone s", "alone_s", ".1f"), ("ray s", "ray_s", ".1f"), ("speed-up", "speedup", ".2f"),
                               ("same id", "same_id", ""), ("identical", "identical", "")],
                        title=f"\nprofile alone vs on a local Ray cluster of {args.cpus} CPUs: {workers} workers, "
                              f"{args.threads} torch thread(s) each and here (cluster start {start:.1f} s, not counted)"))
    harness.done(harness.write_result(args.out, {"workers": workers, "threads": args.threads, "cluster_start_s": start, "rows": rows},
                                      meta))


if __name__ == "__main__":
    main()
