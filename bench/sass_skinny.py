"""SASS of the skinny kernel (`kernels/skinny.py`, batch 2-16 on the tensor cores), compiled for sm_90 without a
GPU: its K loop's instructions per weight, by kind, and whether anything goes through shared memory.

What the kernel is built to avoid shows here: a K-ordered code tile converted through shared memory reads as
STS/LDS (or STSM/LDSM) per weight in the loop; the dot itself as HGMMA (wgmma) or HMMA (mma.sync).

    python bench/sass_skinny.py                   # 2, 3, 4, 8 bits, bf16 and fp16 activations
    python bench/sass_skinny.py --bits 4 --block-n 128 --block-k 128 --dump
    python bench/sass_skinny.py --bits 4 --block-m 128 --warps 8 --stages 3 --scale-w --xperm   # a batch-256 tile
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import triton
from triton.backends.compiler import GPUTarget

from bitplan.kernels.reference import shards
from bitplan.kernels.skinny import _skinny_kernel, offset

sass_gemv = harness.sibling("sass_gemv")


def compile_skinny(bits: int, dtype: str, block_n: int, block_k: int, warps: int, stages: int = 1, block_m: int = 16,
                   scale_w: bool = False, xperm: bool = False):
    widths = shards(bits)
    names = list(_skinny_kernel.arg_names)
    types = dict(x_ptr=f"*{dtype}", q0_ptr="*i32", q1_ptr="*i32", s_ptr="*fp16", z0_ptr="*i32", z1_ptr="*i32",
                 y_ptr=f"*{dtype}", ws_ptr="*fp32", count_ptr="*i32")
    constexprs = dict(GROUP=128, W0=widths[0], W1=widths[1] if len(widths) > 1 else 0, SYMMETRIC=False,
                      DOT_FP32=False, OFF=offset(widths, dtype == "fp16"), BLOCK_M=block_m, BLOCK_N=block_n,
                      BLOCK_K=block_k, ATOMIC=True, SCALE_W=scale_w, XPERM=xperm, ONE_M=block_m <= 16)
    signature = {n: ("constexpr" if n in constexprs else types.get(n, "i32")) for n in names}
    aligned = [(i,) for i, n in enumerate(names) if n.endswith("_ptr") or n.startswith("stride") or n in ("N", "K")]
    attrs = {a: [["tt.divisibility", 16]] for a in aligned}
    src = triton.compiler.ASTSource(fn=_skinny_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


SHARED = ("STS", "LDS", "LDSM", "STSM", "LDGSTS", "BAR")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--block-k", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--block-m", type=int, default=16, help="rows of x a program (above 16: a large-batch tile)")
    ap.add_argument("--scale-w", action="store_true", help="scale and zero on the weight tile (large batches)")
    ap.add_argument("--xperm", action="store_true", help="x loaded in K order and permuted in the program")
    ap.add_argument("--dump", action="store_true", help="print the loop body")
    ap.add_argument("--ttgir", action="store_true", help="print the TTGIR")
    args = ap.parse_args(argv)
    for bits in [int(b) for b in args.bits.split(",")]:
        for dtype in args.dtypes.split(","):
            k = compile_skinny(bits, dtype, args.block_n, args.block_k, args.warps, args.stages, args.block_m,
                               args.scale_w, args.xperm)
            body = sass_gemv.loop_body(sass_gemv.sass(k.asm["cubin"]))
            weights = args.block_k * args.block_n // (32 * args.warps)  # a thread's weights per iteration
            kinds = collections.Counter((ins.split()[1] if ins.startswith("@") else ins.split()[0]).split(".")[0]
                                        for ins in body)
            top = ", ".join(f"{n} {c}" for n, c in kinds.most_common(10))
            shared = ", ".join(f"{n} {kinds[n]}" for n in SHARED if kinds[n])
            print(f"{bits} bits {dtype}  {sass_gemv.resources(k.asm['cubin'])}  smem {k.metadata.shared} B  loop "
                  f"{len(body):4d} / {weights} weights = {len(body) / weights:.2f} a weight  [shared: {shared or '-'}]"
                  f"  ({top})", flush=True)
            if args.ttgir:
                print(k.asm["ttgir"])
            if args.dump:
                print("\n".join(body))


if __name__ == "__main__":
    sys.exit(main())
