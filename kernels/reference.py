"""Pure-torch reference for the packed weight format: the spec every Triton kernel is tested against.

Layout (one body serves every width): a `b`-bit code is split into power-of-two *shards*, most
significant first (8 = [8], 4 = [4], 3 = [2, 1], 2 = [2]).  Each shard of width `w` is packed along
the input dimension K into int32 words, `32 / w` values a word, the value of row `k` at bit offset
`(k % (32 / w)) * w` of word `k // (32 / w)`, with the output dimension N contiguous:
`qweight_s[K_pad * w / 32, N]`.  For 2, 4 and 8 bits this is GPTQ's `qweight` byte for byte; a
3-bit code never straddles a word, so a kernel needs no cross-word logic.  K is padded to a multiple
of 32 so that every shard (down to 1 bit) fills whole words; padded rows hold code 0 and are never
read back.

Dequantization is groupwise asymmetric: `w = (q - zero[g]) * scale[g]` with `g = k // group_size`,
`scale: [G, N]` fp16, `zero: [G, N]` integer codes packed the same way along G.  Symmetric options
store no zeros; their zero is `2**(bits - 1)`.
"""

from __future__ import annotations

import torch

# Bit widths and their shards, most significant first.
SHARDS: dict[int, tuple[int, ...]] = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}
WORD = 32


def shards(bits: int) -> tuple[int, ...]:
    try:
        return SHARDS[bits]
    except KeyError:
        raise ValueError(f"no packed layout for {bits} bits; supported: {sorted(SHARDS)}") from None


def padded(k: int) -> int:
    """Rows after padding K to whole words for every shard width."""
    return -(-k // WORD) * WORD


def pack(q: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Codes `q: [K, N]` in [0, 2**bits) -> one int32 tensor `[K_pad * w / 32, N]` per shard."""
    K, N = q.shape
    q = q.to(torch.int64)
    if q.numel() and (q.min() < 0 or q.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    q = torch.nn.functional.pad(q, (0, 0, 0, padded(K) - K))
    out, shift = [], bits
    for w in shards(bits):
        shift -= w
        v = (q >> shift) & ((1 << w) - 1)  # this shard's bits of every code
        per = WORD // w
        v = v.view(-1, per, N) << (torch.arange(per, dtype=torch.int64, device=q.device) * w).view(1, per, 1)
        word = v.sum(dim=1)  # disjoint bit fields: sum == bitwise or
        # int32 storage with wrap-around, as GPTQ stores it
        out.append(torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).contiguous())
    return out


def unpack(packed: list[torch.Tensor], bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack`: `[K, N]` int32 codes (the first `k` rows)."""
    q, shift = None, bits
    for w, word in zip(shards(bits), packed, strict=True):
        shift -= w
        per = WORD // w
        word = word.to(torch.int64) & 0xFFFFFFFF
        v = (word.unsqueeze(1) >> (torch.arange(per, dtype=torch.int64, device=word.device) * w).view(1, per, 1)) \
            & ((1 << w) - 1)
        v = v.reshape(-1, word.shape[-1]) << shift
        q = v if q is None else q | v
    return q[:k].to(torch.int32)


def dequantize(
    packed: list[torch.Tensor],
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    k: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Weights transposed, `[K, N]`, from packed codes, `scales: [G, N]` and integer `zeros: [G, N]`."""
    q = unpack(packed, bits, k).to(torch.float32)
    g = torch.arange(k, device=scales.device) // group_size  # group of every input row
    z = torch.full_like(scales, 2 ** (bits - 1), dtype=torch.float32) if zeros is None else zeros.float()
    return ((q - z[g]) * scales.float()[g]).to(dtype)


def matmul(x: torch.Tensor, packed, scales, zeros, bits: int, group_size: int, k: int) -> torch.Tensor:
    """`x @ W.T` for `x: [..., K]`: dequantize then matmul, in `x`'s dtype."""
    return x @ dequantize(packed, scales, zeros, bits, group_size, k, dtype=x.dtype)
