"""Programmatic dependent launch on a chain of our decode kernels, each launch mode timed in one process.

Each layer of Llama-3-8B's shape at batch 1 runs its quantized linears and its attention as our kernels alone:
q+k+v, attention over a cache, o, gate+up, down, each reading the one before (no norm, rotary or activation
between them, so every kernel's predecessor but q+k+v's is one of ours: that one follows the two small
kernels that keep the random values in range).  The layers' weights are distinct and together far
exceed L2, as in a decode step.  The chain is captured in one CUDA graph per `BITPLAN_PDL` mode
(`kernels/matmul.py`'s `pdl`): off, wait (launched as programmatic dependents, which wait in the kernel), and
prefetch (the gemv's programs also ask L2 for their first weights before they wait).  Configurations are fixed
(`CONFIGS`, the tuner's choices on an H100 in `bench/results/decode_32layers_v14.json`), so that the modes run the
same kernels and the bench compiles a handful, not the tuner's candidates.

    python bench/pdl.py                    # 32 layers, 4 bits, every mode
    python bench/pdl.py --layers 8 --modes off,prefetch

Prints a table and writes JSON (`--out`, default bench/results/pdl.json).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import torch

from bitplan.kernels import matmul as mm
from bitplan.kernels.attention import decode_attention
from bitplan.kernels.timing import clone_packed, random_packed

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 4096, 32, 8, 128, 14336
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (2 * INTERMEDIATE, 4096), "down": (4096, INTERMEDIATE)}
CONFIGS = {  # 4 bits, group 128, batch 1
    "qkv": dict(BLOCK_M=1, BLOCK_N=512, BLOCK_K=64, SPLIT_K=64, num_warps=4, num_stages=1, HALF2=True),
    "o": dict(BLOCK_M=1, BLOCK_N=1024, BLOCK_K=64, SPLIT_K=64, num_warps=8, num_stages=1, HALF2=False),
    "gate_up": dict(BLOCK_M=1, BLOCK_N=1024, BLOCK_K=128, SPLIT_K=32, num_warps=4, num_stages=1, HALF2=True),
    "down": dict(BLOCK_M=1, BLOCK_N=512, BLOCK_K=32, SPLIT_K=132, num_warps=4, num_stages=1, HALF2=True),
}
COLUMNS = [("mode", "mode", "<"), ("layers", "layers", "d"), ("step us", "step_us", ".1f"),
           ("us a layer", "layer_us", ".2f"), ("vs off", "vs_off", ".3f"), ("max err vs off", "max_err_vs_off", ".1e")]


def main(argv=None):
    ap = harness.parser("pdl", __doc__, quick={"layers": 2})
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--cache", type=int, default=645, help="cache positions the attention reads")
    ap.add_argument("--modes", default=",".join(mm.PDL_MODES))
    ap.add_argument("--replays", type=int, default=50)
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",")]
    if unknown := [m for m in modes if m not in mm.PDL_MODES]:
        ap.error(f"--modes: unknown {', '.join(unknown)}; choose among {', '.join(mm.PDL_MODES)}")
    if not torch.cuda.is_available():
        raise SystemExit("bench/pdl.py times GPU kernels: run it on a machine with CUDA")
    bits, group = 4, 128
    first = {name: random_packed(n, k, bits, group) for name, (n, k) in SHAPES.items()}
    layers = [{name: clone_packed(w) for name, w in first.items()} for _ in range(args.layers)]
    g = torch.Generator(device="cuda").manual_seed(0)
    caches = [tuple(torch.randn(1, KV_HEADS, args.cache, HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2)) for _ in range(args.layers)]
    x = torch.randn(1, HIDDEN, generator=g, device="cuda", dtype=torch.bfloat16)

    def linear(h, name, weight):
        packed, scales, zeros = weight
        return mm.matmul(h, packed, scales, zeros, bits, group, SHAPES[name][1], config=CONFIGS[name], regime="gemv")

    def step():
        h = x
        for weights, (key, value) in zip(layers, caches):
            q = linear(h, "qkv", weights["qkv"])[:, :HIDDEN]
            a = decode_attention(q.reshape(1, HEADS, 1, HEAD_DIM), key, value, None, HEAD_DIM ** -0.5)
            h = linear(a.reshape(1, HIDDEN), "o", weights["o"])
            up = linear(h, "gate_up", weights["gate_up"])[:, :INTERMEDIATE]
            h = linear(up, "down", weights["down"])
            h = h / h.norm()  # keeps the random chain in range: two small torch kernels a layer, in every mode
        return h

    rows, reference = [], None
    meta = harness.metadata(args)
    for mode in modes:
        mm.PDL_MODE = mode  # read at each launch, so at each capture
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graph.replay()
        times = []
        for _ in range(args.replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        step_us = sorted(times)[len(times) // 2]
        if reference is None:
            reference = (out.float().clone(), step_us)
        against_off = modes[0] == "off"  # the first mode is the baseline only if it is off
        rows.append(dict(mode=mode, layers=args.layers, step_us=step_us, layer_us=step_us / args.layers,
                         vs_off=step_us / reference[1] if against_off else None,
                         max_err_vs_off=float((out.float() - reference[0]).abs().max()) if against_off else None))
        print(harness.table(rows[-1:], COLUMNS), flush=True)
        harness.write_result(args.out, {"rows": rows, "configs": CONFIGS}, meta)
    print(harness.table(rows, COLUMNS, title="one graph step of the chain, median of the replays"))
    harness.done(harness.write_result(args.out, {"rows": rows, "configs": CONFIGS}, meta))


if __name__ == "__main__":
    main()
