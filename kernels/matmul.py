"""Fused dequantize + matmul in Triton for the packed format of `kernels/reference.py`.

`y[M, N] = x[M, K] @ W.T` where W is stored as 1 or 2 power-of-two shards of codes packed along K,
fp16 scales `[G, N]` and packed integer zeros.  The shard widths are compile-time constants (`W0`,
`W1`; `W1 = 0` for one shard), so every width gets its own specialised binary from one body.

Two kernels, picked by `matmul` from the number of rows M (measured on an H100: bench/kernels.py):

- **gemv** (M <= 4, decode: memory-bound).  The cost to beat is instructions per weight and loads in
  flight, not FLOPs, so there is no `tl.dot`.  A K tile of `BLOCK_K` rows lies inside one
  quantization group; a thread holds all its word rows for a few adjacent outputs (their loads issue
  together, the sum over rows stays in registers), and scale and zero are applied once per tile and
  output.  Codes are turned into floats where they lie in the word, the zero taken off in the same
  instruction (`_shard_dot`): about three instructions per weight.  Three bits (shards of 2 and 1) go
  in one pass, the code built as a float from both shards (`_pair_dot`).  Split-K keeps every SM busy.
- **tiled** (M > 4).  The packed words of a `BLOCK_K x BLOCK_N` tile are loaded once and expanded
  to codes in K order, which feed `tl.dot` as exact integers in the activation dtype; when the tile
  lies inside one group, scale and zero are applied to the dot's result (same identity as above),
  else per weight.  Split-K for small M, plain output tiles for large M.  From 64 rows the tuner also
  tries scale and zero applied to the weight tile (`SCALE_W`: the dot then accumulates in place) and
  dequantize-then-cuBLAS (`DEQUANT`).  Nsight Compute at 256 rows: Triton lowers this mixed-input dot
  to mma.sync, not wgmma, at 255 registers a thread (one program per SM), tensor pipe 24-26 % busy
  (bench/results/ncu_kernels_v4.txt), so at 256 rows it reaches about half of cuBLAS bf16.

From 2 to 16 rows the tuner also times a third kernel, **skinny** (`kernels/skinny.py`: the tensor cores with the
weight as the register operand, which Triton lowers to wgmma, and the codes in the order they lie in the words,
no K-ordered code tile), and keeps whichever of it and the gemv or tiled kernel is faster per shape and batch
(`_regimes`; `BITPLAN_SKINNY=0` leaves it out).

Split-K partial sums meet in a workspace that the last program of each output tile drains (`_store`),
so every product is one launch.

On CUDA the first call of each (regime, shape, width, group) times a handful of configurations and
caches the fastest in-process (`_TUNED`) and on disk, per GPU model (`kernels/tuned.py`).  Under
`TRITON_INTERPRET=1` (CPU tests) the default configuration runs, and dots run in fp32 because Triton 3.9's interpreter computes bf16 dots wrongly.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from bitplan.db.types import InvalidInput
from bitplan.kernels.reference import shards
from bitplan.kernels.tuned import tuned

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GEMV_MAX_M = 4  # above, the tiled kernel: a gemv program per 16 rows measured 3x slower (bench/kernels.py)
DEQUANT_MIN_M = 64  # from here the tuner also times dequantize-then-cuBLAS (`tiled_configs`)


@triton.jit
def _unpack(ptr, rows, cols, stride, mask, W: tl.constexpr):
    """Codes of width W at logical `rows` (K or G index) and `cols` (N index), int32, shaped as `rows`
    and `cols` broadcast together (the caller shapes them for its layout; a scalar row is fine)."""
    per: tl.constexpr = 32 // W
    words = tl.load(ptr + (rows // per) * stride + cols, mask=mask, other=0)
    return (words >> ((rows % per) * W)) & ((1 << W) - 1)


@triton.jit
def _zero_shards(z0_ptr, z1_ptr, g, rn, stride_z0, stride_z1, mask, W0: tl.constexpr, W1: tl.constexpr,
                 SYMMETRIC: tl.constexpr):
    """A group's zero split as its codes are, `z = zh << W1 | zl` (`zl = 0` for one shard), int32."""
    if SYMMETRIC:
        zh = tl.full(mask.shape, 1 << (W0 - 1), tl.int32)
        zl = tl.zeros(mask.shape, tl.int32)
    else:
        zh = _unpack(z0_ptr, g, rn, stride_z0, mask, W0)
        zl = _unpack(z1_ptr, g, rn, stride_z1, mask, W1) if W1 > 0 else tl.zeros(mask.shape, tl.int32)
    return zh, zl


@triton.jit
def _zeros(z0_ptr, z1_ptr, g, rn, stride_z0, stride_z1, mask, W0: tl.constexpr, W1: tl.constexpr,
           SYMMETRIC: tl.constexpr):
    zh, zl = _zero_shards(z0_ptr, z1_ptr, g, rn, stride_z0, stride_z1, mask, W0, W1, SYMMETRIC)
    return (zh << W1) | zl


@triton.jit
def _code_dot(xq, xs, field, j: tl.constexpr, k: tl.constexpr, x_row, x_left, zero,
              W: tl.constexpr, IN_CONVERSION: tl.constexpr, EVEN_K: tl.constexpr):
    """`_shard_dot`'s step for the code at bits `j·W` of `field` (already `| 0x4B000000`), K row `k` of
    each word (`x_row + k`, valid where `k < x_left`): one LOP3 with one immediate, one FADD, one FFMA."""
    c = (field & ((((1 << W) - 1) << (j * W)) | 0x4B000000)).to(tl.float32, bitcast=True)
    q = c - (8388608.0 + zero * (1 << (j * W))) if IN_CONVERSION else c - 8388608.0
    if EVEN_K:
        x = tl.load(x_row + k).to(tl.float32)
    else:
        x = tl.load(x_row + k, mask=k < x_left, other=0.0).to(tl.float32)
    if not IN_CONVERSION:
        xs += x
    return xq + (x * (1.0 / (1 << (j * W)))) * q, xs


@triton.jit
def _field(words, shift: tl.constexpr, bits: tl.constexpr):
    """`bits` bits of `words` from bit `shift`, with float32's exponent of 2^23 or'ed in (see `_shard_dot`)."""
    return ((words >> shift) & ((1 << bits) - 1)) | 0x4B000000


