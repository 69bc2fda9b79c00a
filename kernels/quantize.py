"""Quantizers: what `apply` writes and what the profiler measures ΔW with (one implementation, shared).

Two quantizers share one storage grid: round-to-nearest (`rtn`) and GPTQ (`gptq`, which needs the
module's input statistics `H = Σ xxᵀ`).  A GGUF option (`Option.gguf`) is llama.cpp's to store: its ΔW
is ggml's own quantization (`kernels/llamacpp.py`), and `apply` writes it through `llama-quantize`.  Both are groupwise along the input dimension.  A group
size that does not divide `in_features` leaves a shorter last group (SmolLM2: 576 = 4.5 x 128);
its range is computed over the real columns only.  Scales are rounded to fp16 *before* codes are
chosen, so the codes, the error the profiler predicts and the checkpoint `apply` writes all agree
with what is stored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from bitplan.db.formats import stored_gguf_type
from bitplan.db.types import EMBED_ROLE, Module, Option, Quantizer
from bitplan.kernels import llamacpp

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
        g = torch.arange(self.q.shape[1], device=self.q.device) // self.group_size
        z = 2 ** (self.option.bits - 1) if self.zeros is None else self.zeros[:, g].float()
        return ((self.q.float() - z) * self.scales[:, g].float()).to(dtype)


def _grouped(W: torch.Tensor, group_size: int, fill: float) -> torch.Tensor:
    """`[N, K]` -> `[N, G, group_size]`, padding the last group with `fill`."""
    N, K = W.shape
    G = -(-K // group_size)
    return torch.nn.functional.pad(W, (0, G * group_size - K), value=fill).view(N, G, group_size)


# The ranges `clip` tries, as fractions of the group's min-max range: 1 (the min and max) down to 0.5, where
# 98 % of SmolLM2's groups at 2 bits find their best and all at 3 and 4 bits (docs/recipes.md).
CLIP_SHRINK = tuple(1 - 0.025 * i for i in range(21))
# Rows of a matrix searched at once: temporaries of about 64 MiB per float32 tensor, whatever the matrix.
_CLIP_CHUNK = 1 << 24


def _grid(Wg: torch.Tensor, option: Option, clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (float) integer zero of groups `Wg: [N, G, n]`; NaN entries (padding) are ignored.

    The range is the group's min and max (for a symmetric option, ±its largest magnitude), or with `clip`
    that range shrunk by the fraction of CLIP_SHRINK that rounds the group with the least squared error:
    a few outliers then no longer stretch the grid over the many weights near zero, which matters the
    fewer the codes (GPTQ's reference code has the same search, as its `mse` option).  Scales are rounded
    to fp16 here, before any code is chosen.  Returns `[N, G]` each.
    """
    pad = Wg.isnan()
    if option.symmetric:
        hi = Wg.abs().masked_fill(pad, 0.0).amax(dim=2)
        lo = -hi
    else:  # the integer zero lies in [0, qmax], so the grid always contains 0: widen the range to include it
        lo = Wg.masked_fill(pad, float("inf")).amin(dim=2).clamp(max=0)
        hi = Wg.masked_fill(pad, float("-inf")).amax(dim=2).clamp(min=0)
    if not clip:
        return _scale_zero(lo, hi, option)
    scale, z = torch.empty_like(lo), torch.empty_like(lo)
    rows = max(1, _CLIP_CHUNK // (Wg.shape[1] * Wg.shape[2]))
    for r in range(0, Wg.shape[0], rows):
        w, keep = Wg[r:r + rows].masked_fill(pad[r:r + rows], 0.0), ~pad[r:r + rows]
        best = torch.full_like(lo[r:r + rows], float("inf"))
        for p in CLIP_SHRINK:
            s, zz = _scale_zero(lo[r:r + rows] * p, hi[r:r + rows] * p, option)
            q = _codes(w, s.unsqueeze(2), zz.unsqueeze(2), option.bits)
            err = (((q - zz.unsqueeze(2)) * s.unsqueeze(2) - w) ** 2 * keep).sum(dim=2)
            better = err < best  # ties keep the wider range
            best = torch.where(better, err, best)
            scale[r:r + rows] = torch.where(better, s, scale[r:r + rows])
            z[r:r + rows] = torch.where(better, zz, z[r:r + rows])
    return scale, z


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, option: Option) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16-rounded scale and the integer zero of the range `[lo, hi]` (`lo <= 0 <= hi`)."""
    qmax = 2**option.bits - 1
    if option.symmetric:
        scale = (2 * hi / qmax).half().float().clamp(min=MIN_SCALE)
        return scale, torch.full_like(scale, 2 ** (option.bits - 1))
    scale = ((hi - lo) / qmax).half().float().clamp(min=MIN_SCALE)
    return scale, torch.round(-lo / scale).clamp(0, qmax)


def _codes(w: torch.Tensor, scale: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """Float codes of `w` on the grid `(scale, z)` (all broadcastable), clamped to `[0, 2**bits - 1]`."""
    return torch.clamp(torch.round(w / scale) + z, 0, 2**bits - 1)


def rtn(W: torch.Tensor, option: Option, *, clip: bool = False) -> QuantizedWeight:
    """Round-to-nearest groupwise quantization of `W: [N, K]`; `clip`: search each group's range (`_grid`)."""
    if not option.quantized:
        raise ValueError("a 16-bit option is stored as is, not quantized")
    W = W.detach().float()
    N, K = W.shape
    gs = option.group_size or K
    scale, z = _grid(_grouped(W, gs, float("nan")), option, clip)  # padding is NaN: no group's range sees it
    g = torch.arange(K, device=W.device) // gs
    q = _codes(W, scale[:, g], z[:, g], option.bits).to(torch.int32)
    return QuantizedWeight(q=q, scales=scale.half(), zeros=None if option.symmetric else z.to(torch.int32),
                           option=option)


