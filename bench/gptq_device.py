"""GPTQ of one weight on the CPU and on the GPU, side by side: time and agreement.

Profiling with `--quantizer gptq` runs GPTQ for every (module, option); it runs where the weight is
(`kernels/quantize.py:gptq`).  This times one call per device on random correlated inputs, for the
shapes given, and checks that both devices give the same codes (up to float rounding).

    python bench/gptq_device.py --shapes 576x1536,4096x4096,4096x14336 --bits 4

Prints a table and writes JSON (`bench/results/gptq_device.json`, `--out`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import torch

from bitplan.db.types import Option
from bitplan.kernels.quantize import gptq

COLUMNS = [("N", "N", "d"), ("K", "K", "d"), ("cpu s", "cpu_s", ".2f"), ("gpu s", "gpu_s", ".2f"),
           ("speedup", "speedup", ".1f"), ("same codes", "same_codes", ".4f"), ("cpu threads", "cpu_threads", "d")]


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    ap = harness.parser("gptq_device", __doc__, quick={"shapes": "576x1536"})
    ap.add_argument("--shapes", default="576x1536,4096x4096,4096x14336", help="NxK,... (out x in)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/gptq_device.py compares the CPU with a GPU: run it on a machine with CUDA")
    meta = harness.metadata(args)
    opt = Option(bits=args.bits, group_size=args.group_size)
    rows = []
    for spec in args.shapes.split(","):
        N, K = (int(v) for v in spec.split("x"))
        g = torch.Generator().manual_seed(0)
        X = torch.randn(2048, K, generator=g) * torch.rand(K, generator=g).mul(3).add(0.2)
        H = (X.T @ X).double()
        W = torch.randn(N, K, generator=g) / K**0.5
        gptq(W[:8].cuda(), H, opt)  # first-call costs (cuSOLVER, kernels) outside the timing
        t_cpu, cpu = timed(lambda: gptq(W, H, opt))
        t_gpu, gpu = timed(lambda: gptq(W.cuda(), H, opt))
        same = float((gpu.q.cpu() == cpu.q).float().mean())
        rows.append(dict(N=N, K=K, bits=args.bits, group=args.group_size, cpu_s=t_cpu, gpu_s=t_gpu,
                         speedup=t_cpu / t_gpu, same_codes=same, cpu_threads=torch.get_num_threads()))
        print(f"{N:>6}x{K:<6} cpu {t_cpu:8.2f} s  gpu {t_gpu:7.2f} s  (x{t_cpu / t_gpu:6.1f})  same codes {same:.4f}",
              flush=True)
    print(harness.table(rows, COLUMNS))
    harness.done(harness.write_result(args.out, {"rows": rows}, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
