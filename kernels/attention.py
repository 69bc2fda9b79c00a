"""Decode attention: one query token per sequence against a KV cache, grouped-query heads, in Triton.

At decode time attention reads the cache once and does a few FLOPs per byte, so what costs is the
kernels' count and the cache's bytes.  PyTorch's fused attention kernels are built for many queries: with
one query a program holds mostly padding, grouped-query heads are first copied out to one key and value
head per query head (`repeat_kv`, when the step is compiled), and the cache is not split over the SMs.

Here each program takes one key/value head of one sequence and a slice of the cache positions, with the `G`
query heads that share that key/value head as the rows of its tile (padded to 16 for `tl.dot`), so the cache
is read once for all of them; a block's keys and values come in one load, so that a program waits on memory
for them once.  It keeps a running softmax over its slice (flash attention's recurrence) and writes its partial
output, row maximum and sum for the real rows; the last of a head's programs to finish combines the slices
(counted in through an atomic, as the matmul kernels' split-K is), loading several slices' partials at a time,
so a step's attention is one launch.
Cache positions the mask rules out (the unfilled end of a static cache, padding) are skipped a block at
a time when the whole block is masked, so a static cache costs what its filled part does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from bitplan.kernels.matmul import INTERPRET, _sm_count, pdl, workspace

NEG = tl.constexpr(-1.0e30)  # the running maximum's start: finite, so a slice with no position left gives exp(NEG - m) = 0


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_off, mask_ptr, acc_ptr, ml_ptr, count_ptr, out_ptr, L, KVH, per_split, scale,
                   sq_b, sq_h, s_b, s_h, s_l, sm_b, sm_l, so_b, so_h,
                   G: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, BLOCK_L: tl.constexpr,
                   HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr, SPLITS_P2: tl.constexpr, GP2: tl.constexpr,
                   CHUNK: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # the next kernel (the o projection's gemv) may start, and prefetch its weights, while this one runs
        gdc_launch_dependents()
        gdc_wait()
    bh, split, splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    b, kvh = bh // KVH, bh % KVH
    rows = tl.arange(0, ROWS)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + (kvh * G + rows)[:, None] * sq_h + d[None, :], mask=rows[:, None] < G, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    m = tl.full([ROWS], NEG, tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, L)
    for start in range(lo, hi, BLOCK_L):
        pos = start + tl.arange(0, BLOCK_L)
        keep = pos < hi
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + b * sm_b + pos * sm_l, mask=pos < hi, other=0) != 0)
        if tl.max(keep.to(tl.int32), axis=0) > 0:  # a block the mask rules out whole is not read
            # the key and value blocks as one [2, BLOCK_L, D] load (the value cache is `v_off` elements from the
            # key cache), so that both are requested before either is stored to shared memory: as two loads, the
            # compiler writes the first to shared memory, which waits for it, before it issues the second
            kv = tl.load(k_ptr + tl.arange(0, 2)[:, None, None] * v_off + b * s_b + kvh * s_h
                         + pos[None, :, None] * s_l + d[None, None, :], mask=keep[None, :, None], other=0.0)
            k, v = tl.split(tl.permute(kv, (1, 2, 0)))
            if DOT_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            if DOT_FP32:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            total = total * alpha + tl.sum(p, axis=1)
            m = m_new
    if SPLITS_P2 == 1:
        out = out_ptr + b * so_b + (kvh * G + rows)[:, None] * so_h + d[None, :]
        tl.store(out, (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=rows[:, None] < G)
    else:
        # this slice's partials, the G real rows only: [B * KVH, splits, GP2, D] and [B * KVH, splits, 2, GP2],
        # written as atomics (int32 bits: the interpreter exchanges no floats) so that they are in L2 before the
        # program counts itself in; the last program of the key/value head to arrive combines every slice
        base = bh * splits + split
        real = rows < G
        acc_bits = acc_ptr.to(tl.pointer_type(tl.int32))
        ml_bits = ml_ptr.to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(acc_bits + base * GP2 * D + rows[:, None] * D + d[None, :], acc.to(tl.int32, bitcast=True),
                       mask=real[:, None], sem="relaxed")
        tl.atomic_xchg(ml_bits + base * 2 * GP2 + rows, m.to(tl.int32, bitcast=True), mask=real, sem="relaxed")
        tl.atomic_xchg(ml_bits + base * 2 * GP2 + GP2 + rows, total.to(tl.int32, bitcast=True), mask=real,
                       sem="relaxed")
        tl.debug_barrier()  # every thread's partials are issued before the program counts itself in
        if tl.atomic_add(count_ptr + bh, 1, sem="acq_rel") == splits - 1:
            _combine(acc_ptr, ml_ptr, out_ptr + b * so_b + kvh * G * so_h, so_h, bh, splits, G, D, GP2, SPLITS_P2,
                     CHUNK)
            tl.atomic_xchg(count_ptr + bh, 0, sem="relaxed")  # zero again for the next call


@triton.jit
def _combine(acc_ptr, ml_ptr, out_ptr, so_h, bh, SPLITS, G: tl.constexpr, D: tl.constexpr, GP2: tl.constexpr,
             SPLITS_P2: tl.constexpr, CHUNK: tl.constexpr):
    """The output of key/value head `bh` from its `SPLITS` slices' partials: each slice's sum rescaled to the
    largest row maximum.  `CHUNK` slices' partials are loaded at once, as one [CHUNK, GP2, D] tile, so that the
    loads of a chunk wait on memory once, and the sum over its slices is one reduction.  Loads bypass L1
    (`.cg`), where an earlier call's partials may linger."""
    s = tl.arange(0, SPLITS_P2)
    r = tl.arange(0, GP2)
    d = tl.arange(0, D)
    real = r < G
    ml = ml_ptr + (bh * SPLITS + s)[:, None] * 2 * GP2 + r[None, :]
    kept = (s < SPLITS)[:, None] & real[None, :]
    m = tl.load(ml, mask=kept, other=NEG, cache_modifier=".cg")  # [S, GP2]
    total = tl.load(ml + GP2, mask=kept, other=0.0, cache_modifier=".cg")
    top = tl.max(m, axis=0)
    denom = tl.sum(tl.exp(m - top[None, :]) * total, axis=0)
    acc = tl.zeros([GP2, D], tl.float32)
    c = tl.arange(0, CHUNK)
    for start in range(0, SPLITS, CHUNK):
        base = bh * SPLITS + start + c
        ok = ((start + c) < SPLITS)[:, None] & real[None, :]  # [CHUNK, GP2]
        # the chunk's maxima loaded again from L2: picking rows out of `m` would be a reduction across threads
        w = tl.exp(tl.load(ml_ptr + base[:, None] * 2 * GP2 + r[None, :], mask=ok, other=NEG, cache_modifier=".cg")
                   - top[None, :])
        part = tl.load(acc_ptr + base[:, None, None] * GP2 * D + r[None, :, None] * D + d[None, None, :],
                       mask=ok[:, :, None], other=0.0, cache_modifier=".cg")
        acc += tl.sum(part * w[:, :, None], axis=0)
    tl.store(out_ptr + r[:, None] * so_h + d[None, :], (acc / denom[:, None]).to(out_ptr.dtype.element_ty),
             mask=real[:, None])


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, block_l: int = 64, splits: int | None = None) -> torch.Tensor:
    """`softmax(q kᵀ · scale, masked) v` for one query token: `query [B, H, 1, D]`, `key`/`value
    [B, KVH, L, D]` (H a multiple of KVH), `mask [B, 1, 1, L]` (bool, True where attended, or additive:
    0 where attended) or None.  Returns `[B, 1, H, D]`, transformers' layout after attention.
    `splits` (slices of the cache) is chosen from the SM count unless given (tests)."""
    B, H, _, D = query.shape
    KVH, L = key.shape[1], key.shape[2]
    G = H // KVH
    rows = max(16, triton.next_power_of_2(G))  # tl.dot's least tile side
    # enough slices to give every SM a program or two, none shorter than a block
    blocks = triton.cdiv(L, block_l)
    splits = max(1, min(blocks, splits or triton.cdiv(2 * _sm_count(query.device), B * KVH)))
    per_split = triton.cdiv(blocks, splits) * block_l
    splits = triton.cdiv(L, per_split)
    gp2 = triton.next_power_of_2(G)  # the partials' rows: the real ones, not the dot's padding
    acc = torch.empty(B * KVH, splits, gp2, D, device=query.device, dtype=torch.float32)
    ml = torch.empty(B * KVH, splits, 2, gp2, device=query.device, dtype=torch.float32)
    count = workspace(query.device, 0, B * KVH)[1]  # zero between calls, shared with the matmul kernels
    out = torch.empty(B, 1, H, D, device=query.device, dtype=query.dtype)
    if mask is not None:
        mask = (mask if mask.dtype == torch.bool else mask == 0).expand(B, 1, 1, L)
    q = query[:, :, 0]
    if key.stride() != value.stride():  # one load takes both, at one offset apart (transformers' caches are alike)
        key, value = key.contiguous(), value.contiguous()
    if key.dtype != value.dtype:
        raise ValueError(f"decode_attention needs key and value of one dtype, not {key.dtype} and {value.dtype}")
    if key.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("decode_attention needs the head dimension contiguous in query, key and value")
    v_off = (value.data_ptr() - key.data_ptr()) // key.element_size()
    m_args = (mask.stride(0), mask.stride(3)) if mask is not None else (0, 0)
    cfg = {} if INTERPRET else dict(num_warps=4, num_stages=2)
    if pdl(query.device):
        cfg.update(PDL=True, launch_pdl=True)  # nothing to prefetch: the query and the cache are the inputs
    _decode_kernel[(B * KVH, splits)](q, key, v_off, mask if mask is not None else q, acc, ml, count, out, L, KVH,
                                      per_split, scale, q.stride(0), q.stride(1), *key.stride()[:3], *m_args,
                                      out.stride(0), out.stride(2), G=G, D=D, ROWS=rows, BLOCK_L=block_l,
                                      HAS_MASK=mask is not None, DOT_FP32=INTERPRET,
                                      SPLITS_P2=triton.next_power_of_2(splits), GP2=gp2,
                                      CHUNK=combine_chunk(splits, gp2, D), **cfg)
    return out


def combine_chunk(splits: int, gp2: int, D: int) -> int:
    """How many slices' partials `_combine` loads at once: a tile of at most 4,096 floats (32 registers a
    thread at 4 warps), and no more slices than there are."""
    return max(1, min(triton.next_power_of_2(splits), 4096 // (gp2 * D)))


@torch.library.custom_op("bitplan::decode_attention", mutates_args=())
def decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """`decode_attention` as one opaque operator, for `torch.compile` (as `matmul.quant_matmul`)."""
    return decode_attention(query, key, value, mask, scale)


@decode_attention_op.register_fake
def _decode_attention_shape(query, key, value, mask, scale):
    B, H, _, D = query.shape
    return query.new_empty(B, 1, H, D)


def reference_attention(query, key, value, mask, scale) -> torch.Tensor:
    """The same in float32 torch ops (the kernel's spec): `[B, 1, H, D]`."""
    G = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(G, dim=1)
    v = value.float().repeat_interleave(G, dim=1)
    s = query.float() @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~(mask if mask.dtype == torch.bool else mask == 0), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)
