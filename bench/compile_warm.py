"""Compile every configuration the dispatcher's tuner will time for the given products, in parallel processes,
into Triton's on-disk cache: the tuner in `bench/kernels.py` then finds them compiled.

On the device machine compiling dominates a benchmark run (one candidate a few seconds, 15 to 60 candidates a
product), and Triton compiles one kernel at a time in a process.  Run this first with the same arguments:

    python bench/compile_warm.py --shapes square-8192 --bits 2,3,4,8 --batches 1,2,4,8,16 -j 12
    python bench/kernels.py --shapes square-8192 --bits 2,3,4,8 --batches 1,2,4,8,16 --no-compare
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()


_WEIGHTS: dict[tuple, tuple] = {}


def _compile(task) -> tuple[str, float]:
    import torch

    from bitplan.kernels.matmul import _launch
    from bitplan.kernels.timing import random_packed

    N, K, bits, group, M, regime, cfg = task
    if (N, K, bits, group) not in _WEIGHTS:
        packed, scales, zeros = random_packed(N, K, bits, group)
        _WEIGHTS[N, K, bits, group] = (packed[0], packed[-1], scales, zeros[0], zeros[-1])
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    t = time.time()
    try:
        _launch(regime, x, *_WEIGHTS[N, K, bits, group], M, N, K, bits, group, False, cfg)
        torch.cuda.synchronize()
        return "", time.time() - t
    except Exception as e:  # noqa: BLE001 - the tuner skips what fails to compile: so do we
        return f"{regime} {cfg}: {type(e).__name__}", time.time() - t


def main(argv=None):
    bench_kernels = harness.sibling("kernels")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="square-8192")
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("-j", type=int, default=12)
    ap.add_argument("--regime", default=None, help="only this kernel's candidates (default: the dispatcher's)")
    args = ap.parse_args(argv)
    shapes = [s for s in bench_kernels.SHAPES if any(s.startswith(p) for p in args.shapes.split(","))]
    import torch

    from bitplan.kernels.matmul import CONFIGS, _regimes

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tasks = []
    for s in shapes:
        N, K = bench_kernels.SHAPES[s]
        for b in [int(b) for b in args.bits.split(",")]:
            for m in [int(m) for m in args.batches.split(",")]:
                seen = set()  # configurations that differ only in SPLIT_K share a binary (ATOMIC aside)
                for r in [args.regime] if args.regime else _regimes(m, K, args.group_size, torch.bfloat16):
                    for c in CONFIGS[r](m, N, K, b, args.group_size, sms):
                        key = (r, tuple(sorted((k, v) for k, v in c.items() if k != "SPLIT_K")), c["SPLIT_K"] > 1)
                        if key not in seen:
                            seen.add(key)
                            tasks.append((N, K, b, args.group_size, m, r, c))
    print(f"{len(tasks)} kernels to compile", flush=True)
    t0 = time.time()
    with mp.get_context("spawn").Pool(args.j) as pool:
        done = pool.map(_compile, tasks, chunksize=1)
    errors = [e for e, _ in done if e]
    print(f"compiled {sum(1 for e, t in done if t > 0)} candidates in {time.time() - t0:.0f} s "
          f"({len(errors)} failed{': ' + '; '.join(errors[:3]) if errors else ''})", flush=True)


if __name__ == "__main__":
    main()
