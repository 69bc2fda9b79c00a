"""Batch 2 and up on the tensor cores without a K-ordered code tile.

`y[M, N] = x[M, K] @ W.T` computed transposed (`y.T = W @ x.T`): the weight is the dot's first operand,
`[BLOCK_N, K']`, which the tensor cores take from registers (Triton lowers this dot to wgmma with a register A
operand, where the tiled kernel's mixed-input dot becomes mma.sync), and `x.T` the second, `[K', BLOCK_M]`
(16 columns up to batch 16, 64-256 above: `large_configs`).

The tiled kernel of `kernels/matmul.py` expands a tile's packed words into codes in K order (a reshape that
Triton carries out through shared memory, with bank conflicts: docs/kernels.md measures it).  Here the K
order of the dot is the order in which codes lie in the words, and the activations are gathered to match:
a dot sums over K, in any order, as long as both operands agree.  For code position `i` of every word of
the tile, one LOP3 (after a shift) makes the fp16 (bf16) magic numbers `1024 + c` (`128 + c`) of codes `i`
and `i + 16/W` in the two halves of one int32 register -- HALF2's code pair (`matmul._h2_word`) -- and the
two halves become K' columns `2r` and `2r + 1` (`r` the word row): `tl.join` then a reshape that keeps each
pair in its thread, as the dot's operand layout holds them.  The 1-bit shard of 3 bits has too few word
rows in a group for a dot of 16 columns, so it joins two code positions (`JOIN = 2`: four columns a word).

A K tile lies inside one quantization group, so the dot sums `x·(OFF + c)` and scale and zero come after
it, once per output and row: `s·(Σ x·(OFF + c) - (OFF + z)·Σ x)` (3 bits: the 2-bit shard's dot takes
`2·x`, so `OFF` counts three times).  Split-K as the other kernels (`matmul._store`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from bitplan.kernels.matmul import EMULATE, INTERPRET, _split, _store, _zeros


@triton.jit
def _halves(u, DT: tl.constexpr):
    """The low and high 16 bits of int32 `u` as two tensors of 16-bit float type DT."""
    if EMULATE:
        lo = (u & 0xFFFF).to(tl.int16).to(DT, bitcast=True)
        hi = (u >> 16).to(tl.int16).to(DT, bitcast=True)
        return lo, hi
    else:
        if DT == tl.float16:
            return tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [u],
                                             dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [u],
                                             dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)


@triton.jit
def _code_pairs(words, i: tl.constexpr, W: tl.constexpr, DT: tl.constexpr):
    """Codes `i` and `i + 16/W` of every word as DT values `(OFF + c_lo, OFF + c_hi)`, `OFF` from `offset`."""
    m: tl.constexpr = ((1 << W) - 1) * 0x10001
    f = words >> (i * W)
    if DT == tl.float16:
        return _halves((f & m) | 0x64006400, DT)  # 1024 + c in both halves
    elif W <= 7:
        return _halves((f & m) | 0x43004300, DT)  # bf16: 128 + c
    else:  # 8-bit codes in bf16: no magic number is exact above 127, convert (through fp32: the interpreter
        # converts int32 to bf16 wrongly)
        return (f & 0xFF).to(tl.float32).to(DT), ((f >> 16) & 0xFF).to(tl.float32).to(DT)


def offset(widths: tuple[int, ...], fp16: bool) -> float:
    """`OFF`: what `_code_pairs`' magic numbers add to a code, summed over the shards as their dots weigh them."""
    one = 1024.0 if fp16 else 128.0 if widths[0] <= 7 else 0.0
    return one * ((1 << widths[1]) + 1) if len(widths) > 1 else one


@triton.jit
def _pair(words, i: tl.constexpr, W: tl.constexpr, DT: tl.constexpr):
    lo, hi = _code_pairs(words, i, W, DT)
    return tl.join(lo, hi)  # [BLOCK_N, R, 2]


