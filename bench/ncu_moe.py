"""One `moe_matmul` launch per width mix, for Nsight Compute to read (no timing here): does a mixed-width launch
cost more than the mean of its widths' uniform launches?

    ncu --kernel-name regex:moe --metrics ... python bench/ncu_moe.py

DeepSeek-V3's gate projection (8 active experts of 2048 x 7168, batch 1), the kernel's default configuration
(not tuned, so that every mix runs the same one), each mix launched twice.  Prints the run's metadata
(commit, device, versions) as its first line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import torch

from bitplan.kernels.moe import moe_matmul, route

moe_kernels = harness.sibling("moe_kernels")  # its layer shapes and packed experts
LAYERS, expert_pack = moe_kernels.LAYERS, moe_kernels.expert_pack

MIXES = {"2,3,4,8 mixed": [2, 3, 4, 8], "4 uniform": [4], "2 uniform": [2], "8 uniform": [8], "3 uniform": [3]}


def main(argv=None):
    args = harness.parser("ncu_moe", __doc__, result=False).parse_args(argv)
    print(json.dumps(harness.metadata(args)), flush=True)
    E, top_k, N, K = LAYERS["deepseek-v3.gate"]
    top = torch.randperm(E, generator=torch.Generator().manual_seed(1))[:top_k][None].cuda()
    seg_start = torch.unique_consecutive(route(top, E)[2])  # the chosen experts' segments, as 0..top_k-1
    local = torch.arange(seg_start.numel() - 1, device="cuda")
    x = torch.randn(top_k, K, device="cuda", dtype=torch.bfloat16)
    for name, cycle in MIXES.items():
        w = expert_pack([cycle[i % len(cycle)] for i in range(top_k)], N, K, 128)
        for _ in range(2):
            moe_matmul(x, w, local, seg_start, max_rows=1, config={})
        torch.cuda.synchronize()
        print(name, flush=True)


if __name__ == "__main__":
    main()
