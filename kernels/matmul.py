"""Fused dequantize + matmul in Triton for the packed format of `kernels/reference.py`.

`y[M, N] = x[M, K] @ W.T` where W is stored as 1 or 2 power-of-two shards of codes packed along K,
fp16 scales `[G, N]` and packed integer zeros.  The shard widths are compile-time constants (`W0`,
`W1`; `W1 = 0` for one shard), so every width gets its own specialised binary from one body.

Two kernels, picked by `matmul` from the number of rows M (measured on an H100: bench/kernels.py):

- **gemv** (M <= 4, decode: memory-bound).  The cost to beat is instructions per weight, not FLOPs,
  so there is no `tl.dot` (its operand layout shuffles cost more than the FMAs they save at M <= 4).
  Each packed word is loaded once and its `P = 32 / W0` codes peeled off by a static loop over the
  bit position `j`: position `j` of a tile of word rows holds K rows `r * P + j`, so the activations
  are gathered with the same stride.  Integer to float by the magic-number trick (OR the code into
  the mantissa of 2^23, subtract 2^23: no slow I2F conversion).  A word row lies inside one
  quantization group (P divides the group size), so the loop accumulates only `Σ x·q` and `Σ x`
  per word row, and scale and zero are applied once per word row and output, after it:
  `Σ x·(q - z)·s = s·(Σ x·q - z·Σ x)`.  About four instructions per weight (shift, mask, subtract,
  FMA).  Split-K keeps every SM busy when N alone gives too few programs.
- **tiled** (M > 4).  The packed words of a `BLOCK_K x BLOCK_N` tile are loaded once and expanded
  to codes in K order, which feed `tl.dot` as exact integers in the activation dtype; when the tile
  lies inside one group, scale and zero are applied to the dot's result (same identity as above),
  else per weight.  Split-K for small M, plain output tiles for large M.

On CUDA the first call of each (regime, shape, width, group) times a handful of configurations and
caches the fastest in-process (`_TUNED`).  Under `TRITON_INTERPRET=1` (CPU tests) the default
configuration runs, and dots run in fp32 because Triton 3.9's interpreter computes bf16 dots wrongly.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from bitplan.kernels.reference import shards

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GEMV_MAX_M = 4  # above, the tiled kernel: a gemv program per 16 rows measured 3x slower (bench/kernels.py)


@triton.jit
def _unpack(ptr, rows, cols, stride, mask, W: tl.constexpr):
    """Codes of width W at logical `rows` (K or G index) and `cols` (N index): [R, C] int32."""
    per: tl.constexpr = 32 // W
    words = tl.load(ptr + (rows // per)[:, None] * stride + cols[None, :], mask=mask, other=0)
    return (words >> ((rows % per) * W)[:, None]) & ((1 << W) - 1)


@triton.jit
def _zeros(z0_ptr, z1_ptr, g, rn, stride_z0, stride_z1, mask, W0: tl.constexpr, W1: tl.constexpr,
           SYMMETRIC: tl.constexpr):
    if SYMMETRIC:
        z = tl.full(mask.shape, 1 << (W0 + W1 - 1), tl.int32)
    else:
        z = _unpack(z0_ptr, g, rn, stride_z0, mask, W0)
        if W1 > 0:
            z = (z << W1) | _unpack(z1_ptr, g, rn, stride_z1, mask, W1)
    return z


@triton.jit
def _gemv_tile(x_ptr, q0_ptr, q1_ptr, s_ptr, z0_ptr, z1_ptr, rm, rn, mask_m, mask_n, K, pid_k,
               stride_xm, stride_q0, stride_q1, stride_s, stride_z0, stride_z1,
               GROUP: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, SYMMETRIC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, SPLIT_K: tl.constexpr,
               PREFETCH: tl.constexpr):
    """`[BLOCK_M, BLOCK_N]` partial product of rows `rm`, outputs `rn` over split `pid_k` of K.

    `rm`, `rn` are 3-D (`[BLOCK_M, 1, 1]`, `[1, 1, BLOCK_N]`): everything lives in one 3-D
    `[BLOCK_M, ROWS, BLOCK_N]` layout built from 3-D pointers, since a 2-D tensor broadcast into it
    would cost a layout conversion (a shared-memory round trip) per code position.  The one body of
    the dense and the MoE gemv kernels.
    """
    P: tl.constexpr = 32 // W0  # codes per word of the first shard: K rows per word row
    BLOCK_K: tl.constexpr = ROWS * P
    acc = tl.zeros((BLOCK_M, ROWS, BLOCK_N), dtype=tl.float32)
    n_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_lo = pid_k * per_split
    t_hi = tl.minimum(t_lo + per_split, n_tiles)
    if PREFETCH:
        # the next tile's words are requested before this tile's arithmetic: twice the loads in flight
        # per warp, where Nsight Compute shows the kernel waiting on memory at low occupancy
        first = (t_lo * ROWS + tl.arange(0, ROWS))[None, :, None]
        ahead = tl.load(q0_ptr + first * stride_q0 + rn, mask=(first * P < K) & mask_n & (first < t_hi * ROWS),
                        other=0)
    for t in range(t_lo, t_hi):
        wrow = (t * ROWS + tl.arange(0, ROWS))[None, :, None]
        k_first = wrow * P  # K row of each word's code 0
        mask_w = (k_first < K) & mask_n
        if PREFETCH:
            words0 = ahead
            ahead = tl.load(q0_ptr + (wrow + ROWS) * stride_q0 + rn,
                            mask=((wrow + ROWS) * P < K) & mask_n & (wrow + ROWS < t_hi * ROWS), other=0)
        else:
            words0 = tl.load(q0_ptr + wrow * stride_q0 + rn, mask=mask_w, other=0)
        if W1 > 0:
            PER1: tl.constexpr = 32 // W1
            words1 = tl.load(q1_ptr + (k_first // PER1) * stride_q1 + rn, mask=mask_w, other=0)
            shift1 = (k_first % PER1) * W1
        # Σ_j x·q and Σ_j x per word row; a word row lies in one group, so scale and zero wait till after
        xq = tl.zeros((BLOCK_M, ROWS, BLOCK_N), dtype=tl.float32)
        xs = tl.zeros((BLOCK_M, ROWS, 1), dtype=tl.float32)
        for j in tl.static_range(P):
            c = (words0 >> (j * W0)) & ((1 << W0) - 1)
            if W1 > 0:
                c = (c << W1) | ((words1 >> (shift1 + j * W1)) & ((1 << W1) - 1))
            q = (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # 2^23's mantissa holds the code
            kj = k_first + j
            x = tl.load(x_ptr + rm * stride_xm + kj, mask=mask_m & (kj < K), other=0.0).to(tl.float32)
            xq += x * q
            xs += x
        g = k_first // GROUP  # P divides GROUP
        scale = tl.load(s_ptr + g * stride_s + rn, mask=mask_w, other=0.0).to(tl.float32)
        if SYMMETRIC:
            z = 1 << (W0 + W1 - 1)
        else:
            z = (tl.load(z0_ptr + (g // P) * stride_z0 + rn, mask=mask_w, other=0) >> ((g % P) * W0)) \
                & ((1 << W0) - 1)
            if W1 > 0:
                z = (z << W1) | ((tl.load(z1_ptr + (g // PER1) * stride_z1 + rn, mask=mask_w, other=0)
                                  >> ((g % PER1) * W1)) & ((1 << W1) - 1))
        acc += scale * (xq - xs * z.to(tl.float32))
    return tl.sum(acc, axis=1)


@triton.jit
def _store(y_ptr, y, rm2, rn2, mask_out, stride_ym, SPLIT_K: tl.constexpr):
    out = y_ptr + rm2 * stride_ym + rn2
    if SPLIT_K == 1:
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=mask_out)
    else:
        tl.atomic_add(out, y, mask=mask_out)


@triton.jit
def _gemv_kernel(
    x_ptr, q0_ptr, q1_ptr, s_ptr, z0_ptr, z1_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_q0, stride_q1, stride_s, stride_z0, stride_z1, stride_ym,
    GROUP: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, SPLIT_K: tl.constexpr,
    PREFETCH: tl.constexpr = False,
):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M))[:, None, None]
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, None, :]
    y = _gemv_tile(x_ptr, q0_ptr, q1_ptr, s_ptr, z0_ptr, z1_ptr, rm, rn, rm < M, rn < N, K, pid_k,
                   stride_xm, stride_q0, stride_q1, stride_s, stride_z0, stride_z1,
                   GROUP, W0, W1, SYMMETRIC, BLOCK_M, BLOCK_N, ROWS, SPLIT_K, PREFETCH)
    rm2 = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    rn2 = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    _store(y_ptr, y, rm2, rn2, (rm2 < M) & (rn2 < N), stride_ym, SPLIT_K)


@triton.jit
def _expand(words, W: tl.constexpr):
    """Words `[R, C]` of W-bit codes -> codes `[R * 32 / W, C]` in K order (row r * P + j is code j of word r)."""
    P: tl.constexpr = 32 // W
    shifts = tl.arange(0, P) * W
    codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << W) - 1)
    return tl.reshape(codes, (words.shape[0] * P, words.shape[1]))


@triton.jit
def _tiled_kernel(
    x_ptr, q0_ptr, q1_ptr, s_ptr, z0_ptr, z1_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_q0, stride_q1, stride_s, stride_z0, stride_z1, stride_ym,
    GROUP: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, SYMMETRIC: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GATHER: tl.constexpr = False,
):
    P0: tl.constexpr = 32 // W0
    # a tile inside one group takes its scale and zero after the dot, once per output instead of per weight
    ONE_GROUP: tl.constexpr = GROUP % BLOCK_K == 0
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
            c = _unpack(q0_ptr, rk, rn, stride_q0, mask_kn, W0)
            if W1 > 0:
                c = (c << W1) | _unpack(q1_ptr, rk, rn, stride_q1, mask_kn, W1)
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
            z = _zeros(z0_ptr, z1_ptr, g, rn, stride_z0, stride_z1, mask_g, W0, W1, SYMMETRIC).to(tl.float32)
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
            g = rk // GROUP
            mask_kn = (rk < K)[:, None] & mask_n[None, :]
            scale = tl.load(s_ptr + g[:, None] * stride_s + rn[None, :], mask=mask_kn, other=0.0).to(tl.float32)
            z = _zeros(z0_ptr, z1_ptr, g, rn, stride_z0, stride_z1, mask_kn, W0, W1, SYMMETRIC)
            w = (c - z).to(tl.float32) * scale
            if DOT_FP32:
                acc += tl.dot(x.to(tl.float32), w)
            else:
                acc += tl.dot(x, w.to(x.dtype))
    _store(y_ptr, acc, rm[:, None], rn[None, :], mask_m[:, None] & mask_n[None, :], stride_ym, SPLIT_K)


def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _split(tiles: int, programs: int, sms: int, per_sm: int = 2) -> int:
    """Split K so that there are about `per_sm` programs per SM, never more slices than K tiles."""
    return max(1, min(tiles, -(-per_sm * sms // programs)))


def gemv_configs(M: int, N: int, K: int, bits: int, group: int, sms: int) -> list[dict]:
    P = 32 // shards(bits)[0]
    block_m = min(triton.next_power_of_2(M), GEMV_MAX_M)
    out = []
    # Loads in flight hide HBM latency: more programs per SM (`per_sm`) and more word rows per
    # iteration (`ROWS`) are the two ways to get them, since Triton does not pipeline these loads.
    tiles = ((128, 8, 4, 2, False), (256, 8, 4, 2, False), (128, 16, 4, 2, False), (256, 16, 8, 2, False),
             (128, 8, 4, 8, False), (128, 16, 4, 8, False), (64, 32, 4, 8, False), (256, 8, 8, 16, False),
             (128, 16, 4, 16, False), (128, 8, 4, 8, True), (128, 8, 4, 16, True), (256, 8, 8, 8, True))
    for block_n, rows, warps, per_sm, prefetch in tiles:
        if block_m * rows * block_n > 8192:  # accumulator registers per program
            continue
        split = _split(-(-K // (rows * P)), -(-N // block_n), sms, per_sm)
        out.append(dict(BLOCK_M=block_m, BLOCK_N=block_n, ROWS=rows, SPLIT_K=split, PREFETCH=prefetch,
                        num_warps=warps, num_stages=2))
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
    for bm, bn, bk, warps, stages in shapes:
        split = _split(-(-K // bk), -(-M // bm) * -(-N // bn), sms) if M <= 64 else 1
        for gather in (False, True):
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, GATHER=gather,
                            num_warps=warps, num_stages=stages))
    return out


CONFIGS = {"gemv": gemv_configs, "tiled": tiled_configs}


_TUNED: dict[tuple, dict] = {}


def _launch(regime: str, x2, q0, q1, scales, z0, z1, M, N, K, bits, group, symmetric, cfg) -> torch.Tensor:
    widths = shards(bits)
    cfg = dict(cfg)
    split = cfg["SPLIT_K"]
    # split-K partial sums meet through fp32 atomics; otherwise store straight into x's dtype
    y = torch.zeros(M, N, device=x2.device, dtype=torch.float32) if split > 1 else \
        torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    dot_fp32 = x2.dtype == torch.float32 or (INTERPRET and x2.dtype == torch.bfloat16)
    common = dict(GROUP=group, W0=widths[0], W1=widths[1] if len(widths) > 1 else 0, SYMMETRIC=symmetric,
                  DOT_FP32=dot_fp32)
    if regime == "gemv":
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), split, triton.cdiv(M, cfg["BLOCK_M"]))
        common.pop("DOT_FP32")  # no dot: fp32 FMAs
        kernel = _gemv_kernel
    else:
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), split)
        kernel = _tiled_kernel
    if INTERPRET:
        cfg.pop("num_stages", None)
    kernel[grid](x2, q0, q1, scales, z0, z1, y, M, N, K,
                 x2.stride(0), q0.stride(0), q1.stride(0), scales.stride(0), z0.stride(0), z1.stride(0), y.stride(0),
                 **common, **cfg)
    return y if y.dtype == x2.dtype else y.to(x2.dtype)


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
    # the gemv kernel needs each word row inside one group: P | group (true for groups of 32 and up,
    # and for per-channel groups of a K that is a multiple of 32)
    if regime is None:
        regime = "gemv" if M <= GEMV_MAX_M and group_size % (32 // widths[0]) == 0 else "tiled"
    q0 = qweight[0]
    q1 = qweight[1] if len(widths) > 1 else q0
    symmetric = not qzeros
    z0 = qzeros[0] if qzeros else scales
    z1 = (qzeros[1] if len(widths) > 1 else qzeros[0]) if qzeros else scales
    args = (x2, q0, q1, scales, z0, z1, M, N, k, bits, group_size, symmetric)

    def candidates() -> list[dict]:  # only on a cache miss: decode calls this function per layer per token
        return CONFIGS[regime](M, N, k, bits, group_size, _sm_count(x2.device))

    if config is not None:
        config = dict(candidates()[0], **config)
    else:
        bucket = M if M <= 16 else min(triton.next_power_of_2(M), 1024)
        key = (regime, bucket, N, k, bits, group_size, symmetric, x2.dtype, x2.device.index)
        config = _TUNED.get(key)
        if config is None:
            found = candidates()
            config = found[0] if INTERPRET or not x2.is_cuda else \
                _fastest(found, lambda cfg: _launch(regime, *args, cfg))
            _TUNED[key] = config
    return _launch(regime, *args, config).reshape(*lead, N)


def _fastest(candidates: list[dict], launch) -> dict:
    """The configuration under which `launch(config)` runs fastest (the tuner of this and `kernels/moe.py`)."""
    best, best_ms = candidates[0], float("inf")
    for cfg in candidates:
        try:
            ms = triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20)
        except Exception:  # noqa: BLE001 - a config the compiler rejects (e.g. out of shared memory) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best
