"""Quantizers: what `apply` writes and what the profiler measures ΔW with (one implementation, shared).

Round-to-nearest (RTN), groupwise along the input dimension.  A group size that does not divide
`in_features` leaves a shorter last group (SmolLM2: 576 = 4.5 x 128); its range is computed over the
real columns only.  Scales are rounded to fp16 *before* codes are chosen, so the codes, the error the
profiler predicts and the checkpoint `apply` writes all agree with what is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitplan.db.types import Option

# Smallest scale we store: a constant group (range 0) still needs a finite, fp16-representable scale.
MIN_SCALE = 2.0**-20


@dataclass
class QuantizedWeight:
    """Codes of `W: [N, K]` with groupwise fp16 scales and integer zeros, `[N, G]` each."""

    q: torch.Tensor  # [N, K] int32 codes in [0, 2**bits)
    scales: torch.Tensor  # [N, G] fp16
    zeros: torch.Tensor | None  # [N, G] int32 codes; None when symmetric (zero = 2**(bits-1))
    option: Option

    @property
    def group_size(self) -> int:
        return self.option.group_size or self.q.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = torch.arange(self.q.shape[1]) // self.group_size
        z = 2 ** (self.option.bits - 1) if self.zeros is None else self.zeros[:, g].float()
        return ((self.q.float() - z) * self.scales[:, g].float()).to(dtype)


def _grouped(W: torch.Tensor, group_size: int, fill: float) -> torch.Tensor:
    """`[N, K]` -> `[N, G, group_size]`, padding the last group with `fill`."""
    N, K = W.shape
    G = -(-K // group_size)
    return torch.nn.functional.pad(W, (0, G * group_size - K), value=fill).view(N, G, group_size)


def rtn(W: torch.Tensor, option: Option) -> QuantizedWeight:
    """Round-to-nearest groupwise quantization of `W: [N, K]`."""
    if not option.quantized:
        raise ValueError("a 16-bit option is stored as is, not quantized")
    W = W.detach().float()
    N, K = W.shape
    gs = option.group_size or K
    qmax = 2**option.bits - 1
    if option.symmetric:
        amax = _grouped(W.abs(), gs, 0.0).amax(dim=2)
        scale = (2 * amax / qmax).half().float().clamp(min=MIN_SCALE)
        zero = None
        z = torch.full_like(scale, 2 ** (option.bits - 1))
    else:
        # the integer zero lies in [0, qmax], so the grid always contains 0: widen the range to include it
        lo = _grouped(W, gs, float("inf")).amin(dim=2).clamp(max=0)
        hi = _grouped(W, gs, float("-inf")).amax(dim=2).clamp(min=0)
        scale = ((hi - lo) / qmax).half().float().clamp(min=MIN_SCALE)
        z = torch.round(-lo / scale).clamp(0, qmax)
        zero = z.to(torch.int32)
    g = torch.arange(K) // gs
    q = torch.clamp(torch.round(W / scale[:, g]) + z[:, g], 0, qmax).to(torch.int32)
    return QuantizedWeight(q=q, scales=scale.half(), zeros=zero, option=option)


def quantize_dequantize(W: torch.Tensor, option: Option) -> torch.Tensor:
    """What the weight becomes after storage with `option` (identity for 16 bits), in `W`'s dtype."""
    if not option.quantized:
        return W.detach().to(torch.bfloat16).to(W.dtype)
    return rtn(W, option).dequantize(W.dtype)
