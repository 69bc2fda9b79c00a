"""GPU timing as the benchmarks and the latency profiler need it: weights cold in L2, no launch gaps.

`cold_time_us(calls)` runs closures over distinct copies of the weights, so many (`copies_for`: more
than 4x the L2 cache in bytes) that no call finds its weights cached, inside one CUDA graph, so that
the host's launch overhead between calls is not timed (what a serving engine's decode graph sees);
the median over graph replays, per call.  `floor_us` is the least time any kernel that reads those
weight bytes can take: a read-only Triton kernel streaming the same number of bytes, timed the same way.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from bitplan.kernels import reference


def cold_time_us(calls: list[Callable[[], object]], replays: int = 10) -> float:
    """Median microseconds per call of `calls` (closures over distinct weight copies), run in a CUDA graph."""
    for c in calls:  # compile, tune and allocate outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def l2_bytes(device=None) -> int:
    return torch.cuda.get_device_properties(device or torch.cuda.current_device()).L2_cache_size


def copies_for(nbytes: int, l2: int | None = None) -> int:
    """Copies of `nbytes` of weights that together exceed 4x the L2 cache."""
    return max(2, -(-4 * (l2 or l2_bytes()) // max(nbytes, 1)))


@triton.jit
def _stream_kernel(ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Reads `n` int32 words and writes one sum per program: the least work that touches every byte."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + tl.program_id(0), tl.sum(tl.load(ptr + offs, mask=offs < n, other=0), axis=0))


def stream(buf: torch.Tensor, out: torch.Tensor) -> None:
    block = 4096
    _stream_kernel[(triton.cdiv(buf.numel(), block),)](buf, out, buf.numel(), BLOCK=block, num_warps=8)


def floor_us(nbytes: int) -> float:
    """Cold-L2 time of streaming `nbytes` once with the read-only kernel: the floor for a weight-only kernel."""
    words = -(-nbytes // 4)
    n = copies_for(nbytes)
    flat = [torch.empty(words, dtype=torch.int32, device="cuda") for _ in range(n)]
    sink = torch.empty(triton.cdiv(words, 4096), dtype=torch.int32, device="cuda")
    return cold_time_us([lambda b=b: stream(b, sink) for b in flat])


def random_packed(n: int, k: int, bits: int, group: int, symmetric: bool = False, device: str = "cuda"):
    """Random codes of a weight `[n, k]` packed as `QuantLinear` holds them, for timing (the kernels do not
    look at values): `(code shards, scales [G, n] fp16, zero shards or None)`."""
    G = -(-k // group)
    packed = [t.to(device) for t in reference.pack(torch.randint(0, 2**bits, (k, n)), bits)]
    zeros = None if symmetric else [t.to(device) for t in reference.pack(torch.randint(0, 2**bits, (G, n)), bits)]
    return packed, (torch.rand(G, n) * 0.01 + 0.001).half().to(device), zeros


def clone_packed(weight):
    """A copy of `random_packed`'s triple in fresh memory: one more weight to rotate through L2."""
    packed, scales, zeros = weight
    return [t.clone() for t in packed], scales.clone(), None if zeros is None else [z.clone() for z in zeros]


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)
