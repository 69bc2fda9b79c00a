"""`QuantLinear`: an `nn.Linear` stand-in that holds packed codes and dequantizes on the fly."""

from __future__ import annotations

import torch
from torch import nn

from bitplan.db.types import Option
from bitplan.kernels.quantize import QuantizedWeight
from bitplan.kernels import reference
from bitplan.profiler.moe import ExpertLinears


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
        layer.load_codes(qw)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def load_codes(self, qw: QuantizedWeight) -> None:
        """Pack `qw`'s codes, scales and zeros into this layer's buffers (shapes as `__init__` made them)."""
        for i, t in enumerate(reference.pack(qw.q.T, qw.option.bits)):
            getattr(self, f"qweight_s{i}").copy_(t)
        if qw.zeros is not None:
            for i, t in enumerate(reference.pack(qw.zeros.T, qw.option.bits)):
                getattr(self, f"qzeros_s{i}").copy_(t)
        self.scales.copy_(qw.scales.T)

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
            from bitplan.kernels.matmul import quant_matmul
            y = quant_matmul(x, self._packed("qweight"), self.scales,
                             [] if self.option.symmetric else self._packed("qzeros"),
                             self.option.bits, self.group_size, self.in_features)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, option={self.option.label}"


class QuantEmbedding(QuantLinear):
    """`nn.Embedding` over QuantLinear's packed buffers: the table `[V, d]` is stored as the weight of a
    `d -> V` linear (`out_features` = vocabulary), so its groups run along the hidden dimension, inside
    one row, and a lookup gathers the rows' code words, scales and zeros and dequantizes only those
    (`kernels/reference.py`, on any device: no fused kernel for it).  `linear(x)` is the same weight
    as a head, `x @ Wᵀ`, for a tied pair (`QuantTiedHead`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, option: Option, padding_idx: int | None = None,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__(embedding_dim, num_embeddings, option, bias=False, device=device, dtype=dtype)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        # token ids carry no dtype: the rows come out in this one's, which follows `.to(dtype)` as a weight would
        self.register_buffer("dtype_of_rows", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, dtype: torch.dtype = torch.float32,
                       padding_idx: int | None = None) -> "QuantEmbedding":
        V, d = qw.q.shape
        emb = cls(V, d, qw.option, padding_idx=padding_idx, dtype=dtype)
        emb.load_codes(qw)
        return emb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        zeros = None
        if not self.option.symmetric:
            zeros = reference.unpack([t[:, flat] for t in self._packed("qzeros")], self.option.bits,
                                     self.scales.shape[0])
        rows = reference.dequantize([t[:, flat] for t in self._packed("qweight")], self.scales[:, flat], zeros,
                                    self.option.bits, self.group_size, self.in_features,
                                    dtype=self.dtype_of_rows.dtype)
        return rows.T.reshape(*ids.shape, self.embedding_dim)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return QuantLinear.forward(self, x)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, option={self.option.label}"


class QuantTiedHead(nn.Module):
    """The head of a tied pair: the `QuantEmbedding`'s packed weight used as a linear.

    It holds the embedding by reference, not as a submodule, so the weight is stored, loaded and moved
    once, with the embedding (as a tied nn.Linear's weight is the embedding's Parameter).
    """

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not registered: see the class docstring
        self.in_features, self.out_features = embedding.in_features, embedding.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding.linear(x)

    def extra_repr(self) -> str:
        return f"tied to the quantized embedding ({self.embedding.option.label})"


class QuantExpertLinears(ExpertLinears):
    """Routed experts whose linears are all `QuantLinear`s.  On CUDA each projection of every active
    expert runs as one launch whatever the experts' widths (`kernels/moe.py`); on the CPU, and while
    routing is recorded, the per-expert loop of `ExpertLinears`.

    The first CUDA call packs each projection's experts into flat buffers and re-points the experts'
    buffers at views of them, so the weights are held once.
    """

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    # a compiled step calls this as it is, between compiled pieces: its packing (data pointers, a cache on
    # the module) and the per-expert loop are not for tracing, and its launches gain nothing from it
    @torch.compiler.disable
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if not hidden_states.is_cuda or self.record is not None or self._packs() is None:
            return super().forward(hidden_states, top_k_index, top_k_weights)
        return self.fused(hidden_states, top_k_index, top_k_weights)

    def fused(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
              top_k_weights: torch.Tensor) -> torch.Tensor:
        """The one-launch-per-projection path (on the CPU only under `TRITON_INTERPRET=1`, for tests).

        Shapes follow from the token count alone and nothing is read back to the host (`route`), so a
        decode step through it can be captured in a CUDA graph.
        """
        from bitplan.kernels.moe import moe_matmul, route

        packs = self._packs()

        order, seg_expert, seg_start = route(top_k_index, len(self))
        token = order // top_k_index.shape[1]
        x = hidden_states[token]
        rows = hidden_states.shape[0]  # an expert sees each token at most once
        gate, up, down = (packs[p] for p in self.PROJECTIONS)
        h = self[0].act_fn(moe_matmul(x, gate, seg_expert, seg_start, max_rows=rows)) \
            * moe_matmul(x, up, seg_expert, seg_start, max_rows=rows)
        out = moe_matmul(h, down, seg_expert, seg_start, max_rows=rows) * top_k_weights.reshape(-1)[order, None]
        # masked-out slots' rows lie past the last segment, unwritten: whatever they hold (NaN times a zero
        # weight is NaN) must not reach the sum
        kept = torch.arange(out.shape[0], device=out.device) < seg_start[-1]
        out = torch.where(kept[:, None], out, 0)
        return torch.zeros_like(hidden_states).index_add_(0, token, out.to(hidden_states.dtype))

    def _apply(self, fn, recurse=True):
        # the packs are no buffers of this module: moved or cast, the experts' buffers stop being views of
        # them, and kept they would hold every expert's weights a second time where the module was
        self._packed_experts = None
        return super()._apply(fn, recurse)

    def _packs(self):
        from bitplan.kernels.moe import SUPPORTED_BITS, ExpertWeights

        first = self[0].gate_proj.qweight_s0
        cached = getattr(self, "_packed_experts", None)
        if cached is not None and cached[0] == first.data_ptr():
            return cached[1]
        linears = {p: [getattr(e, p) for e in self] for p in self.PROJECTIONS}
        if any(lin.option.bits not in SUPPORTED_BITS or lin.option.symmetric != ls[0].option.symmetric
               or lin.group_size != ls[0].group_size for ls in linears.values() for lin in ls):
            self._packed_experts = (first.data_ptr(), None)
            return None
        packs = {}
        for p, ls in linears.items():
            w = ExpertWeights.pack([(lin._packed("qweight"), lin.scales,
                                     None if lin.option.symmetric else lin._packed("qzeros"), lin.option.bits)
                                    for lin in ls], ls[0].in_features, ls[0].group_size)
            for e, lin in enumerate(ls):  # the experts' buffers become views of the packed ones
                q, z = w.expert(e)
                for i, t in enumerate(q):
                    setattr(lin, f"qweight_s{i}", t)
                for i, t in enumerate(z or []):
                    setattr(lin, f"qzeros_s{i}", t)
                lin.scales = w.scales[e]
            packs[p] = w
        self._packed_experts = (self[0].gate_proj.qweight_s0.data_ptr(), packs)
        return packs


def fuse_quantized_experts(model: nn.Module) -> int:
    """Swap every `ExpertLinears` whose linears are all `QuantLinear`s for a `QuantExpertLinears`; returns how many."""
    n = 0
    for name, mod in list(model.named_modules()):
        if type(mod) is ExpertLinears and all(isinstance(getattr(e, p), QuantLinear)
                                              for e in mod for p in QuantExpertLinears.PROJECTIONS):
            model.set_submodule(name, QuantExpertLinears(list(mod)))
            n += 1
    return n