@triton.jit
def _shard_dot(q_ptr, stride_q, x_ptr, rm, stride_xm, k0, rn, mask_n, zero, K,
               W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               EVEN_K: tl.constexpr):
    """`Σ_k x[m, k]·(c[k, n] - zero[n])` over K rows `k0 .. k0 + BLOCK_K` of one shard of width W:
    `[BLOCK_M, 1, BLOCK_N]`; `zero` is the shard's part of the group's zero, as float32.

    The codes are read where they lie in the word: the first `L = 23 // W` codes sit below float32's
    exponent bits, so with `0x4B000000` or'ed into the word once, `word & (mask_j | 0x4B000000)` is the
    float `2^23 + c·2^(jW)` (one LOP3), and one FADD of `2^23` leaves `c·2^(jW)`; the `2^(-jW)` goes
    into x, once per x value rather than per weight.  The remaining codes are shifted down once per
    word.  About three instructions per weight (LOP3, FADD, FFMA).  x is read at constant offsets from
    one pointer per word row, unmasked where K is a multiple of the tile (`EVEN_K`).

    The zero: at 4 and 8 bits, inside that FADD (`-(2^23 + zero·2^(jW))`, an exact integer): free per
    weight, for one register per code position and output (32 at 4 bits).  At 2 and 1 bits there are 16
    and 32 positions, too many registers (measured: 3-bit 37.7 -> 44.9 µs at 8192²), so the thread sums
    the x values it loaded anyway and takes `zero·Σx` off once (one FADD per x value).
    """
    P: tl.constexpr = 32 // W
    R: tl.constexpr = BLOCK_K // P  # word rows of this shard in the tile
    L: tl.constexpr = 23 // W
    IN_CONVERSION: tl.constexpr = W >= 4
    rows = tl.arange(0, R)[None, :, None]
    wrow = k0 // P + rows
    if EVEN_K:
        words = tl.load(q_ptr + wrow * stride_q + rn, mask=mask_n, other=0)
    else:
        words = tl.load(q_ptr + wrow * stride_q + rn, mask=(wrow * P < K) & mask_n, other=0)
    x_row = x_ptr + rm * stride_xm + k0 + rows * P
    x_left = K - k0 - rows * P
    xq = tl.zeros((BLOCK_M, R, BLOCK_N), dtype=tl.float32)
    xs = tl.zeros((BLOCK_M, R, 1), dtype=tl.float32)
    low = _field(words, 0, L * W)
    for j in tl.static_range(L):
        xq, xs = _code_dot(xq, xs, low, j, j, x_row, x_left, zero, W, IN_CONVERSION, EVEN_K)
    high = _field(words, L * W, 32 - L * W)
    for j in tl.static_range(P - L):
        xq, xs = _code_dot(xq, xs, high, j, L + j, x_row, x_left, zero, W, IN_CONVERSION, EVEN_K)
    d = tl.sum(xq, axis=1, keep_dims=True)
    if not IN_CONVERSION:
        d -= tl.sum(xs, axis=1, keep_dims=True) * zero
    return d


@triton.jit
def _pair_code(f2, p2: tl.constexpr, f1, p1: tl.constexpr):
    """The 3-bit code `2·c2 + c1` as an exact float, from the 2-bit code at bits `2·p2` of field `f2` and the
    1-bit code at bit `p1` of `f1` (fields from `_field`): two LOP3 and two FFMA.  `a = 2^23 + c2·2^(2p2)`
    and `b = 2^23 + c1·2^p1`; `b·2^-p1 - (2^(23-p1) + 2^(24-2p2)) = c1 - 2^(24-2p2)` and
    `a·2^(1-2p2)` + that `= 2·c2 + c1`, every step exact (no intermediate needs more than 24 bits)."""
    a = (f2 & ((3 << (2 * p2)) | 0x4B000000)).to(tl.float32, bitcast=True)
    b = (f1 & ((1 << p1) | 0x4B000000)).to(tl.float32, bitcast=True)
    low = b * (1.0 / (1 << p1)) - ((1 << (23 - p1)) + (1 << (24 - 2 * p2)))
    return a * (2.0 / (1 << (2 * p2))) + low


@triton.jit
def _pair_words(q0_ptr, stride_q0, q1_ptr, stride_q1, r1, rn, mask_n, K, EVEN_K: tl.constexpr):
    """3 bits' words for the 32 K rows of 1-bit word row `r1`: the 1-bit word and the two 2-bit words
    (word rows `2·r1`, `2·r1 + 1`); words past K are 0."""
    r2 = 2 * r1
    if EVEN_K:
        w1 = tl.load(q1_ptr + r1 * stride_q1 + rn, mask=mask_n, other=0)
        w2a = tl.load(q0_ptr + r2 * stride_q0 + rn, mask=mask_n, other=0)
        w2b = tl.load(q0_ptr + (r2 + 1) * stride_q0 + rn, mask=mask_n, other=0)
    else:
        w1 = tl.load(q1_ptr + r1 * stride_q1 + rn, mask=(r1 * 32 < K) & mask_n, other=0)
        w2a = tl.load(q0_ptr + r2 * stride_q0 + rn, mask=(r2 * 16 < K) & mask_n, other=0)
        w2b = tl.load(q0_ptr + (r2 + 1) * stride_q0 + rn, mask=((r2 + 1) * 16 < K) & mask_n, other=0)
    return w1, w2a, w2b


