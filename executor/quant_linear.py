"""`QuantLinear`: an `nn.Linear` stand-in that holds packed codes and dequantizes on the fly."""

from __future__ import annotations

import torch
from torch import nn

from bitplan.db.types import Option
from bitplan.executor.quantize import QuantizedWeight
from bitplan.kernels import reference


class QuantLinear(nn.Module):
    """Packed `b`-bit weight (layout in `kernels/reference.py`), fp16 scales, packed integer zeros.

    Buffers: `qweight_s{i}: [K_pad * w_i / 32, N]` per shard, `scales: [G, N]`, `qzeros_s{i}:
    [G_pad * w_i / 32, N]` (asymmetric only), `bias: [N]` if the linear had one.
    """

    def __init__(self, in_features: int, out_features: int, option: Option, bias: bool = False,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.option = in_features, out_features, option
        self.group_size = option.group_size or in_features
        K, N = in_features, out_features
        G = option.n_groups(in_features)
        kw = dict(dtype=torch.int32, device=device)
        self.n_shards = len(reference.shards(option.bits))
        for i, w in enumerate(reference.shards(option.bits)):
            self.register_buffer(f"qweight_s{i}", torch.zeros(reference.padded(K) * w // 32, N, **kw))
            if not option.symmetric:
                self.register_buffer(f"qzeros_s{i}", torch.zeros(reference.padded(G) * w // 32, N, **kw))
        self.register_buffer("scales", torch.zeros(G, N, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(N, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        N, K = qw.q.shape
        layer = cls(K, N, qw.option, bias=bias is not None, dtype=bias.dtype if bias is not None else torch.float32)
        for i, t in enumerate(reference.pack(qw.q.T, qw.option.bits)):
            getattr(layer, f"qweight_s{i}").copy_(t)
        if qw.zeros is not None:
            for i, t in enumerate(reference.pack(qw.zeros.T, qw.option.bits)):
                getattr(layer, f"qzeros_s{i}").copy_(t)
        layer.scales.copy_(qw.scales.T)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def _packed(self, prefix: str) -> list[torch.Tensor]:
        return [getattr(self, f"{prefix}_s{i}") for i in range(self.n_shards)]

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`[N, K]`, as `nn.Linear.weight`."""
        zeros = None
        if not self.option.symmetric:
            zeros = reference.unpack(self._packed("qzeros"), self.option.bits, self.scales.shape[0])
        return reference.dequantize(self._packed("qweight"), self.scales, zeros, self.option.bits,
                                    self.group_size, self.in_features, dtype=dtype).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # fused Triton kernel; the CPU path is the reference (the kernel's spec)
            from bitplan.kernels.matmul import matmul
            y = matmul(x, self._packed("qweight"), self.scales,
                       None if self.option.symmetric else self._packed("qzeros"),
                       self.option.bits, self.group_size, self.in_features)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, option={self.option.label}"
