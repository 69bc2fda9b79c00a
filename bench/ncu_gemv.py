"""One launch of the gemv kernel (batch 1 by default) per configuration, for Nsight Compute to read (no timing
here).

    ncu --kernel-name regex:gemv --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python bench/ncu_gemv.py --n 8192 --k 8192 --bits 4

Each configuration is compiled by a first call and launched once more; profile with `--launch-skip`
if only the second launches matter (`--repeat`).  Prints the run's metadata (commit, device, versions) as
its first line, so that a saved Nsight Compute report says what it measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import torch

from bitplan.kernels.matmul import CONFIGS, matmul
from bitplan.kernels.timing import random_packed


def main(argv=None):
    ap = harness.parser("ncu_gemv", __doc__, result=False)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1, help="rows of x (the gemv serves up to matmul.GEMV_MAX_M)")
    ap.add_argument("--regime", choices=sorted(CONFIGS), default="gemv", help="the kernel whose configurations run")
    ap.add_argument("--configs", default="0,4", help="indices into the regime's configurations for this shape, or 'all'")
    args = ap.parse_args(argv)
    print(json.dumps(harness.metadata(args)), flush=True)
    N, K, bits, group = args.n, args.k, args.bits, args.group_size
    packed, scales, zeros = random_packed(N, K, bits, group)
    x = torch.randn(args.batch, K, device="cuda", dtype=torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    configs = CONFIGS[args.regime](args.batch, N, K, bits, group, sms)
    chosen = range(len(configs)) if args.configs == "all" else [int(c) for c in args.configs.split(",")]
    for i in chosen:
        print(f"config {i}: {configs[i]}", flush=True)
        matmul(x, packed, scales, zeros, bits, group, K, config=configs[i], regime=args.regime)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
