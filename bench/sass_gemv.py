"""SASS of the gemv kernel's K loop, compiled for sm_90 without a GPU: instructions per weight, by kind.

The fp32 body and the HALF2 body at batch 1 were told apart first by this count (Nsight Compute's
instructions per weight, `bench/ncu_gemv.py`, needs the device): one loop iteration is one K tile, so a
thread's loop body over `BLOCK_K x outputs a thread` weights is the static cost per weight (every
`static_range` is unrolled; no branch inside).  It runs wherever Triton's bundled ptxas and cuobjdump run.

    python bench/sass_gemv.py                      # 2, 3, 4, 8 bits, HALF2 on and off, the default tile
    python bench/sass_gemv.py --bits 2 --block-n 2048 --warps 4 --block-k 64 --dump
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import triton
from triton.backends.compiler import GPUTarget

from bitplan.kernels.matmul import _gemv_kernel
from bitplan.kernels.reference import shards


def compile_gemv(bits: int, half2: bool, block_m: int, block_n: int, block_k: int, warps: int):
    widths = shards(bits)
    names = list(_gemv_kernel.arg_names)
    types = dict(x_ptr="*bf16", q0_ptr="*i32", q1_ptr="*i32", s_ptr="*fp16", z0_ptr="*i32", z1_ptr="*i32",
                 y_ptr="*bf16", ws_ptr="*fp32", count_ptr="*i32")
    constexprs = dict(GROUP=128, W0=widths[0], W1=widths[1] if len(widths) > 1 else 0, SYMMETRIC=False,
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ATOMIC=True, EVEN_K=True, HALF2=half2,
                      PDL=0)
    signature = {n: ("constexpr" if n in constexprs else types.get(n, "i32")) for n in names}
    # what the launcher specialises at run time for the benchmarked layers: 16-byte aligned pointers, N, K and
    # strides multiples of 16 (without it, the word loads are not vectorised)
    aligned = [(i,) for i, n in enumerate(names) if n.endswith("_ptr") or n.startswith("stride") or n in ("N", "K")]
    attrs = {a: [["tt.divisibility", 16]] for a in aligned}
    src = triton.compiler.ASTSource(fn=_gemv_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=1))


def cuobjdump(cubin: bytes, *flags: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), *flags, f.name], capture_output=True, text=True, check=True).stdout


def sass(cubin: bytes) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+([^;]*);", cuobjdump(cubin, "-sass"))]


def resources(cubin: bytes) -> str:
    """Registers and stack bytes a thread (the compiler's resource report)."""
    m = re.search(r"REG:(\d+) STACK:(\d+)", cuobjdump(cubin, "-res-usage"))
    return f"regs {m.group(1):>3}  stack {m.group(2)}" if m else "regs ?"


def loop_body(lines: list[str]) -> list[str]:
    """The longest backward-branching range: the K loop (the kernel's only loop when ATOMIC's drain is
    straight-line)."""
    best = []
    for i, ins in enumerate(lines):
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", ins)
        if "BRA" not in ins or not m:
            continue
        # cuobjdump prints branch targets as byte offsets: 16 bytes an instruction
        target = int(m.group(1), 16) // 16 if m.group(1) else None
        if target is not None and target < i and i - target > len(best):
            best = lines[target:i + 1]
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--block-m", type=int, default=1)
    ap.add_argument("--block-n", type=int, default=1024)
    ap.add_argument("--block-k", type=int, default=64)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--dump", action="store_true", help="print the loop body")
    args = ap.parse_args(argv)
    for bits in [int(b) for b in args.bits.split(",")]:
        for half2 in (False, True):
            k = compile_gemv(bits, half2, args.block_m, args.block_n, args.block_k, args.warps)
            body = loop_body(sass(k.asm["cubin"]))
            weights = args.block_k * args.block_n // (32 * args.warps)  # a thread's weights per iteration
            kinds = collections.Counter(ins.split()[0].split(".")[0] if not ins.startswith("@") else
                                        ins.split()[1].split(".")[0] for ins in body)
            top = ", ".join(f"{n} {c}" for n, c in kinds.most_common(8))
            print(f"{bits} bits HALF2={half2!s:5}  {resources(k.asm['cubin'])}  loop {len(body):4d} "
                  f"instructions / {weights} weights = {len(body) / weights:.2f} a weight  ({top})", flush=True)
            if args.dump:
                print("\n".join(body))


if __name__ == "__main__":
    sys.exit(main())