@triton.jit
def _all_pairs(words, W: tl.constexpr, DT: tl.constexpr):
    """Every code of `words [BLOCK_N, R]` as DT magic numbers, `[BLOCK_N, R, 2, 2, ...]`: the first 2 is `h`, the
    half of the word (code `i + h·16/W`), the others the bits of the pair position `i`, least significant first."""
    H: tl.constexpr = 16 // W
    if H == 2:
        return tl.join(_pair(words, 0, W, DT), _pair(words, 1, W, DT))
    elif H == 4:
        return tl.join(tl.join(_pair(words, 0, W, DT), _pair(words, 1, W, DT)),
                       tl.join(_pair(words, 2, W, DT), _pair(words, 3, W, DT)))
    elif H == 8:
        return tl.join(tl.join(tl.join(_pair(words, 0, W, DT), _pair(words, 1, W, DT)),
                               tl.join(_pair(words, 2, W, DT), _pair(words, 3, W, DT))),
                       tl.join(tl.join(_pair(words, 4, W, DT), _pair(words, 5, W, DT)),
                               tl.join(_pair(words, 6, W, DT), _pair(words, 7, W, DT))))
    else:  # 1-bit words: 16 pair positions, the outermost join the highest bit of i
        return tl.join(_all_pairs_8(words, 0, W, DT), _all_pairs_8(words, 8, W, DT))


@triton.jit
def _all_pairs_8(words, b: tl.constexpr, W: tl.constexpr, DT: tl.constexpr):
    """`_all_pairs` of the 8 pair positions `b .. b + 8`."""
    return tl.join(tl.join(tl.join(_pair(words, b, W, DT), _pair(words, b + 1, W, DT)),
                           tl.join(_pair(words, b + 2, W, DT), _pair(words, b + 3, W, DT))),
                   tl.join(tl.join(_pair(words, b + 4, W, DT), _pair(words, b + 5, W, DT)),
                           tl.join(_pair(words, b + 6, W, DT), _pair(words, b + 7, W, DT))))


@triton.jit
def _bitrev(v, BITS: tl.constexpr):
    """`v`'s lowest BITS bits in reverse order."""
    out = tl.zeros_like(v)
    for b in tl.static_range(BITS):
        out |= ((v >> b) & 1) << (BITS - 1 - b)
    return out


@triton.jit
def _kprime(xn, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, H: tl.constexpr):
    """Rows of `xn [BLOCK_K, BLOCK_M]` (K rows in natural order, `k = r_hi·8H + r_lo·2H + h·H + bitrev(v)`) put in
    `_shard_tile`'s K' order `((r_hi·H + v)·4 + r_lo)·2 + h`: reversing v's bits is reversing their axes."""
    R4: tl.constexpr = BLOCK_K // (8 * H)
    if H == 2:
        xp = tl.permute(tl.reshape(xn, (R4, 4, 2, 2, BLOCK_M)), (0, 3, 1, 2, 4))
    elif H == 4:
        xp = tl.permute(tl.reshape(xn, (R4, 4, 2, 2, 2, BLOCK_M)), (0, 4, 3, 1, 2, 5))
    elif H == 8:
        xp = tl.permute(tl.reshape(xn, (R4, 4, 2, 2, 2, 2, BLOCK_M)), (0, 5, 4, 3, 1, 2, 6))
    else:
        xp = tl.permute(tl.reshape(xn, (R4, 4, 2, 2, 2, 2, 2, BLOCK_M)), (0, 6, 5, 4, 3, 1, 2, 7))
    return tl.reshape(xp, (BLOCK_K, BLOCK_M))