@triton.jit
def _pair_dot(q0_ptr, stride_q0, q1_ptr, stride_q1, x_ptr, rm, stride_xm, k0, rn, mask_n, zero, K,
              BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr):
    """`_shard_dot` for 3 bits in one pass over both shards: `Σ_k x[m, k]·(c[k, n] - zero[n])` with
    `c = 2·c2 + c1` built as a float per weight (`_pair_code`), so that each activation is loaded, and each
    product accumulated, once (two passes cost 8.0-9.5 instructions a weight: bench/results/ncu_kernels_v4.txt).
    A 1-bit word row covers 32 K rows, two 2-bit word rows the same 32; the zero comes off as `zero·Σx`."""
    R: tl.constexpr = BLOCK_K // 32
    rows = tl.arange(0, R)[None, :, None]
    w1, w2a, w2b = _pair_words(q0_ptr, stride_q0, q1_ptr, stride_q1, k0 // 32 + rows, rn, mask_n, K, EVEN_K)
    # fields below float32's exponent bits: 11 2-bit codes and 23 1-bit codes each, the rest shifted down once
    f1_lo, f1_hi = _field(w1, 0, 23), _field(w1, 23, 9)
    fa_lo, fa_hi, fb_lo, fb_hi = _field(w2a, 0, 22), _field(w2a, 22, 10), _field(w2b, 0, 22), _field(w2b, 22, 10)
    x_row = x_ptr + rm * stride_xm + k0 + rows * 32
    x_left = K - k0 - rows * 32
    xq = tl.zeros((BLOCK_M, R, BLOCK_N), dtype=tl.float32)
    xs = tl.zeros((BLOCK_M, R, 1), dtype=tl.float32)
    for j in tl.static_range(32):
        if j < 23:
            f1 = f1_lo
        else:
            f1 = f1_hi
        if j < 11:
            f2 = fa_lo
        elif j < 16:
            f2 = fa_hi
        elif j < 27:
            f2 = fb_lo
        else:
            f2 = fb_hi
        c = _pair_code(f2, (j % 16) % 11, f1, j % 23)
        if EVEN_K:
            x = tl.load(x_row + j).to(tl.float32)
        else:
            x = tl.load(x_row + j, mask=j < x_left, other=0.0).to(tl.float32)
        xs += x
        xq += x * c
    return tl.sum(xq, axis=1, keep_dims=True) - tl.sum(xs, axis=1, keep_dims=True) * zero


# ---- packed fp16 pairs (HALF2): two codes per instruction -------------------------------------------------
# At 2 and 3 bits the fp32 gemv above is instruction-issue bound (4.2-7.8 instructions a weight, where the
# H200's bandwidth leaves about 1.7 at 2 bits).  Here an int32 register holds two fp16 values (its low and
# high half) and one HFMA2 works on both: a word's code i of the low half and code i of the high half (K rows
# i and P/2 + i of the word) are turned into fp16 together, and multiplied with the pair (x[i], x[P/2 + i]).

EMULATE = tl.constexpr(INTERPRET)  # the interpreter runs no PTX: the same arithmetic on unpacked fp32 values


@triton.jit
def _h2_lo(a):
    return (a & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _h2_hi(a):
    return (a >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _h2_pack(lo, hi):
    """Two fp32 tensors rounded to fp16, as one int32 tensor (`lo` in the low half)."""
    if EMULATE:
        return ((hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16)
                | (lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF))
    else:
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $2;", "=r,r,r", [hi, lo], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _h2_const(v: tl.constexpr):
    """fp16 `v` in both halves (a compile-time constant; `v` must be exact in fp16)."""
    b = tl.full((1, 1, 1), v, tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return b | (b << 16)


@triton.jit
def _h2_code(words, shift: tl.constexpr, mask: tl.constexpr):
    """`(words >> shift) & mask | MAGIC`, fp16 `1024 + code` in both halves.  One LOP3 (plus the shift, shared by
    the codes below it): written out, ptxas keeps the and and the or apart (two immediates), 2 LOP3 a code."""
    MAGIC: tl.constexpr = 0x64006400  # fp16 1024.0 in both halves: or'ed over a code below bit 10, 1024 + code
    f = words >> shift
    if EMULATE:
        return (f & mask) | MAGIC
    else:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,n,n", [f, mask, MAGIC],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _hfma2(a, b, c):
    """`a·b + c` on both fp16 halves of int32 tensors: one HFMA2."""
    if EMULATE:
        return _h2_pack(_h2_lo(a) * _h2_lo(b) + _h2_lo(c), _h2_hi(a) * _h2_hi(b) + _h2_hi(c))
    else:
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _h2_x(x_row, k_lo: tl.constexpr, k_hi: tl.constexpr, x_left, EVEN_K: tl.constexpr):
    """The activation pair (x[k_lo], x[k_hi]) as fp16 halves, `[BLOCK_M, 1, 1]`; K rows past the end are 0."""
    if EVEN_K:
        lo = tl.load(x_row + k_lo).to(tl.float32)
        hi = tl.load(x_row + k_hi).to(tl.float32)
    else:
        lo = tl.load(x_row + k_lo, mask=k_lo < x_left, other=0.0).to(tl.float32)
        hi = tl.load(x_row + k_hi, mask=k_hi < x_left, other=0.0).to(tl.float32)
    return _h2_pack(lo, hi)


@triton.jit
def _h2_word(acc, xs, words, x_row, x_left, W: tl.constexpr, EVEN_K: tl.constexpr):
    """Add one word row of width-W codes (2 or 4 bits; K rows `x_row[0 .. 32/W]`) into the fp16 pair sums
    `acc += Σ x·(c - 2^(W-1))/16` and `xs += Σ x`.

    `(word >> s) & mask_j | MAGIC` (one LOP3, the shift shared by every code below it) gives 1024 + c·2^(jW)
    in both halves, and one HFMA2 with constant operands turns that into (c - center)/16, exact: the 1/16 and
    the centring keep the fp16 partial sums well inside fp16's range, and the exact zero comes off in fp32,
    once per tile.  Three instructions per two weights: LOP3, HFMA2, HFMA2.
    """
    H: tl.constexpr = 16 // W  # codes per half word: pairs per word
    L: tl.constexpr = 10 // W  # codes that fit below fp16's exponent bits: after L, shift the word once
    CENTER: tl.constexpr = 1 << (W - 1)
    for i in tl.static_range(H):
        j = i % L
        t = _h2_code(words, (i // L) * L * W, (((1 << W) - 1) << (j * W)) * 0x10001)
        d = _hfma2(t, _h2_const(1.0 / (16 << (j * W))), _h2_const(-((1024 >> (j * W)) + CENTER) / 16))
        x2 = _h2_x(x_row, i, H + i, x_left, EVEN_K)
        acc = _hfma2(x2, d, acc)
        xs = _hfma2(x2, _h2_const(1.0), xs)
    return acc, xs


@triton.jit
def _h2_pair_half(acc, xs, w1p, w2, x_row, x_left, HALF: tl.constexpr, EVEN_K: tl.constexpr):
    """`_h2_word` for 3 bits: 16 K rows (`x_row[0 .. 16]`), 2-bit codes from `w2`, 1-bit codes from bits
    `8·HALF ..` of each half of `w1p` (`_h2_dot` permutes the 1-bit word so that they pair as `w2`'s do).

    With `t2 = 1024 + c2·4^j` and `t1 = 1024 + c1·2^p` (one LOP3 each), two HFMA2 with constant operands give
    `u = (2·c2 - 1024·2^-p - 4)/16`, then `u + t1·2^-p/16 = (2·c2 + c1 - 4)/16`, every step exact in fp16 (no
    value needs more than 11 significant bits).  Five instructions per two weights."""
    for i in tl.static_range(8):
        j = i % 5
        t2 = _h2_code(w2, (i // 5) * 10, (3 << (2 * j)) * 0x10001)
        b = 8 * HALF + i  # the 1-bit code's position in its half
        p = b % 10
        t1 = _h2_code(w1p, (b // 10) * 10, (1 << p) * 0x10001)
        u = _hfma2(t2, _h2_const(2.0 / (16 << (2 * j))), _h2_const(-((2048 >> (2 * j)) + (1024 >> p) + 4) / 16))
        v = _hfma2(t1, _h2_const(1.0 / (16 << p)), u)
        x2 = _h2_x(x_row, i, 8 + i, x_left, EVEN_K)
        acc = _hfma2(x2, v, acc)
        xs = _hfma2(x2, _h2_const(1.0), xs)
    return acc, xs


@triton.jit
def _h2_dot(q0_ptr, stride_q0, q1_ptr, stride_q1, x_ptr, rm, stride_xm, k0, rn, mask_n, zero, K,
            W0: tl.constexpr, W1: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr):
    """`_shard_dot`'s result, `Σ_k x[m, k]·(c[k, n] - zero[n])` over K rows `k0 .. k0 + BLOCK_K`, for 2, 3 and
    4 bits with two codes per instruction (`_h2_word`, `_h2_pair_half`): `[BLOCK_M, 1, BLOCK_N]` fp32.

    The pair sums stay fp16 for one K tile (at most BLOCK_K / 2 products a half), then go to fp32 with the
    zero: `16·Σ x·(c - center)/16 + (center - zero)·Σ x`.  Word rows are loaded one at a time (one
    accumulator per output instead of one per word row); the loads have no dependences, so they issue
    together."""
    acc = tl.zeros((BLOCK_M, 1, BLOCK_N), dtype=tl.int32)  # fp16 pairs, both 0.0
    xs = tl.zeros((BLOCK_M, 1, 1), dtype=tl.int32)
    x_row = x_ptr + rm * stride_xm + k0
    x_left = K - k0
    if W1 == 0:
        P: tl.constexpr = 32 // W0
        for r in tl.static_range(BLOCK_K // P):
            wrow = k0 // P + r
            if EVEN_K:
                words = tl.load(q0_ptr + wrow * stride_q0 + rn, mask=mask_n, other=0)
            else:
                words = tl.load(q0_ptr + wrow * stride_q0 + rn, mask=(wrow * P < K) & mask_n, other=0)
            acc, xs = _h2_word(acc, xs, words, x_row + r * P, x_left - r * P, W0, EVEN_K)
    else:
        for r in tl.static_range(BLOCK_K // 32):
            w1, w2a, w2b = _pair_words(q0_ptr, stride_q0, q1_ptr, stride_q1, k0 // 32 + r, rn, mask_n, K, EVEN_K)
            # bytes [0, 2, 1, 3]: the low half then holds K rows 0-7 and 16-23, the high half 8-15 and 24-31, so
            # bit p of both halves pairs rows (p, 8 + p) as a 2-bit word's pairs do (16 + p, 24 + p for p >= 8)
            if EMULATE:
                w1p = (w1 & 0xFF) | ((w1 >> 8) & 0xFF00) | ((w1 << 8) & 0xFF0000) | (w1 & ~0xFFFFFF)
            else:  # one PRMT where the shifts and masks take five instructions
                w1p = tl.inline_asm_elementwise("prmt.b32 $0, $1, 0, 0x3120;", "=r,r", [w1], dtype=tl.int32,
                                                is_pure=True, pack=1)
            acc, xs = _h2_pair_half(acc, xs, w1p, w2a, x_row + r * 32, x_left - r * 32, 0, EVEN_K)
            acc, xs = _h2_pair_half(acc, xs, w1p, w2b, x_row + r * 32 + 16, x_left - r * 32 - 16, 1, EVEN_K)
    CENTER: tl.constexpr = 1 << (W0 + W1 - 1)
    return 16.0 * (_h2_lo(acc) + _h2_hi(acc)) + (CENTER - zero) * (_h2_lo(xs) + _h2_hi(xs))


@triton.jit
def _gemv_tile(x_ptr, q0_ptr, q1_ptr, s_ptr, z0_ptr, z1_ptr, rm, rn, mask_n, K, t_lo, t_hi,
               stride_xm, stride_q0, stride_q1, stride_s, stride_z0, stride_z1,
               GROUP: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, SYMMETRIC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
               HALF2: tl.constexpr = False):
    """`[BLOCK_M, BLOCK_N]` partial product of rows `rm`, outputs `rn` over K tiles `t_lo .. t_hi`.

    `rm`, `rn` are 3-D (`[BLOCK_M, 1, 1]`, `[1, 1, BLOCK_N]`; rows past the end repeat the last row, so
    that x needs no row mask, and the caller masks their outputs): everything lives in one 3-D
    `[BLOCK_M, rows, BLOCK_N]` layout built from 3-D pointers, in which a thread holds all word rows of
    its columns, so the sum over rows stays in registers.  A tile lies inside one quantization group
    (BLOCK_K divides GROUP), so scale and zero are loaded once per tile and output; the zero is taken
    off inside `_shard_dot`'s conversion and the scale applied to the tile's sum: `Σ x·(q - z)·s`.  (It
    used to be `s·(Σ x·q - z·Σ x)` with `Σ x` reduced across the program's warps, a barrier every tile;
    bench/results/ncu_gemv_8192_4bit_v3.txt.)  The one body of the dense and the MoE gemv kernels.

    `HALF2` (16-bit activations) runs 2, 3 and 4 bits two codes per instruction (`_h2_dot`); other widths
    ignore it.
    """
    PAIRED: tl.constexpr = HALF2 and (W0 == 2 or W0 == 4) and (W1 == 0 or (W0 == 2 and W1 == 1))
    acc = tl.zeros((BLOCK_M, 1, BLOCK_N), dtype=tl.float32)
    for t in range(t_lo, t_hi):
        k0 = t * BLOCK_K
        g = k0 // GROUP
        zh, zl = _zero_shards(z0_ptr, z1_ptr, g, rn, stride_z0, stride_z1, mask_n, W0, W1, SYMMETRIC)
        if PAIRED:
            d = _h2_dot(q0_ptr, stride_q0, q1_ptr, stride_q1, x_ptr, rm, stride_xm, k0, rn, mask_n,
                        ((zh << W1) | zl).to(tl.float32), K, W0, W1, BLOCK_K, BLOCK_M, BLOCK_N, EVEN_K)
        elif W0 == 2 and W1 == 1:
            d = _pair_dot(q0_ptr, stride_q0, q1_ptr, stride_q1, x_ptr, rm, stride_xm, k0, rn, mask_n,
                          ((zh << 1) | zl).to(tl.float32), K, BLOCK_K, BLOCK_M, BLOCK_N, EVEN_K)
        else:
            d = _shard_dot(q0_ptr, stride_q0, x_ptr, rm, stride_xm, k0, rn, mask_n, zh.to(tl.float32), K, W0,
                           BLOCK_K, BLOCK_M, BLOCK_N, EVEN_K)
            if W1 > 0:
                d = d * (1 << W1) + _shard_dot(q1_ptr, stride_q1, x_ptr, rm, stride_xm, k0, rn, mask_n,
                                               zl.to(tl.float32), K, W1, BLOCK_K, BLOCK_M, BLOCK_N, EVEN_K)
        acc += tl.load(s_ptr + g * stride_s + rn, mask=mask_n, other=0.0).to(tl.float32) * d
    return tl.sum(acc, axis=1)


@triton.jit
def _store(y_ptr, ws_ptr, count_ptr, tile, y, rm2, rn2, mask_out, stride_ym, stride_ws, split,
           ATOMIC: tl.constexpr):
    """Write a program's `y`; under split-K, the last program to finish a tile writes it for all.

    Partial sums meet in an fp32 workspace through atomics; each program then counts itself in on the
    tile's counter, and the one that arrives last reads the sum out of the workspace while zeroing it
    (an exchange) and stores it in y's dtype.  Workspace and counters are left at zero for the next call,
    so a split-K product is one launch: no memset before it, no conversion after it.
    """
    if not ATOMIC:
        tl.store(y_ptr + rm2 * stride_ym + rn2, y.to(y_ptr.dtype.element_ty), mask=mask_out)
    else:
        tl.atomic_add(ws_ptr + rm2 * stride_ws + rn2, y, mask=mask_out, sem="relaxed")
        tl.debug_barrier()  # every thread's partial sums are issued before the program counts itself in
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == split - 1:
            # exchanged as int32 bits (Triton's interpreter exchanges no floats): the same 32 bits either way
            bits = tl.atomic_xchg(ws_ptr.to(tl.pointer_type(tl.int32)) + rm2 * stride_ws + rn2,
                                  tl.zeros(y.shape, dtype=tl.int32), mask=mask_out, sem="acquire")
            # masked-out lanes hold whatever the exchange left there: zeroed, so that no cast sees garbage
            y = tl.where(mask_out, bits.to(tl.float32, bitcast=True), 0.0)
            tl.store(y_ptr + rm2 * stride_ym + rn2, y.to(y_ptr.dtype.element_ty), mask=mask_out)
            tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed")


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the lines at `ptrs` without waiting for them (nothing lands in registers)."""
    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n mov.b32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _pdl_prologue(q0_ptr, q1_ptr, s_ptr, stride_q0, stride_q1, stride_s, rn, N, K, t_lo, t_hi,
                  GROUP: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """Under programmatic dependent launch, the start of a gemv program that may run before the kernel ahead
    of it has finished: the weights never change, so the first word rows of its K slice and their scales
    are asked of L2 before the program waits for its inputs (`gdc_wait`), before which nothing is read from
    or written to memory the kernel ahead may touch."""
    ROWS: tl.constexpr = 8  # word rows a program prefetches per shard: at most 32 KB at 1,024 outputs
    cols = tl.minimum(rn + tl.arange(0, BLOCK_N // 32)[None, :] * 32, N - 1)  # one int32 a 128-byte line
    r = tl.arange(0, ROWS)[:, None]
    P0: tl.constexpr = 32 // W0
    hi0 = tl.cdiv(tl.minimum(t_hi * BLOCK_K, K), P0) - 1
    _prefetch_l2(q0_ptr + tl.minimum(t_lo * BLOCK_K // P0 + r, hi0) * stride_q0 + cols)
    if W1 > 0:
        hi1 = tl.cdiv(tl.minimum(t_hi * BLOCK_K, K), 32) - 1
        _prefetch_l2(q1_ptr + tl.minimum(t_lo * BLOCK_K // 32 + r, hi1) * stride_q1 + cols)
    _prefetch_l2(s_ptr + (t_lo * BLOCK_K // GROUP) * stride_s + cols)


@triton.jit
def _gemv_kernel(
    x_ptr, q0_ptr, q1_ptr, s_ptr, z0_ptr, z1_ptr, y_ptr, ws_ptr, count_ptr,
    M, N, K, SPLIT_K,
    stride_xm, stride_q0, stride_q1, stride_s, stride_z0, stride_z1, stride_ym,
    GROUP: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
    EVEN_K: tl.constexpr, HALF2: tl.constexpr = False, PDL: tl.constexpr = 0,
):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M))[:, None, None]
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, None, :]
    n_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_lo = pid_k * per_split
    if PDL == 2:
        _pdl_prologue(q0_ptr, q1_ptr, s_ptr, stride_q0, stride_q1, stride_s, pid_n * BLOCK_N, N, K, t_lo,
                      tl.minimum(t_lo + per_split, n_tiles), GROUP, W0, W1, BLOCK_N, BLOCK_K)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    y = _gemv_tile(x_ptr, q0_ptr, q1_ptr, s_ptr, z0_ptr, z1_ptr, tl.minimum(rm, M - 1), rn, rn < N, K,
                   t_lo, tl.minimum(t_lo + per_split, n_tiles),
                   stride_xm, stride_q0, stride_q1, stride_s, stride_z0, stride_z1,
                   GROUP, W0, W1, SYMMETRIC, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, HALF2)
    rm2 = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    rn2 = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    _store(y_ptr, ws_ptr, count_ptr, pid_m * tl.num_programs(0) + pid_n, y, rm2, rn2, (rm2 < M) & (rn2 < N),
           stride_ym, N, SPLIT_K, ATOMIC)


@triton.jit
def _expand(words, W: tl.constexpr):
    """Words `[R, C]` of W-bit codes -> codes `[R * 32 / W, C]` in K order (row r * P + j is code j of word r)."""
    P: tl.constexpr = 32 // W
    shifts = tl.arange(0, P) * W
    codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << W) - 1)
    return tl.reshape(codes, (words.shape[0] * P, words.shape[1]))


@triton.jit
def _tiled_kernel(
    x_ptr, q0_ptr, q1_ptr, s_ptr, z0_ptr, z1_ptr, y_ptr, ws_ptr, count_ptr,
    M, N, K, SPLIT_K,
    stride_xm, stride_q0, stride_q1, stride_s, stride_z0, stride_z1, stride_ym,
    GROUP: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, SYMMETRIC: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
    GATHER: tl.constexpr = False, SCALE_W: tl.constexpr = False,
):
    # One kernel body, longer than the rest of the code: its constexpr branches are compiled away per
    # configuration and its pieces (`_expand`, `_pair_dot`, ...) are jit helpers already; what remains is the
    # K loop and the split-K epilogue, which share the accumulator and the masks.
    P0: tl.constexpr = 32 // W0
    # A tile inside one group takes its scale and zero after the dot, once per output instead of per weight.
    # With SCALE_W it takes them on the weight tile instead (per weight, amortised over BLOCK_M rows), so that
    # the dot accumulates into `acc` in place and the tensor cores' K loop is not cut at every tile: large M.
    IN_GROUP: tl.constexpr = GROUP % BLOCK_K == 0
    ONE_GROUP: tl.constexpr = IN_GROUP and not SCALE_W
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    for t in range(pid_k * per_split, tl.minimum((pid_k + 1) * per_split, n_tiles)):
        k0 = t * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask_m[:, None] & (rk < K)[None, :],
                    other=0.0)
        if GATHER:
            # every K row loads its own word (P rows share one: served by L1) and shifts out its code:
            # no reshape of the expanded words, whose layout conversion can cost more than the loads
            mask_kn = (rk < K)[:, None] & mask_n[None, :]
            c = _unpack(q0_ptr, rk[:, None], rn[None, :], stride_q0, mask_kn, W0)
            if W1 > 0:
                c = (c << W1) | _unpack(q1_ptr, rk[:, None], rn[None, :], stride_q1, mask_kn, W1)
        else:
            r0 = k0 // P0 + tl.arange(0, BLOCK_K // P0)
            c = _expand(tl.load(q0_ptr + r0[:, None] * stride_q0 + rn[None, :],
                                mask=(r0 * P0 < K)[:, None] & mask_n[None, :], other=0), W0)
            if W1 > 0:
                P1: tl.constexpr = 32 // W1
                r1 = k0 // P1 + tl.arange(0, BLOCK_K // P1)
                c = (c << W1) | _expand(tl.load(q1_ptr + r1[:, None] * stride_q1 + rn[None, :],
                                                mask=(r1 * P1 < K)[:, None] & mask_n[None, :], other=0), W1)
        if ONE_GROUP:
            g = k0 // GROUP + tl.zeros((1,), dtype=tl.int32)
            mask_g = mask_n[None, :]
            scale = tl.load(s_ptr + g[:, None] * stride_s + rn[None, :], mask=mask_g, other=0.0).to(tl.float32)
            z = _zeros(z0_ptr, z1_ptr, g[:, None], rn[None, :], stride_z0, stride_z1, mask_g, W0, W1,
                       SYMMETRIC).to(tl.float32)
            if DOT_FP32:
                d = tl.dot(x.to(tl.float32), c.to(tl.float32))
            elif x.dtype == tl.float16:
                # magic number in 16 bits: 0x6400 | c is the fp16 value 1024 + c (c < 1024), no int->float
                # conversion; the 1024 goes into the zero, subtracted once per output
                d = tl.dot(x, (c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True))
                z += 1024.0
            elif W0 + W1 <= 7:
                d = tl.dot(x, (c | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True))  # bf16: 128 + c, c < 128
                z += 128.0
            else:
                d = tl.dot(x, c.to(x.dtype))  # codes < 256 are exact in fp16 and bf16
            xs = tl.sum(x.to(tl.float32), axis=1)
            acc += (d - xs[:, None] * z) * scale
        else:
            if IN_GROUP:  # one scale row for the tile
                g = k0 // GROUP + tl.zeros((1,), dtype=tl.int32)
                mask_kn = mask_n[None, :]
            else:
                g = rk // GROUP
                mask_kn = (rk < K)[:, None] & mask_n[None, :]
            scale = tl.load(s_ptr + g[:, None] * stride_s + rn[None, :], mask=mask_kn, other=0.0).to(tl.float32)
            z = _zeros(z0_ptr, z1_ptr, g[:, None], rn[None, :], stride_z0, stride_z1, mask_kn, W0, W1, SYMMETRIC)
            w = (c - z).to(tl.float32) * scale
            if DOT_FP32:
                acc = tl.dot(x.to(tl.float32), w, acc)
            else:
                acc = tl.dot(x, w.to(x.dtype), acc)
    _store(y_ptr, ws_ptr, count_ptr, pid_m * tl.num_programs(1) + pid_n, acc, rm[:, None], rn[None, :],
           mask_m[:, None] & mask_n[None, :], stride_ym, N, SPLIT_K, ATOMIC)


@triton.jit
def _dequant_kernel(q0_ptr, q1_ptr, s_ptr, z0_ptr, z1_ptr, w_ptr, N, K,
                    stride_q0, stride_q1, stride_s, stride_z0, stride_z1, stride_w,
                    GROUP: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, SYMMETRIC: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """`W.T [K, N]` in `w_ptr`'s dtype: every K row reads its own word (rows sharing a word meet in L1)."""
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)[:, None]
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    mask = (rk < K) & (rn < N)
    c = _unpack(q0_ptr, rk, rn, stride_q0, mask, W0)
    if W1 > 0:
        c = (c << W1) | _unpack(q1_ptr, rk, rn, stride_q1, mask, W1)
    g = rk // GROUP
    scale = tl.load(s_ptr + g * stride_s + rn, mask=mask, other=0.0).to(tl.float32)
    z = _zeros(z0_ptr, z1_ptr, g, rn, stride_z0, stride_z1, mask, W0, W1, SYMMETRIC)
    tl.store(w_ptr + rk * stride_w + rn, ((c - z).to(tl.float32) * scale).to(w_ptr.dtype.element_ty), mask=mask)


def dequantize(q0, q1, scales, z0, z1, K: int, bits: int, group: int, symmetric: bool,
               dtype: torch.dtype) -> torch.Tensor:
    """`W.T [K, N]` from `matmul`'s packed arguments (`reference.dequantize` in one launch)."""
    widths = shards(bits)
    N = scales.shape[1]
    w = torch.empty(K, N, device=scales.device, dtype=dtype)
    block_k, block_n = 32, 128
    _dequant_kernel[(triton.cdiv(K, block_k), triton.cdiv(N, block_n))](
        q0, q1, scales, z0, z1, w, N, K, q0.stride(0), q1.stride(0), scales.stride(0), z0.stride(0), z1.stride(0),
        w.stride(0), GROUP=group, W0=widths[0], W1=widths[1] if len(widths) > 1 else 0, SYMMETRIC=symmetric,
        BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4)
    return w


def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


PDL_MODES = ("off", "wait", "prefetch")
PDL_MODE = os.environ.get("BITPLAN_PDL", "off")


def pdl(device: torch.device) -> int:
    """How decode kernels launch (an index of `PDL_MODES`, from `BITPLAN_PDL`): 0 as usual; else as programmatic
    dependents (`launch_pdl`, Hopper and later), which may start while the kernel ahead of them drains and wait
    for it in the kernel; with "prefetch", a gemv's programs also ask L2 for their first weights in that time
    (`_pdl_prologue`)."""
    if PDL_MODE not in PDL_MODES:
        raise InvalidInput(f"BITPLAN_PDL={PDL_MODE!r}: choose one of {', '.join(PDL_MODES)}")
    mode = PDL_MODES.index(PDL_MODE)
    # called at every launch: the device is asked about only when a mode is on
    on = mode and not INTERPRET and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    return mode if on else 0


def _split(tiles: int, programs: int, sms: int, per_sm: int = 2) -> int:
    """Split K so that there are about `per_sm` programs per SM, never more slices than K tiles."""
    return max(1, min(tiles, -(-per_sm * sms // programs)))


# (BLOCK_N, warps) of gemv programs: 4, 8, 2 or 1 adjacent outputs a thread, fewer where more rows must
# fit.  Eight share each x value among more weights (x costs a load, a conversion and a scale per value)
GEMV_TILES = ((512, 4), (1024, 8), (1024, 4), (256, 2), (512, 2), (256, 4), (128, 4))


def _tiles_fitting(rows: int) -> list[tuple[int, int]]:
    """The first three `GEMV_TILES` whose threads hold at most 64 accumulators for `rows` word rows (BLOCK_M x
    word rows of a 32-row K tile); BLOCK_K = 64 doubles them, which the register allocator absorbs."""
    return [(n, w) for n, w in GEMV_TILES if rows * n // (32 * w) <= 64][:3]


def gemv_group(group: int, k: int) -> int | None:
    """The group the gemv kernel is compiled for, or None where it cannot run (it needs K tiles of 32,
    64 or 128 rows inside one group).  A per-channel group is one group: any tile lies inside it."""
    if group >= k:
        return 1 << 30
    return group if group % 32 == 0 else None


# (BLOCK_N, warps) of the HALF2 gemv: 8, 4 or 16 outputs a thread.  Its accumulator is one register per row
# and output whatever the width, and each activation pair (two loads, two conversions, a pack) is shared by
# the thread's outputs, so it takes more outputs a thread than the fp32 body.
HALF2_TILES = ((1024, 4), (2048, 4), (512, 4), (256, 2))
HALF2_BITS = (2, 3, 4)  # the widths `_h2_dot` runs (on fp16 and bf16 activations)
# On a GPU the tuner times the HALF2 body beside the fp32 one and keeps the faster per shape (on an H100 it
# was 1.32-1.46x faster at 2 and 3 bits, batch 1-4: docs/kernels.md); BITPLAN_GEMV_HALF2=0 offers the fp32
# body alone.  Under the interpreter it is off unless asked for (=1): its emulation of the packed pairs is
# many times slower than the fp32 body there, and the tests that pin a body cover it.  A config may still
# ask for either.
HALF2_ENABLED = os.environ.get("BITPLAN_GEMV_HALF2", "0" if INTERPRET else "1") != "0"


# Programs per SM the tuner tries, through split-K.  A layer of 4096 outputs split 64 ways (four or more programs
# an SM) sums 64 partials per output through L2 atomics, as many bytes as an eighth of its 4-bit weights: one or
# two programs an SM, fewer partials, are candidates too (after the others: the first candidate is what runs
# untuned, under the interpreter)
GEMV_PER_SM = (4, 8, 16, 1, 2)


def gemv_configs(M: int, N: int, K: int, bits: int, group: int, sms: int, half2: bool = True) -> list[dict]:
    """The tuner's candidates: the HALF2 body's and the fp32 body's (`half2=False`: the fp32 body's alone)."""
    P = 32 // shards(bits)[0]
    block_m = min(triton.next_power_of_2(M), GEMV_MAX_M)
    out = []
    # Loads in flight hide HBM latency (Nsight Compute showed the first gemv waiting on memory at 15-37 %
    # occupancy): a thread's tile is every word row of 4 adjacent outputs, up to 16 16-byte loads issued
    # together, and programs per SM (`per_sm`, through split-K) multiply them.  Both bodies are candidates, so
    # that the HALF2 body (fewer instructions a weight) is used only where it is timed faster
    bodies = ((True, HALF2_TILES, (32, 64, 128)),) if half2 and HALF2_ENABLED and bits in HALF2_BITS else ()
    # 128 never won on the H100 for the fp32 body (bench/results/gemv_lab.json, an M = 1 prototype); the HALF2
    # body's per-tile cost (fp16 sums to fp32, zero, scale) is larger, so it may
    bodies += ((False, _tiles_fitting(block_m * 32 // P), (32, 64)),)
    for body, tiles, block_ks in bodies:
        for block_n, warps in tiles:
            for block_k in block_ks:
                if group < K and group % block_k:
                    continue
                for per_sm in GEMV_PER_SM:
                    split = _split(-(-K // block_k), -(-N // block_n) * -(-M // block_m), sms, per_sm)
                    out.append(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
                                    num_warps=warps, num_stages=1, HALF2=body))
    return out


def tiled_configs(M: int, N: int, K: int, bits: int, group: int, sms: int) -> list[dict]:
    # BLOCK_K a multiple of 32 (every shard's words whole) dividing the group when it can
    block_k = 128 if group % 128 == 0 else 64 if group % 64 == 0 else 32 if group % 32 == 0 else 64
    if M <= 16:
        shapes = ((16, 64, block_k, 4, 3), (16, 128, block_k, 4, 3), (16, 256, block_k, 8, 3))
    else:
        shapes = ((64, 64, block_k, 4, 3), (64, 128, block_k, 4, 3), (128, 128, block_k, 8, 3),
                  (128, 256, min(block_k, 64), 8, 3), (128, 128, min(block_k, 64), 4, 4))
    out = []
    large = M >= DEQUANT_MIN_M
    for bm, bn, bk, warps, stages in shapes:
        split = _split(-(-K // bk), -(-M // bm) * -(-N // bn), sms) if M <= 64 else 1
        base = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, GATHER=False, num_warps=warps,
                    num_stages=stages)
        # at 64 and 256 rows GATHER never won, and SCALE_W beat the plain tile on all 4 products measured, by
        # 1.03-1.37x (bench/results/configs_tiled_v2.json)
        out += [base, dict(base, SCALE_W=True)] if large else [base, dict(base, GATHER=True)]
    if large:
        # the whole weight dequantized to x's dtype, then cuBLAS: a temporary of one layer in 16 bits, and the
        # tuner keeps it only where it beats the fused tiles (as exllama's kernels do for large batches)
        out.append(dict(out[0], DEQUANT=True))
    return out


def skinny_configs(M: int, N: int, K: int, bits: int, group: int, sms: int) -> list[dict]:
    from bitplan.kernels import skinny

    return skinny.skinny_configs(M, N, K, bits, group, sms)


CONFIGS = {"gemv": gemv_configs, "tiled": tiled_configs, "skinny": skinny_configs}


def skinny_fits(M: int, k: int, group: int, dtype: torch.dtype) -> bool:
    """Whether the skinny kernel (`kernels/skinny.py`: tensor cores, no K-ordered code tile) can run this product:
    2 to 16 rows of 16-bit activations, groups of 128 rows or more.  Its large-batch tiles (`skinny.large_configs`)
    are not offered: on an H200 they took 1.5-2.0x the tiled kernel's time at 64 and 256 rows
    (bench/results/kernels_large_batch_v8.json)."""
    from bitplan.kernels import skinny

    return 2 <= M <= skinny.SKINNY_MAX_M and dtype in (torch.float16, torch.bfloat16) and \
        skinny.skinny_group(group, k) is not None


def _regimes(M: int, k: int, group: int, dtype: torch.dtype) -> list[str]:
    """The kernels the dispatcher's tuner chooses among for M rows: the gemv (up to 4 rows) or the tiled kernel,
    and from 2 to 16 rows the skinny kernel beside it (each timed, the faster kept per shape and batch)."""
    first = "gemv" if M <= GEMV_MAX_M and gemv_group(group, k) else "tiled"
    return [first, "skinny"] if SKINNY_ENABLED and skinny_fits(M, k, group, dtype) else [first]


# BITPLAN_SKINNY=0 leaves batch 2-16 to the gemv and tiled kernels alone (under the interpreter it is off unless
# asked for, so that the dispatcher's default there stays the kernel the other tests pin)
SKINNY_ENABLED = os.environ.get("BITPLAN_SKINNY", "0" if INTERPRET else "1") != "0"


_TUNED: dict[tuple, dict] = {}


_WORKSPACE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(device: torch.device, elements: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial sums and int32 tile counters for split-K (`_store`), zero between calls.

    One pair per device and stream, grown on demand: kernels of one stream run one after another, so
    they can share it (a kernel leaves it zeroed), where kernels on two streams could not.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    ws, count = _WORKSPACE.get((device, stream), (None, None))
    if ws is None or ws.numel() < elements or count.numel() < tiles:
        ws = torch.zeros(max(elements, 1 << 16, 0 if ws is None else ws.numel()), dtype=torch.float32, device=device)
        count = torch.zeros(max(tiles, 1 << 12, 0 if count is None else count.numel()), dtype=torch.int32,
                            device=device)
        _WORKSPACE[device, stream] = ws, count
    return ws, count


def _launch(regime: str, x2, q0, q1, scales, z0, z1, M, N, K, bits, group, symmetric, cfg) -> torch.Tensor:
    widths = shards(bits)
    if cfg.get("DEQUANT"):
        return x2 @ dequantize(q0, q1, scales, z0, z1, K, bits, group, symmetric, x2.dtype)
    cfg = dict(cfg)
    cfg.pop("DEQUANT", None)
    regime = cfg.pop("REGIME", regime)  # the dispatcher's tuner may choose the skinny kernel (`_regimes`)
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    if regime == "skinny":
        from bitplan.kernels import skinny

        tiles = triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(M, cfg["BLOCK_M"])
        ws, count = workspace(x2.device, M * N, tiles) if cfg["SPLIT_K"] > 1 else (y, y)
        skinny.launch(x2, q0, q1, scales, z0, z1, y, ws, count, M, N, K, widths, group, symmetric, cfg)
        return y
    split = cfg.pop("SPLIT_K")
    common = dict(W0=widths[0], W1=widths[1] if len(widths) > 1 else 0, SYMMETRIC=symmetric, ATOMIC=split > 1)
    if regime == "gemv":
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), split, triton.cdiv(M, cfg["BLOCK_M"]))
        # HALF2 is on unless a config turns it off (`bench/kernels.py` times the fp32 body beside it)
        common.update(GROUP=gemv_group(group, K), EVEN_K=K % cfg["BLOCK_K"] == 0,
                      HALF2=cfg.pop("HALF2", HALF2_ENABLED) and x2.dtype != torch.float32)
        if mode := pdl(x2.device):
            common.update(PDL=mode, launch_pdl=True)
        if common["GROUP"] is None:
            raise ValueError(f"the gemv kernel needs a group of 32 rows or more (or per-channel), got {group}")
        kernel = _gemv_kernel
    else:
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), split)
        common.update(GROUP=group, DOT_FP32=x2.dtype == torch.float32 or (INTERPRET and x2.dtype == torch.bfloat16))
        kernel = _tiled_kernel
    # without split-K the kernel never touches the workspace: y stands in for it (no lookup per call)
    ws, count = (workspace(x2.device, M * N, grid[0] * grid[2] if regime == "gemv" else grid[0] * grid[1])
                 if split > 1 else (y, y))
    if INTERPRET:
        cfg.pop("num_stages", None)
    kernel[grid](x2, q0, q1, scales, z0, z1, y, ws, count, M, N, K, split,
                 x2.stride(0), q0.stride(0), q1.stride(0), scales.stride(0), z0.stride(0), z1.stride(0), y.stride(0),
                 **common, **cfg)
    return y


def matmul(x: torch.Tensor, qweight: list[torch.Tensor], scales: torch.Tensor, qzeros: list[torch.Tensor] | None,
           bits: int, group_size: int, k: int, config: dict | None = None, regime: str | None = None) -> torch.Tensor:
    """`x @ W.T` for `x: [..., K]` (fp16/bf16/fp32) from packed codes; same contract as `reference.matmul`.

    `regime` ("gemv" or "tiled") and `config` override the dispatcher and the tuner (tests, benchmarks).
    """
    widths = shards(bits)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape[0], scales.shape[1]
    regimes = [regime] if regime is not None else _regimes(M, k, group_size, x2.dtype)
    regime = regimes[0] if len(regimes) == 1 else "auto"
    q0 = qweight[0]
    q1 = qweight[1] if len(widths) > 1 else q0
    symmetric = not qzeros
    z0 = qzeros[0] if qzeros else scales
    z1 = (qzeros[1] if len(widths) > 1 else qzeros[0]) if qzeros else scales
    weights = (q0, q1, scales, z0, z1)
    shape = (M, N, k, bits, group_size, symmetric)

    def candidates() -> list[dict]:  # only on a cache miss: decode calls this function per layer per token
        return [dict(cfg, REGIME=r) for r in regimes for cfg in CONFIGS[r](M, N, k, bits, group_size,
                                                                              _sm_count(x2.device))]

    if config is not None:
        config = dict(candidates()[0], **config)
    else:
        key = (regime, tuning_bucket(M), N, k, bits, group_size, symmetric, x2.dtype, x2.device.index)

        def tune() -> dict:
            if INTERPRET or not x2.is_cuda:
                return candidates()[0]
            return _fastest(candidates(), lambda cfg, *w: _launch(regime, x2, *w, *shape, cfg), weights)

        config = tuned(_TUNED, "matmul", key, x2.device, tune)
    return _launch(regime, x2, *weights, *shape, config).reshape(*lead, N)


@torch.library.custom_op("bitplan::quant_matmul", mutates_args=())
def quant_matmul(x: torch.Tensor, qweight: list[torch.Tensor], scales: torch.Tensor,
                 qzeros: list[torch.Tensor], bits: int, group_size: int, k: int) -> torch.Tensor:
    """`matmul` as one opaque operator, so that `torch.compile` fuses the code around a quantized linear
    and calls the dispatcher (its tuner and its Python-side cache) as it is, instead of tracing it.
    `qzeros` is empty for a symmetric weight (an operator's schema has no optional list)."""
    return matmul(x, qweight, scales, qzeros, bits, group_size, k)


@quant_matmul.register_fake
def _quant_matmul_shape(x, qweight, scales, qzeros, bits, group_size, k):
    return x.new_empty(*x.shape[:-1], scales.shape[1])


def tuning_bucket(M: int) -> int:
    """The batch sizes that share one tuned configuration (`_TUNED`'s key): each up to 16, then powers of two."""
    return M if M <= 16 else min(triton.next_power_of_2(M), 1024)


def _fastest(candidates: list[dict], launch, weights: tuple[torch.Tensor, ...] = ()) -> dict:
    """The configuration under which `launch(config, *weights)` runs fastest (the tuner of this and
    `kernels/moe.py`).

    With `weights`, each candidate is timed as `bench/kernels.py` times it and as a decode graph runs it:
    over copies of the weights that together exceed 4x L2, inside a CUDA graph (`timing.cold_time_us`).
    One call at a time through `do_bench` (the fallback) adds a launch gap as large as the differences
    between configurations on small layers, and picked configurations up to 20 % apart from run to run
    there (bench/results/tuning_noise_small_layers.json).
    """
    from bitplan.kernels.timing import cold_time_us, copies_for

    copies = []
    if weights:
        unique = {id(t): t for t in weights}  # q1 and z1 may alias q0 and the scales: copy each tensor once
        n = copies_for(sum(t.numel() * t.element_size() for t in unique.values()))
        for _ in range(n - 1):
            clone = {i: t.clone() for i, t in unique.items()}
            copies.append(tuple(clone[id(t)] for t in weights))
        copies.append(weights)
    best, best_t = candidates[0], float("inf")
    for cfg in candidates:
        try:
            if copies:
                t = cold_time_us([lambda c=c, cfg=cfg: launch(cfg, *c) for c in copies], replays=5)
            else:
                t = triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=40, return_mode="median")
        except Exception:  # noqa: BLE001 - a config the compiler rejects (e.g. out of shared memory) is skipped
            continue
        if t < best_t:
            best, best_t = cfg, t
    return best