def gptq(W: torch.Tensor, H: torch.Tensor, option: Option, *, damp: float = 0.1, block_size: int = 128,
         act_order: bool = True, clip: bool = False) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022) of `W: [N, K]` given its inputs' `H = Σ xxᵀ: [K, K]`, on `rtn`'s grid.

    Quantizes one column at a time and spreads each column's error over the columns not yet quantized
    through the Cholesky factor of the damped inverse Hessian, with lazy updates in blocks of
    `block_size` columns; minimizes the layer-output error `tr(ΔW H ΔWᵀ)` (the scale of `H` does not
    matter).  What the caller must know:

    - The grid is `rtn`'s (fp16-rounded scale, integer zero, 0 on the grid, short last group), so the
      result is stored, packed and loaded exactly like RTN's.  Each group's scale and zero are computed,
      as GPTQ does, from the error-updated weights of the group's columns at the moment the quantizer
      reaches the group's first column.  With a diagonal `H` nothing spreads and the result is `rtn`'s.
    - `damp`: `damp · mean(diag H)` is added to the diagonal before inverting.  The defaults, act-order
      and damp 0.1 (GPTQ's paper: natural order, 0.01), were measured on SmolLM2 (3-bit g64 everywhere,
      8,192 held-out tokens): perplexity 120.5 at the paper's, 79.0 with act-order, 70.0 with damp 0.1
      as well (RTN: 111.7); a 3.5 bpw plan 65.5, 57.9, 56.2 (`bench/results/gptq_options_smollm2.json`).
    - Dead inputs (`H[i, i] == 0`, never non-zero in calibration) are handled as GPTQ does: their weights
      are set to 0 (exactly on the grid) and their diagonal to 1.
    - `act_order`: columns are visited by decreasing `diag(H)` and the codes un-permuted afterwards.
      Groups stay those of the ORIGINAL columns (`k // group_size`, what the packed format stores, no
      `g_idx`): a group's scale and zero are computed when the quantizer first reaches ANY of its
      columns, from the current (error-updated) values of all its columns, none of which is quantized
      yet at that moment (a lazy form of GPTQModel's "static groups").
    - `clip`: that scale and zero come from the range search of `_grid`, on those current values.
    """
    if not option.quantized:
        raise ValueError("a 16-bit option is stored as is, not quantized")
    W = W.detach().float().clone()  # [N, K]
    dev = W.device  # runs where W is (H is brought there): on a GPU, profiling a big model's options is minutes
    N, K = W.shape
    if H.shape != (K, K):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected [{K}, {K}] for W of shape {tuple(W.shape)}")
    # H as float32 values, whatever dtype it came in: the profile streams H in float64 and `apply` keeps it in
    # float32 (`collect_hessians`), and both must give the same codes (a GPTQCache hit equals a fresh apply)
    H = H.detach().to(dev, torch.float32).to(torch.float64)
    gs = option.group_size or K
    G = -(-K // gs)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(K, device=dev)
    W, H = W[:, perm], H[perm][:, perm]
    group = perm // gs  # [K] original group of each (permuted) column
    group_of = group.tolist()  # read per column on the host: no device sync per column

    H[range(K), range(K)] += damp * torch.mean(torch.diag(H))
    # Hinv: upper Cholesky factor of H⁻¹ (row i holds the update of column i on the columns after it)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()

    scale, z = torch.zeros(N, G, device=dev), torch.zeros(N, G, device=dev)
    ready = [False] * G
    Q = torch.zeros(N, K, device=dev)  # float codes, permuted order
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()  # [N, B], kept up to date with the block's own errors
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group_of[i1 + i]
            if not ready[g]:
                cols = torch.nonzero(group == g).flatten()  # permuted positions, all >= i1 + i
                current = _current(W, W1, Err1, Hinv, i1, i, cols)
                s, zz = _grid(current.unsqueeze(1), option, clip)
                scale[:, g], z[:, g], ready[g] = s[:, 0], zz[:, 0], True
            w, d = W1[:, i], Hinv1[i, i]
            q = _codes(w, scale[:, g], z[:, g], option.bits)
            Q[:, i1 + i] = q
            err1 = (w - (q - z[:, g]) * scale[:, g]) / d
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the lazy batch update

    q = torch.empty_like(Q)
    q[:, perm] = Q
    return QuantizedWeight(q=q.to(torch.int32), scales=scale.half(),
                           zeros=None if option.symmetric else z.to(torch.int32), option=option)


def _current(W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv: torch.Tensor, i1: int, i: int,
             cols: torch.Tensor) -> torch.Tensor:
    """Error-updated values `[N, len(cols)]` of not-yet-quantized permuted columns `cols` (all >= i1 + i).

    Inside the block they are in `W1`; after it, `W` still lacks the block's pending lazy update from
    the first `i` columns' errors, which is applied here to the requested columns only.
    """
    i2 = i1 + W1.shape[1]
    inside, after = cols[cols < i2], cols[cols >= i2]
    out = torch.empty(W.shape[0], len(cols), device=W.device)
    out[:, : len(inside)] = W1[:, inside - i1]
    out[:, len(inside):] = W[:, after] - Err1[:, :i] @ Hinv[i1:i1 + i, after]
    return out


def quantizer_for(module: Module, quantizer: Quantizer) -> Quantizer:
    """The quantizer a module really gets: the embedding RTN, or llama.cpp's like every module of a GGUF plan.

    A lookup's input is one-hot, so its `H` is diagonal (token counts) and GPTQ has no correlation
    between columns to spread an error over: it would be RTN at the cost of a pass.  A tied pair's
    head does have correlated inputs, but GPTQ on them would trade the rows' own error (what every
    lookup reads) for the head's; RTN keeps every row as close as the grid allows for both uses.
    """
    if module.role == EMBED_ROLE and quantizer.method == "gptq":
        return Quantizer(clip=quantizer.clip)
    return quantizer


class GPTQCache:
    """GPTQ's result for each (module, option, settings), kept so that one process runs GPTQ once per pair.

    A profile with a GPTQ quantizer quantizes every module at every option; `apply` then quantizes
    each plan's modules again, from the same `H`, and `compare --evaluate` every compared plan's.  On
    the embedded model that is 840 GPTQ runs for the profile and up to 210 more per plan (`bitplan
    demo`: 6 plans).  With one cache passed to all of them, the plans' GPTQ is a lookup.

    One cache belongs to one model and one calibration text (the `H` its results came from), keyed by
    module name: one per profile, whose id `claim` records (a second profile's use fails).  Codes are kept
    as uint8 on the CPU (a byte a weight and option: 0.4 GB for SmolLM2's 4 options); past `max_bytes`
    results are computed and not kept.
    `hessians` is where a caller that had to collect `H` for misses leaves it for the next caller.
    `inputs` says which activations the `H` came from: the unquantized model's (`original`), or those a
    quantized model feeds each block (`quantized`: one plan's cache, `profiler.profile.gptq_propagated`).
    """

    def __init__(self, max_bytes: int = 2 << 30, inputs: str = "original"):
        self.max_bytes, self.bytes, self.inputs = max_bytes, 0, inputs
        self._kept: dict[tuple, QuantizedWeight] = {}
        self.hessians: dict[str, torch.Tensor] | None = None
        self.profile_id: str | None = None

    def claim(self, profile_id: str) -> GPTQCache:
        if self.profile_id not in (None, profile_id):
            raise ValueError(f"this GPTQ cache holds results of profile {self.profile_id}, not {profile_id}")
        self.profile_id = profile_id
        return self

    def has(self, name: str, option: Option, quantizer: Quantizer) -> bool:
        return (name, option, quantizer) in self._kept

    def entries(self, names: Iterable[str]) -> GPTQCache:
        """A cache of these modules' results alone, without a byte limit (for a worker that quantizes
        them: its new results come back through `update`)."""
        names = set(names)
        sub = GPTQCache(max_bytes=1 << 62, inputs=self.inputs)
        for key, qw in self._kept.items():
            if key[0] in names:
                sub._keep(key, qw)
        return sub

    def update(self, other: GPTQCache) -> None:
        """Keep `other`'s results too, within this cache's byte limit."""
        for key, qw in other._kept.items():
            if key not in self._kept:
                self._keep(key, qw)

    def _keep(self, key: tuple, qw: QuantizedWeight) -> None:
        size = qw.q.numel() + 2 * qw.scales.numel() + (0 if qw.zeros is None else qw.zeros.numel())
        if self.bytes + size <= self.max_bytes:
            self._kept[key] = QuantizedWeight(q=qw.q.to("cpu", torch.uint8), scales=qw.scales.cpu(),
                                              zeros=None if qw.zeros is None else qw.zeros.to("cpu", torch.uint8),
                                              option=qw.option)
            self.bytes += size

    def gptq(self, name: str, W: torch.Tensor, H: torch.Tensor | None, option: Option,
             quantizer: Quantizer) -> QuantizedWeight:
        key = (name, option, quantizer)
        kept = self._kept.get(key)
        if kept is not None:
            return QuantizedWeight(q=kept.q.to(W.device, torch.int32), scales=kept.scales.to(W.device),
                                   zeros=None if kept.zeros is None else kept.zeros.to(W.device, torch.int32),
                                   option=option)
        if H is None:
            raise ValueError(f"the gptq quantizer needs the input statistics H of {name}")
        qw = gptq(W, H, option, **quantizer.settings)
        self._keep(key, qw)
        return qw


def quantize(W: torch.Tensor, option: Option, quantizer: Quantizer = Quantizer(), H: torch.Tensor | None = None,
             *, cache: GPTQCache | None = None, name: str | None = None) -> QuantizedWeight:
    """`rtn(W, option, **quantizer.settings)` or `gptq(W, H, option, **quantizer.settings)`; GPTQ needs `H`,
    unless `cache` holds module `name`'s result (RTN is cheaper than a lookup and never cached)."""
    if not isinstance(quantizer, Quantizer):
        raise TypeError(f"quantizer must be a Quantizer (e.g. Quantizer.parse({quantizer!r})), "
                        f"not {type(quantizer).__name__}")
    if option.gguf is not None or quantizer.method == "llamacpp":
        raise ValueError(f"{option.label} with the {quantizer.label} quantizer is llama.cpp's to store: "
                         f"apply it with --format gguf (quantize_dequantize gives its ΔW)")
    if quantizer.method == "rtn":
        return rtn(W, option, **quantizer.settings)
    if cache is not None:
        return cache.gptq(name, W, H, option, quantizer)
    if H is None:
        raise ValueError("the gptq quantizer needs the module's input statistics H")
    return gptq(W, H, option, **quantizer.settings)


def quantize_dequantize(W: torch.Tensor, option: Option, quantizer: Quantizer = Quantizer(),
                        H: torch.Tensor | None = None, *, importance: np.ndarray | None = None,
                        **kwargs) -> torch.Tensor:
    """What the weight becomes after storage with `option` (identity for 16 bits), in `W`'s dtype and on its
    device, where the quantizer runs (GPTQ brings `H` there); `kwargs` as `quantize`'s.  `importance`
    (`[in_features]`): the column weights llama.cpp's quantization of a GGUF type takes from the
    quantizer's importance matrix (`profiler.imatrix.importance_rows`); a module with none (the
    embedding: no matmul input to record) is quantized without, as llama-quantize does."""
    if option.gguf is not None:
        if quantizer.method != "llamacpp":
            raise ValueError(f"the GGUF type {option.label} is quantized by llama.cpp: its quantizer is "
                             f"llamacpp, not {quantizer.label}")
        # what llama-quantize writes when asked for this type: itself, or its fallback on rows it cannot store
        stored = stored_gguf_type(option.gguf, W.shape[1])
        W32 = W.detach().to("cpu", torch.float32).numpy()
        return torch.from_numpy(llamacpp.quantize_dequantize(W32, stored, importance)).to(W.device, W.dtype)
    if not option.quantized:
        return W.detach().to(torch.bfloat16).to(W.dtype)
    return quantize(W, option, quantizer, H, **kwargs).dequantize(W.dtype)