@triton.jit
def _shard_tile(acc, q_ptr, stride_q, x_ptr, rm, mask_m, stride_xm, rn, mask_n, k0, K, scale, sub,
                W: tl.constexpr, MULT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DT: tl.constexpr, DOT_FP32: tl.constexpr, SCALE_W: tl.constexpr, XPERM: tl.constexpr):
    """`acc += Σ x·MULT·(OFF + c)` over one shard's codes of K rows `k0 .. k0 + BLOCK_K` (`[BLOCK_N, BLOCK_M]`) in one
    dot, whose K' order is the codes' order in registers: K' = `((r_hi·H + v)·4 + r_lo)·2 + h` for word row
    `r = 4·r_hi + r_lo`, half `h` and pair position `i = bitrev(v)` (`_all_pairs` nests its joins that way round).
    Bit 0 of K' (h) is the pair in one register, bits 1-2 (r_lo) the four lanes of a dot operand's row, the rest
    a thread's own registers, as the tensor cores' register operand holds them; the activations are gathered
    in that order (XPERM: loaded in K order, contiguous, and permuted in the program).  With SCALE_W the weight
    is dequantized before the dot, `scale·(OFF + c) - sub` in fp32 (exact before the one rounding to DT), so that
    `acc` accumulates in place across tiles."""
    P: tl.constexpr = 32 // W
    H: tl.constexpr = P // 2
    R: tl.constexpr = BLOCK_K // P
    LOG_H: tl.constexpr = 1 if H == 2 else 2 if H == 4 else 3 if H == 8 else 4
    kk = tl.arange(0, BLOCK_K)
    if XPERM:
        kn = k0 + kk
        xt = _kprime(tl.load(x_ptr + rm[None, :] * stride_xm + kn[:, None], mask=(kn < K)[:, None] & mask_m[None, :],
                             other=0.0), BLOCK_K, rm.shape[0], H)
    else:
        r = (kk // (8 * H)) * 4 + (kk // 2) % 4
        krow = k0 + r * P + _bitrev((kk // 8) % H, LOG_H) + (kk % 2) * H
        # the activations first: their loads and the words' issue together (a barrier follows the words' loads)
        xt = tl.load(x_ptr + rm[None, :] * stride_xm + krow[:, None], mask=(krow < K)[:, None] & mask_m[None, :],
                     other=0.0)  # [BLOCK_K, BLOCK_M]
    wrow = k0 // P + tl.arange(0, R)
    words = tl.load(q_ptr + wrow[None, :] * stride_q + rn[:, None], mask=mask_n[:, None] & (wrow * P < K)[None, :],
                    other=0)  # [BLOCK_N, R]
    a = tl.reshape(_all_pairs(words, W, DT), (BLOCK_N, R // 4, 4, 2, H))  # [n, r_hi, r_lo, h, v]
    a = tl.reshape(tl.permute(a, (0, 1, 4, 2, 3)), (BLOCK_N, BLOCK_K))  # [n, r_hi, v, r_lo, h]
    if MULT != 1:
        xt = (xt.to(tl.float32) * MULT).to(xt.dtype)  # exact: a power of two
    if SCALE_W:
        a = (a.to(tl.float32) * scale[:, None] - sub[:, None]).to(DT)
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), xt.to(tl.float32), acc)
    else:
        acc = tl.dot(a, xt, acc)
    return acc, xt


@triton.jit
def _skinny_kernel(
    x_ptr, q0_ptr, q1_ptr, s_ptr, z0_ptr, z1_ptr, y_ptr, ws_ptr, count_ptr,
    M, N, K, SPLIT_K,
    stride_xm, stride_q0, stride_q1, stride_s, stride_z0, stride_z1, stride_ym,
    GROUP: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, SYMMETRIC: tl.constexpr, DOT_FP32: tl.constexpr,
    OFF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
    SCALE_W: tl.constexpr = False, XPERM: tl.constexpr = False, ONE_M: tl.constexpr = True,
):
    # ONE_M: one tile of x's rows (the grid's third axis is 1): without it the tile index's pid_m cost 18 registers
    # at 2 bits (80 -> 98, bench/sass_skinny.py), a program fewer an SM
    # SCALE_W (large batches): scale and zero go on the weight tile, per weight but shared by BLOCK_M rows, so the
    # dot accumulates in place and no per-tile epilogue (Σx, zero, scale over [BLOCK_N, BLOCK_M]) cuts the K loop
    DT: tl.constexpr = x_ptr.dtype.element_ty
    OFF1: tl.constexpr = OFF if W1 == 0 else OFF / ((1 << W1) + 1)  # what one shard's magic number adds
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = rn < N
    mask_m = rm < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    n_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    for t in range(pid_k * per_split, tl.minimum((pid_k + 1) * per_split, n_tiles)):
        k0 = t * BLOCK_K
        g = k0 // GROUP
        if SCALE_W:  # scale and zero before the dots; otherwise after them (fewer registers held across the dots)
            scale = tl.load(s_ptr + g * stride_s + rn, mask=mask_n, other=0.0).to(tl.float32)
            z = _zeros(z0_ptr, z1_ptr, g, rn, stride_z0, stride_z1, mask_n, W0, W1, SYMMETRIC).to(tl.float32)
            d = acc
        else:
            scale = tl.zeros((BLOCK_N,), dtype=tl.float32)  # unused by the dots
            z = scale
            d = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        # the zero comes off the first shard's weights (SCALE_W); the second's magic number only
        d, xt = _shard_tile(d, q1_ptr if W1 > 0 else q0_ptr, stride_q1 if W1 > 0 else stride_q0, x_ptr, rm, mask_m,
                            stride_xm, rn, mask_n, k0, K, scale, (OFF1 + z) * scale, W1 if W1 > 0 else W0, 1,
                            BLOCK_N, BLOCK_K, DT, DOT_FP32, SCALE_W, XPERM)
        if W1 > 0:
            d, _ = _shard_tile(d, q0_ptr, stride_q0, x_ptr, rm, mask_m, stride_xm, rn, mask_n, k0, K, scale,
                               OFF1 * scale, W0, 1 << W1, BLOCK_N, BLOCK_K, DT, DOT_FP32, SCALE_W, XPERM)
        if SCALE_W:
            acc = d
        else:
            xs = tl.sum(xt.to(tl.float32), axis=0)  # [BLOCK_M]: every K row of the tile once, unscaled
            scale = tl.load(s_ptr + g * stride_s + rn, mask=mask_n, other=0.0).to(tl.float32)
            z = _zeros(z0_ptr, z1_ptr, g, rn, stride_z0, stride_z1, mask_n, W0, W1, SYMMETRIC).to(tl.float32)
            acc += scale[:, None] * (d - (OFF + z)[:, None] * xs[None, :])
    tile = pid_n if ONE_M else pid_n + pid_m * tl.num_programs(0)
    _store(y_ptr, ws_ptr, count_ptr, tile, acc, rm[None, :], rn[:, None], mask_m[None, :] & mask_n[:, None],
           stride_ym, N, SPLIT_K, ATOMIC)


def skinny_group(group: int, k: int) -> int | None:
    """The group the kernel is compiled for, or None where it cannot run: a K tile (128 or 256 rows) must lie
    inside one group, so groups of 128 rows or more (a per-channel group is one group)."""
    if group >= k:
        return 1 << 30
    return group if group % 128 == 0 else None


# x's tile gathered in the dot's K' order (2-byte loads) or loaded in K order and permuted in the program (fewer
# instructions and half the barriers in the loop at batch 16: bench/sass_skinny.py [--xperm]).  The tuner offers both
# up to 16 rows, since neither is faster at every shape (docs/kernels.md); BITPLAN_SKINNY_XPERM=0 offers the gathered
# tile alone
XPERMS = (False,) if os.environ.get("BITPLAN_SKINNY_XPERM") == "0" else (False, True)
SKINNY_MAX_M = 16  # up to here the small-batch tiles (x.T padded to 16 columns); above, the SCALE_W tiles


def skinny_configs(M: int, N: int, K: int, bits: int, group: int, sms: int) -> list[dict]:
    """The tuner's candidates.  Up to 16 rows: output tiles of 64 or 128 rows of W, K tiles of 128 (or 256 where the
    group allows), split-K to fill the SMs.  On an H100 (8192², batch 4 and 16, 2 and 4 bits) every candidate of a
    wider space -- tiles of 256 rows, 1-4 pipeline stages, 2-16 programs an SM -- timed within 27-35 µs except the
    256-row tiles (66-92 µs), 128 rows on 8 warps mostly fastest (bench/results/skinny_configs_v7.json).
    Above 16 rows: `large_configs`."""
    if M > SKINNY_MAX_M:
        return large_configs(M, N, K, bits, group, sms)
    out = []
    wide = os.environ.get("BITPLAN_SKINNY_WIDE") == "1"  # that space, for bench/kernels.py --all-configs
    tiles = ((128, 8), (128, 4), (64, 4)) + (((256, 8),) if wide else ())
    for block_n, warps in tiles:
        for block_k in (128, 256):
            if group < K and group % block_k:
                continue
            # num_stages 2: Triton's pipeliner prefetches the next tile's words and activations (cp.async), for
            # about one more instruction a weight (bench/sass_skinny.py)
            for stages in (1, 2, 3, 4) if wide else (1, 2):
                for per_sm in (2, 4, 8, 16) if wide else (2, 4, 8):
                    split = _split(-(-K // block_k), -(-N // block_n), sms, per_sm)
                    for xperm in XPERMS:
                        out.append(dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=warps,
                                        num_stages=stages, XPERM=xperm))
    return out


# (BLOCK_N outputs, BLOCK_M rows of x, warps, stages) above 16 rows: the wgmma's M is BLOCK_N (64 a warpgroup),
# its N is BLOCK_M (up to 256)
LARGE_TILES = ((128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (64, 128, 4, 3),
               (256, 64, 8, 2), (128, 256, 8, 2), (256, 128, 8, 2))


def large_configs(M: int, N: int, K: int, bits: int, group: int, sms: int) -> list[dict]:
    """Candidates above 16 rows: SCALE_W tiles of LARGE_TILES no taller than M needs, split-K only where the output
    tiles alone leave SMs idle.  The dispatcher does not offer them (`matmul.skinny_fits`): on an H200 at 64 and 256
    rows, 4 bits, they took 1.22-1.98x the tiled kernel's time (bench/results/kernels_large_batch_v8.json,
    docs/kernels.md).  x is loaded in K order and permuted (XPERM): gathered in K' order the 128 x 128 x 128 tile's
    loop took 19 instructions a weight against 8.5 (bench/sass_skinny.py --block-m 128 --warps 8 --stages 3
    --scale-w [--xperm])."""
    out = []
    for block_n, block_m, warps, stages in LARGE_TILES:
        if block_m > max(64, 1 << (M - 1).bit_length()):
            continue
        for block_k in (128,) if group >= K or group % 256 else (128, 256):
            split = _split(-(-K // block_k), -(-N // block_n) * -(-M // block_m), sms, 1)
            out.append(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=warps,
                            num_stages=stages, SCALE_W=True, XPERM=True))
    return out


def launch(x2, q0, q1, scales, z0, z1, y, ws, count, M, N, K, widths, group, symmetric, cfg: dict) -> None:
    """One `_skinny_kernel` launch writing `y [M, N]` (`ws`, `count`: `matmul.workspace`'s, or y for no split)."""
    cfg = dict(cfg)
    split = cfg.pop("SPLIT_K")
    if INTERPRET:
        cfg.pop("num_stages", None)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), split, triton.cdiv(M, cfg["BLOCK_M"]))
    _skinny_kernel[grid](x2, q0, q1, scales, z0, z1, y, ws, count, M, N, K, split,
                         x2.stride(0), q0.stride(0), q1.stride(0), scales.stride(0), z0.stride(0), z1.stride(0),
                         y.stride(0), GROUP=skinny_group(group, K), W0=widths[0],
                         W1=widths[1] if len(widths) > 1 else 0, SYMMETRIC=symmetric,
                         DOT_FP32=x2.dtype == torch.float32 or INTERPRET,
                         OFF=offset(widths, x2.dtype == torch.float16), ATOMIC=split > 1, ONE_M=grid[2] == 1, **cfg)
