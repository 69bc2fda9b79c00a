"""Batch 2-16 on the tensor cores without a K-ordered code tile (issue 22, item 2).

`y[M, N] = x[M, K] @ W.T` for M <= 16, computed transposed (`y.T = W @ x.T`): the weight is the dot's first
operand, `[BLOCK_N, K']`, which the tensor cores take from registers, and `x.T` the second, `[K', 16]`.

The tiled kernel of `kernels/matmul.py` expands a tile's packed words into codes in K order (a reshape that
Triton carries out through shared memory, with bank conflicts: 2.4-5.0x batch 1 at batch 16).  Here the K
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
def _shard_step(acc, words, x_ptr, rm, mask_m, stride_xm, k0, K, i: tl.constexpr, W: tl.constexpr,
                R: tl.constexpr, JOIN: tl.constexpr, MULT: tl.constexpr, BLOCK_N: tl.constexpr,
                DT: tl.constexpr, DOT_FP32: tl.constexpr):
    """`acc += Σ x·MULT·(OFF + c)` over the codes at positions `i` and `i + 16/W` (and, `JOIN = 2`, `i + 8/W`
    and `i + 24/W`) of the tile's word rows `words [BLOCK_N, R]`: one dot with K' = 2·JOIN·R."""
    P: tl.constexpr = 32 // W
    H: tl.constexpr = P // 2
    lo, hi = _code_pairs(words, i, W, DT)
    a = tl.join(lo, hi)  # [BLOCK_N, R, 2]: K' column 2r + h is K row r·P + i + h·H
    if JOIN == 2:
        lo2, hi2 = _code_pairs(words, i + H // 2, W, DT)
        a = tl.join(a, tl.join(lo2, hi2))  # [BLOCK_N, R, 2, 2]: column 4r + 2h + e is row r·P + i + e·H/2 + h·H
    KD: tl.constexpr = 2 * JOIN * R
    a = tl.reshape(a, (BLOCK_N, KD))
    kk = tl.arange(0, KD)
    if JOIN == 2:
        krow = (kk // 4) * P + i + ((kk // 2) % 2) * H + (kk % 2) * (H // 2)
    else:
        krow = (kk // 2) * P + i + (kk % 2) * H
    krow = k0 + krow
    xt = tl.load(x_ptr + rm[None, :] * stride_xm + krow[:, None], mask=(krow < K)[:, None] & mask_m[None, :],
                 other=0.0)  # [KD, BLOCK_M]
    if MULT != 1:
        xt = (xt.to(tl.float32) * MULT).to(xt.dtype)  # exact: a power of two
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), xt.to(tl.float32), acc)
    else:
        acc = tl.dot(a, xt, acc)
    return acc


@triton.jit
def _shard_tile(acc, q_ptr, stride_q, x_ptr, rm, mask_m, stride_xm, rn, mask_n, k0, K,
                W: tl.constexpr, MULT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DT: tl.constexpr, DOT_FP32: tl.constexpr):
    """`acc += Σ x·MULT·(OFF + c)` over one shard's codes of K rows `k0 .. k0 + BLOCK_K`: `[BLOCK_N, BLOCK_M]`."""
    P: tl.constexpr = 32 // W
    H: tl.constexpr = P // 2
    R: tl.constexpr = BLOCK_K // P
    JOIN: tl.constexpr = 1 if 2 * R >= 16 else 2
    wrow = k0 // P + tl.arange(0, R)
    words = tl.load(q_ptr + wrow[None, :] * stride_q + rn[:, None], mask=mask_n[:, None] & (wrow * P < K)[None, :],
                    other=0)  # [BLOCK_N, R]
    for i in tl.static_range(H // JOIN):
        acc = _shard_step(acc, words, x_ptr, rm, mask_m, stride_xm, k0, K, i, W, R, JOIN, MULT, BLOCK_N, DT,
                          DOT_FP32)
    return acc


@triton.jit
def _skinny_kernel(
    x_ptr, q0_ptr, q1_ptr, s_ptr, z0_ptr, z1_ptr, y_ptr, ws_ptr, count_ptr,
    M, N, K, SPLIT_K,
    stride_xm, stride_q0, stride_q1, stride_s, stride_z0, stride_z1, stride_ym,
    GROUP: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, SYMMETRIC: tl.constexpr, DOT_FP32: tl.constexpr,
    OFF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
):
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    mask_n = rn < N
    mask_m = rm < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    n_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    for t in range(pid_k * per_split, tl.minimum((pid_k + 1) * per_split, n_tiles)):
        k0 = t * BLOCK_K
        d = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        d = _shard_tile(d, q0_ptr, stride_q0, x_ptr, rm, mask_m, stride_xm, rn, mask_n, k0, K, W0, 1 << W1,
                        BLOCK_N, BLOCK_K, DT, DOT_FP32)
        if W1 > 0:
            d = _shard_tile(d, q1_ptr, stride_q1, x_ptr, rm, mask_m, stride_xm, rn, mask_n, k0, K, W1, 1,
                            BLOCK_N, BLOCK_K, DT, DOT_FP32)
        rk = k0 + tl.arange(0, BLOCK_K)
        xs = tl.sum(tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask_m[:, None] & (rk < K)[None, :],
                            other=0.0).to(tl.float32), axis=1)  # [BLOCK_M]
        g = k0 // GROUP
        scale = tl.load(s_ptr + g * stride_s + rn, mask=mask_n, other=0.0).to(tl.float32)
        z = _zeros(z0_ptr, z1_ptr, g, rn, stride_z0, stride_z1, mask_n, W0, W1, SYMMETRIC).to(tl.float32)
        acc += scale[:, None] * (d - (OFF + z)[:, None] * xs[None, :])
    _store(y_ptr, ws_ptr, count_ptr, pid_n, acc, rm[None, :], rn[:, None], mask_m[None, :] & mask_n[:, None],
           stride_ym, N, SPLIT_K, ATOMIC)


