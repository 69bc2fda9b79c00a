"""transformers' attention with `kernels/attention.py` at decode time: `use_decode_attention(model)`.

The model keeps its own attention module and mask; only the function its attention layers call is
swapped, through transformers' registry of attention implementations.  A step of one query token runs the
decode kernel; anything else (prefill, a softcap, dropout) runs transformers' SDPA implementation, with
the same boolean mask that implementation builds.
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "bitplan_decode"


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from bitplan.kernels.attention import decode_attention_op
    from bitplan.kernels.matmul import INTERPRET

    # on the CPU only under Triton's interpreter (tests); elsewhere there is no kernel to run
    if query.shape[2] != 1 or not (query.is_cuda or INTERPRET) or dropout or kwargs.get("softcap") is not None \
            or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return decode_attention_op(query, key, value, attention_mask, scale), None


def use_decode_attention(model: nn.Module) -> None:
    """Make `model`'s attention layers call `attention` (registered once under `NAME`, with SDPA's mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(NAME)
