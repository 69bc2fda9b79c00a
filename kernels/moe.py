"""Mixed-width MoE: every active expert of one projection in **one** launch, each at its own bit width.

A DeepSeek-sized expert (2048 x 7168) streams in about 15 µs at 4 bits, the same order as a launch, so
launching once per expert (or once per bit width) pays the fixed cost again and again.  Here one grid
covers all (segment, N tile, K slice) programs; a segment is the run of token rows routed to one
expert (rows sorted by expert beforehand).  Each program reads its expert's entry of a small table:
shard widths and offsets into flat buffers that hold every expert's packed codes, scales and zeros
back to back, and branches once on the width to the dense gemv body (`matmul._gemv_tile`) compiled for
that width.  The branch is uniform across the program, so no lane waits on another width's code.

The packed layout is `kernels/reference.py`'s, per expert; all experts of a projection share N, K,
group size and symmetry (they do in every MoE model: the plan varies bits, not shapes).

This is the decode kernel (few rows per expert: each program walks its segment `BLOCK_M` rows at a
time, re-reading its weight tile from L2 per step).  For prefill, where an expert sees many rows,
`moe_matmul` launches the dense tiled kernel per expert instead (`GEMV_MAX_ROWS`), where the launch
cost is small next to the matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from bitplan.kernels import reference
from bitplan.kernels.matmul import (HALF2_ENABLED, INTERPRET, _fastest, _gemv_tile, _sm_count, _split, _store,
                                    _tiles_fitting, gemv_group, matmul, workspace)
from bitplan.kernels.tuned import tuned

GEMV_MAX_ROWS = 16  # rows per expert up to which one mixed-width launch beats per-expert tiled launches
ALIGN = 16  # words: offsets into the flat buffers are multiples of this (the kernel is told so)


@dataclass
class ExpertWeights:
    """One projection of a layer's experts, packed for one launch.

    `q0`/`q1`: flat int32, each expert's shard 0 (shard 1: 3-bit experts only) `[rows, N]` back to back;
    `scales: [E, G, N]`; `z0`/`z1`: flat packed zeros (None when symmetric); `table: [E, 6]` int64.
    """

    q0: torch.Tensor
    q1: torch.Tensor
    scales: torch.Tensor
    z0: torch.Tensor | None
    z1: torch.Tensor | None
    table: torch.Tensor
    rows: list[list[int]]  # the table, on the host
    bits: list[int]
    n: int
    k: int
    group_size: int

    @classmethod
    def pack(cls, experts: list[tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor] | None, int]],
             k: int, group_size: int) -> "ExpertWeights":
        """`experts[e] = (packed shards, scales [G, N], packed zero shards or None, bits)`, as QuantLinear holds."""
        if not experts:
            raise ValueError("no experts to pack")
        shapes = {tuple(s.shape) for _, s, _, _ in experts}
        symmetric = {z is None for _, _, z, _ in experts}
        if len(shapes) != 1 or len(symmetric) != 1:
            raise ValueError(f"experts of one launch must share scales shape and symmetry; got {shapes}, "
                             f"symmetric {symmetric}")
        q0, q1, z0, z1, rows = [], [], [], [], []
        off = [0, 0, 0, 0]
        for packed, _, zeros, bits in experts:
            widths = reference.shards(bits)
            if len(widths) > 2:
                raise ValueError(f"{bits} bits has {len(widths)} shards; the MoE kernel takes at most 2")
            # W0, W1, then offsets of shard 0 codes, shard 1 codes, shard 0 zeros, shard 1 zeros
            rows.append([widths[0], widths[1] if len(widths) > 1 else 0, *off])
            for i, (buf, t) in enumerate(((q0, packed[0]), (q1, packed[1] if len(widths) > 1 else None),
                                          (z0, zeros[0] if zeros else None),
                                          (z1, zeros[1] if zeros and len(widths) > 1 else None))):
                if t is not None:
                    # every part starts on a 64-byte boundary, so that the kernel may load it in 16-byte vectors
                    pad = -t.numel() % ALIGN
                    buf.append(torch.nn.functional.pad(t.reshape(-1), (0, pad)))
                    off[i] += t.numel() + pad
        dev = experts[0][1].device

        def flat(parts):
            return torch.cat(parts) if parts else torch.zeros(1, dtype=torch.int32, device=dev)

        return cls(q0=flat(q0), q1=flat(q1), scales=torch.stack([s for _, s, _, _ in experts]).contiguous(),
                   z0=flat(z0) if z0 else None, z1=flat(z1) if z0 else None,
                   table=torch.tensor(rows, dtype=torch.int64, device=dev), rows=rows, bits=[b for *_, b in experts],
                   n=experts[0][1].shape[1], k=k, group_size=group_size)

    @property
    def symmetric(self) -> bool:
        return self.z0 is None

    def expert(self, e: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Expert `e`'s packed shards and zero shards as views into the flat buffers (no device sync)."""
        w0, w1, o0, o1, oz0, oz1 = self.rows[e]
        kp, gp = reference.padded(self.k), reference.padded(self.scales.shape[1])
        q = [self.q0[o0:o0 + kp * w0 // 32 * self.n].view(-1, self.n)]
        z = None if self.symmetric else [self.z0[oz0:oz0 + gp * w0 // 32 * self.n].view(-1, self.n)]
        if w1:
            q.append(self.q1[o1:o1 + kp * w1 // 32 * self.n].view(-1, self.n))
            if z is not None:
                z.append(self.z1[oz1:oz1 + gp * w1 // 32 * self.n].view(-1, self.n))
        return q, z

    def to(self, device) -> "ExpertWeights":
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return ExpertWeights(move(self.q0), move(self.q1), move(self.scales), move(self.z0), move(self.z1),
                             move(self.table), self.rows, self.bits, self.n, self.k, self.group_size)


@triton.jit
def _moe_gemv_kernel(
    x_ptr, q0_ptr, q1_ptr, s_ptr, z0_ptr, z1_ptr, y_ptr, ws_ptr, count_ptr, table_ptr, seg_expert_ptr, seg_start_ptr,
    N, K, G, SPLIT_K, STEPS, stride_xm, stride_ym,
    GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
    EVEN_K: tl.constexpr, HALF2: tl.constexpr,
):
    pid_n, pid_k, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e = tl.load(seg_expert_ptr + seg)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    row = table_ptr + e * 6
    w0, w1 = tl.load(row), tl.load(row + 1)
    # offsets loaded at run time: without the alignment promise the compiler must assume any address
    # and load word by word instead of in 16-byte vectors
    q0 = q0_ptr + tl.multiple_of(tl.load(row + 2), 16)
    q1 = q1_ptr + tl.multiple_of(tl.load(row + 3), 16)
    z0 = z0_ptr + tl.multiple_of(tl.load(row + 4), 16)
    z1 = z1_ptr + tl.multiple_of(tl.load(row + 5), 16)
    s = s_ptr + e * G * N
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, None, :]
    rn2 = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    n_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_tiles, SPLIT_K)
    t_lo = pid_k * per_split
    t_hi = tl.minimum(t_lo + per_split, n_tiles)
    for step in range(0, tl.cdiv(end - start, BLOCK_M)):
        m0 = start + step * BLOCK_M
        rm = tl.minimum(m0 + tl.arange(0, BLOCK_M), end - 1)[:, None, None]
        rm2 = (m0 + tl.arange(0, BLOCK_M))[:, None]
        mask_out = (rm2 < end) & (rn2 < N)
        tile = (seg * STEPS + step) * tl.num_programs(0) + pid_n
        # one branch per width, uniform over the program: each compiles the dense body for its width
        if w0 == 4:
            y = _gemv_tile(x_ptr, q0, q1, s, z0, z1, rm, rn, rn < N, K, t_lo, t_hi, stride_xm, N, N, N, N, N,
                           GROUP, 4, 0, SYMMETRIC, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, HALF2)
            _store(y_ptr, ws_ptr, count_ptr, tile, y, rm2, rn2, mask_out, stride_ym, N, SPLIT_K, ATOMIC)
        elif w0 == 8:
            y = _gemv_tile(x_ptr, q0, q1, s, z0, z1, rm, rn, rn < N, K, t_lo, t_hi, stride_xm, N, N, N, N, N,
                           GROUP, 8, 0, SYMMETRIC, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, HALF2)
            _store(y_ptr, ws_ptr, count_ptr, tile, y, rm2, rn2, mask_out, stride_ym, N, SPLIT_K, ATOMIC)
        elif w1 == 1:
            y = _gemv_tile(x_ptr, q0, q1, s, z0, z1, rm, rn, rn < N, K, t_lo, t_hi, stride_xm, N, N, N, N, N,
                           GROUP, 2, 1, SYMMETRIC, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, HALF2)
            _store(y_ptr, ws_ptr, count_ptr, tile, y, rm2, rn2, mask_out, stride_ym, N, SPLIT_K, ATOMIC)
        else:
            y = _gemv_tile(x_ptr, q0, q1, s, z0, z1, rm, rn, rn < N, K, t_lo, t_hi, stride_xm, N, N, N, N, N,
                           GROUP, 2, 0, SYMMETRIC, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, HALF2)
            _store(y_ptr, ws_ptr, count_ptr, tile, y, rm2, rn2, mask_out, stride_ym, N, SPLIT_K, ATOMIC)


SUPPORTED_BITS = (2, 3, 4, 8)


def moe_configs(n_segments: int, N: int, K: int, group: int, sms: int, max_rows: int = 4) -> list[dict]:
    # rows a program holds at once: a decode step's experts see one row each, and a 4-row accumulator
    # would spend three quarters of its FMAs on padding (the first measurement did, bench/moe_kernels.py)
    block_m = min(triton.next_power_of_2(max(max_rows, 1)), 4)
    out = []
    # one tile shape serves every width: its accumulators counted at 8 bits (4 codes a word, the most rows)
    for block_n, warps in _tiles_fitting(block_m * 8):
        for block_k in (32, 64):
            if group % block_k:
                continue
            for per_sm in (4, 8):
                split = _split(-(-K // block_k), n_segments * -(-N // block_n), sms, per_sm)
                for half2 in (True, False) if HALF2_ENABLED else (False,):  # kernels/matmul.py's two bodies
                    out.append(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
                                    num_warps=warps, num_stages=1, HALF2=half2))
    return out


_TUNED: dict[tuple, dict] = {}


def _launch(x, w: ExpertWeights, seg_expert, seg_start, max_rows: int, cfg) -> torch.Tensor:
    T, S = x.shape[0], seg_expert.numel()
    cfg = dict(cfg)
    split = cfg.pop("SPLIT_K")
    half2 = cfg.pop("HALF2", HALF2_ENABLED) and x.dtype != torch.float32
    y = torch.empty(T, w.n, device=x.device, dtype=x.dtype)
    z0 = w.z0 if w.z0 is not None else w.q0
    z1 = w.z1 if w.z1 is not None else w.q0
    grid = (triton.cdiv(w.n, cfg["BLOCK_N"]), split, S)
    steps = max(1, -(-max_rows // cfg["BLOCK_M"]))  # row blocks of the longest segment: its tiles' counters
    ws, count = workspace(x.device, T * w.n, S * steps * grid[0]) if split > 1 else (y, y)
    _moe_gemv_kernel[grid](x, w.q0, w.q1, w.scales, z0, z1, y, ws, count, w.table, seg_expert, seg_start,
                           w.n, w.k, w.scales.shape[1], split, steps, x.stride(0), y.stride(0),
                           GROUP=gemv_group(w.group_size, w.k), SYMMETRIC=w.symmetric, ATOMIC=split > 1,
                           EVEN_K=w.k % cfg["BLOCK_K"] == 0, HALF2=half2, **cfg)
    return y


def moe_matmul(x: torch.Tensor, w: ExpertWeights, seg_expert: torch.Tensor, seg_start: torch.Tensor,
               *, max_rows: int | None = None, config: dict | None = None) -> torch.Tensor:
    """`y[r] = x[r] @ W_e.T` for rows `r` of segment `s`, `e = seg_expert[s]`, rows `seg_start[s]:seg_start[s+1]`.

    `x: [T, K]` rows sorted by expert; `seg_expert: [S]`, `seg_start: [S + 1]` int on x's device.  One
    launch for all segments whatever their widths, when no segment has more than `GEMV_MAX_ROWS` rows;
    otherwise the dense kernel per expert.  With `max_rows` (a bound the caller knows, such as the token
    count) nothing is read back to the host, so the launch can be captured in a CUDA graph.  Rows outside
    every segment are left unwritten.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    if any(b not in SUPPORTED_BITS for b in w.bits):
        raise ValueError(f"the MoE kernel runs {SUPPORTED_BITS} bits; got {sorted(set(w.bits))}")
    if max_rows is None:
        max_rows = int((seg_start[1:] - seg_start[:-1]).max()) if seg_expert.numel() else 0
    if max_rows > GEMV_MAX_ROWS or not gemv_group(w.group_size, w.k):
        return _per_expert(x, w, seg_expert, seg_start)
    # segments that can hold rows: every non-empty one holds at least one row of x (`route` gives no
    # more segments than rows, a caller may give more).  The split is sized (and tuned) for those: the
    # programs of the empty ones exit at once, and sized for all of them the few busy segments would
    # get too few programs to fill the GPU
    active = min(seg_expert.numel(), x.shape[0])
    group = gemv_group(w.group_size, w.k)
    if config is not None:
        cfg = dict(moe_configs(active, w.n, w.k, group, _sm_count(x.device), max_rows)[0], **config)
    else:
        key = (active, min(max_rows, 4), w.n, w.k, w.group_size, w.symmetric, x.dtype,
               tuple(sorted(set(w.bits))), x.device.index)  # two GPUs of a process may differ

        def tune() -> dict:
            found = moe_configs(active, w.n, w.k, group, _sm_count(x.device), max_rows)
            return found[0] if INTERPRET or not x.is_cuda else \
                _fastest(found, lambda c: _launch(x, w, seg_expert, seg_start, max_rows, c))

        cfg = tuned(_TUNED, "moe", key, x.device, tune)
    if INTERPRET:
        cfg = {k: v for k, v in cfg.items() if k != "num_stages"}
    return _launch(x, w, seg_expert, seg_start, max_rows, cfg)


def _per_expert(x, w: ExpertWeights, seg_expert, seg_start) -> torch.Tensor:
    y = torch.empty(x.shape[0], w.n, device=x.device, dtype=x.dtype)
    for e, a, b in zip(seg_expert.tolist(), seg_start[:-1].tolist(), seg_start[1:].tolist()):
        if b > a:
            q, z = w.expert(e)
            y[a:b] = matmul(x[a:b], q, w.scales[e], z, w.bits[e], w.group_size, w.k)
    return y


def route(top_k_index: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-slot pairs sorted by expert: `(order, seg_expert, seg_start)`.

    `order[r]` is the flat (token * top_k + slot) index of sorted row `r`.  There are `min(E, slots)`
    segments, the experts that got rows first (in increasing order, as their rows lie), then idle ones,
    with `seg_start: [segments + 1]`.  Every shape follows from the input's and `n_experts` alone, and
    nothing is read back to the host, so a decode step that routes can be captured in a CUDA graph; and
    no more segments are launched than the slots can fill, so a model of 256 experts launches 8 at batch 1.
    An idle expert's segment is empty, and its programs read no weights (`_moe_gemv_kernel`'s row loop
    runs zero times).  Slots whose index is `n_experts` or more (masked out, as in expert parallelism)
    sort after every segment: rows from `seg_start[-1]` on belong to none, the kernel leaves them
    unwritten, and the caller must drop them.  Leaving them out, rather than clamping them into the last
    expert with a zero weight, keeps each expert at no more rows than tokens, the bound `moe_matmul`'s
    `max_rows` promises.
    """
    flat = top_k_index.reshape(-1)
    experts, order = torch.sort(flat, stable=True)
    bounds = torch.arange(n_experts + 1, device=flat.device, dtype=experts.dtype)
    # each expert's first row in the sorted list; bincount would read its output size back from the device
    counts = torch.diff(torch.searchsorted(experts, bounds))
    busy_first = torch.sort((counts == 0).to(torch.int8), stable=True).indices[:min(n_experts, flat.numel())]
    seg_start = torch.zeros(busy_first.numel() + 1, dtype=torch.int64, device=flat.device)
    seg_start[1:] = torch.cumsum(counts[busy_first], 0)
    return order, busy_first.to(torch.int64), seg_start