SKINNY_MAX_M = 16  # the dot's second operand is x.T padded to 16 columns


def skinny_group(group: int, k: int) -> int | None:
    """The group the kernel is compiled for, or None where it cannot run: a K tile (128 or 256 rows) must lie
    inside one group, so groups of 128 rows or more (a per-channel group is one group)."""
    if group >= k:
        return 1 << 30
    return group if group % 128 == 0 else None


def skinny_configs(M: int, N: int, K: int, bits: int, group: int, sms: int) -> list[dict]:
    """The tuner's candidates: output tiles of 64-256 rows of W, K tiles of 128 or 256, split-K to fill the SMs."""
    out = []
    for block_n, warps in ((128, 4), (64, 4), (256, 8)):
        for block_k in (128, 256):
            if group < K and group % block_k:
                continue
            for per_sm in (2, 4):
                split = _split(-(-K // block_k), -(-N // block_n), sms, per_sm)
                out.append(dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=warps,
                                num_stages=1))
    return out


def launch(x2, q0, q1, scales, z0, z1, y, ws, count, M, N, K, widths, group, symmetric, cfg: dict) -> None:
    """One `_skinny_kernel` launch writing `y [M, N]` (`ws`, `count`: `matmul.workspace`'s, or y for no split)."""
    cfg = dict(cfg)
    split = cfg.pop("SPLIT_K")
    if INTERPRET:
        cfg.pop("num_stages", None)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), split)
    _skinny_kernel[grid](x2, q0, q1, scales, z0, z1, y, ws, count, M, N, K, split,
                         x2.stride(0), q0.stride(0), q1.stride(0), scales.stride(0), z0.stride(0), z1.stride(0),
                         y.stride(0), GROUP=skinny_group(group, K), W0=widths[0],
                         W1=widths[1] if len(widths) > 1 else 0, SYMMETRIC=symmetric,
                         DOT_FP32=x2.dtype == torch.float32 or INTERPRET,
                         OFF=offset(widths, x2.dtype == torch.float16), ATOMIC=split > 1, **cfg)
