"""Fused dequantize + matmul in Triton for the packed format of `kernels/reference.py`.

`y[M, N] = x[M, K] @ W.T` where W is stored as 1 or 2 power-of-two shards of codes packed along K,
fp16 scales `[G, N]` and packed integer zeros.  One kernel body serves every width: the shard widths
are compile-time constants (`W0`, `W1`; `W1 = 0` for one shard), so each width gets its own
specialised binary.

Each program owns a `BLOCK_M x BLOCK_N` output tile and one of `SPLIT_K` slices of K: it unpacks a
`BLOCK_K x BLOCK_N` tile of codes in registers, applies scale and zero, and feeds `tl.dot`.  Split-K
partial sums meet through fp32 atomics, which keeps small-batch (memory-bound) shapes busy on every
SM.  This is the first, straightforward version: the integer-to-float magic-number trick and
per-group (rather than per-row) scale loads are the next steps, measured by `bench/kernels.py`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from bitplan.kernels.reference import shards

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _unpack(ptr, rows, cols, stride, mask, W: tl.constexpr):
    """Codes of width W at logical `rows` (K or G index) and `cols` (N index): [R, C] int32."""
    per: tl.constexpr = 32 // W
    words = tl.load(ptr + (rows // per)[:, None] * stride + cols[None, :], mask=mask, other=0)
    return (words >> ((rows % per) * W)[:, None]) & ((1 << W) - 1)


@triton.jit
def _matmul_kernel(
    x_ptr, q0_ptr, q1_ptr, s_ptr, z0_ptr, z1_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_q0, stride_q1, stride_s, stride_z0, stride_z1, stride_ym,
    GROUP: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, SYMMETRIC: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & mask_k[None, :], other=0.0)
        mask_kn = mask_k[:, None] & mask_n[None, :]
        q = _unpack(q0_ptr, rk, rn, stride_q0, mask_kn, W0)
        if W1 > 0:
            q = (q << W1) | _unpack(q1_ptr, rk, rn, stride_q1, mask_kn, W1)
        g = rk // GROUP
        scale = tl.load(s_ptr + g[:, None] * stride_s + rn[None, :], mask=mask_kn, other=0.0).to(tl.float32)
        if SYMMETRIC:
            z = (1 << (W0 + W1 - 1))
        else:
            z = _unpack(z0_ptr, g, rn, stride_z0, mask_kn, W0)
            if W1 > 0:
                z = (z << W1) | _unpack(z1_ptr, g, rn, stride_z1, mask_kn, W1)
        w = (q - z).to(tl.float32) * scale  # [BLOCK_K, BLOCK_N]
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w)
        else:
            acc += tl.dot(x, w.to(x.dtype))
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    mask_out = (rm[:, None] < M) & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=mask_out)
    else:
        tl.atomic_add(out, acc, mask=mask_out)


def default_config(M: int, N: int, K: int) -> dict:
    """Tile sizes by regime: skinny (M <= 16, memory-bound) splits K; larger M tiles M."""
    if M <= 16:
        split = max(1, min(8, K // 512))
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=split, num_warps=4)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1, num_warps=4)


def matmul(x: torch.Tensor, qweight: list[torch.Tensor], scales: torch.Tensor, qzeros: list[torch.Tensor] | None,
           bits: int, group_size: int, k: int, config: dict | None = None) -> torch.Tensor:
    """`x @ W.T` for `x: [..., K]` (fp16/bf16/fp32) from packed codes; same contract as `reference.matmul`."""
    widths = shards(bits)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    M, N = x2.shape[0], scales.shape[1]
    cfg = dict(default_config(M, N, k), **(config or {}))
    warps = cfg.pop("num_warps")
    y = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    q0, q1 = qweight[0], qweight[1] if len(widths) > 1 else qweight[0]
    z0 = qzeros[0] if qzeros else scales
    z1 = (qzeros[1] if len(widths) > 1 else qzeros[0]) if qzeros else scales
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    _matmul_kernel[grid](
        x2, q0, q1, scales, z0, z1, y, M, N, k,
        x2.stride(0), q0.stride(0), q1.stride(0), scales.stride(0), z0.stride(0), z1.stride(0), y.stride(0),
        GROUP=group_size, W0=widths[0], W1=widths[1] if len(widths) > 1 else 0, SYMMETRIC=not qzeros,
        # Triton's CPU interpreter computes bf16 dots wrongly (garbage, seen with triton 3.9): dot in fp32 there
        DOT_FP32=x2.dtype == torch.float32 or (INTERPRET and x2.dtype == torch.bfloat16),
        num_warps=warps, **cfg,
    )
    return y.to(x.dtype).reshape(*lead, N)
