"""Fused dequantize+matmul vs torch bf16 matmul, side by side in one process, on the GPU.

Shapes: SmolLM2-135M (K = 576) and Llama-2-7B / 70B-sized projections; batches 1, 16, 256; 2/3/4/8 bits,
group 128. Times are medians of `triton.testing.do_bench` with the L2 cache flushed between calls
(weights cold, as in decode). Prints a table and writes JSON (`--output`).

    python bench/kernels.py --output results/kernels.json
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import triton

from bitplan.kernels import reference
from bitplan.kernels.matmul import matmul

SHAPES = {  # name: (K, N) of y = x @ W.T with W [N, K]
    "smollm2.gate": (576, 1536),
    "llama7b.qkvo": (4096, 4096),
    "llama7b.up": (4096, 11008),
    "llama7b.down": (11008, 4096),
    "llama70b.o": (8192, 8192),
}


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms, L2 flushed by do_bench


def run(bits_list, batches, group):
    dev = "cuda"
    rows = []
    for name, (K, N) in SHAPES.items():
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        for bits in bits_list:
            G = -(-K // group)
            q = torch.randint(0, 2**bits, (K, N), device="cpu")
            packed = [t.to(dev) for t in reference.pack(q, bits)]
            zeros = [t.to(dev) for t in reference.pack(torch.randint(0, 2**bits, (G, N)), bits)]
            scales = (torch.rand(G, N) * 0.01).half().to(dev)
            for M in batches:
                x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                ours = matmul(x, packed, scales, zeros, bits, group, K)
                zq = reference.unpack([z.cpu() for z in zeros], bits, G)
                ref = reference.matmul(x.float().cpu(), [p.cpu() for p in packed], scales.cpu(), zq, bits, group, K)
                rel = float((ours.float().cpu() - ref).norm() / ref.norm())
                t_ours = bench(lambda: matmul(x, packed, scales, zeros, bits, group, K))
                t_bf16 = bench(lambda: torch.nn.functional.linear(x, w))
                packed_bytes = sum(p.numel() * 4 for p in packed) + scales.numel() * 2 + sum(z.numel() * 4 for z in zeros)
                floor_ms = packed_bytes / 3.35e12 * 1e3  # H100 SXM HBM3 ~3.35 TB/s
                rows.append(dict(shape=name, K=K, N=N, bits=bits, batch=M, ours_us=t_ours * 1e3,
                                 bf16_us=t_bf16 * 1e3, speedup=t_bf16 / t_ours, mem_floor_us=floor_ms * 1e3,
                                 rel_err=rel))
                r = rows[-1]
                print(f"{name:>14} {bits}b M={M:<4} ours {r['ours_us']:8.1f} us  bf16 {r['bf16_us']:8.1f} us  "
                      f"x{r['speedup']:5.2f}  floor {r['mem_floor_us']:7.1f} us  err {rel:.1e}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--batches", default="1,16,256")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--output", default="bench/results/kernels.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py measures GPU kernels: run it on a machine with CUDA")
    rows = run([int(b) for b in args.bits.split(",")], [int(b) for b in args.batches.split(",")], args.group_size)
    print(f"\n{'shape':>14} {'bits':>4} {'batch':>5} {'ours us':>9} {'bf16 us':>9} {'speedup':>8} {'floor us':>9}")
    for r in rows:
        print(f"{r['shape']:>14} {r['bits']:>4} {r['batch']:>5} {r['ours_us']:>9.1f} {r['bf16_us']:>9.1f} "
              f"{r['speedup']:>8.2f} {r['mem_floor_us']:>9.1f}")
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), group_size=args.group_size)
    import pathlib
    out = pathlib.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
