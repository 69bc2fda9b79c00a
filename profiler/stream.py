"""Block-by-block forward passes, GPTQ-style: only one decoder block is on the compute device at a time.

A catcher in place of block 0 records the hidden states and keyword arguments (attention mask,
rotary tables, ...) that the model feeds its blocks; then each block in turn is moved to the device,
runs on every calibration batch with hooks feeding its linears' inputs to `H += Xᵀ X`, and its
outputs become the next block's inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from bitplan.db.types import Module
from bitplan.profiler.model import decoder_layers
from bitplan.profiler.moe import ExpertMLP


class _Caught(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block 0 to record its inputs, then stops the forward pass."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.inputs: list[tuple[torch.Tensor, dict]] = []

    def forward(self, hidden_states, *args, **kwargs):
        self.inputs.append((hidden_states, kwargs))
        raise _Caught


def block_inputs(model: nn.Module, batches: torch.Tensor, device: str) -> list[tuple[torch.Tensor, dict]]:
    """Inputs of decoder block 0 for each batch row: `[(hidden [1, T, d], kwargs)]`."""
    layers = decoder_layers(model)
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    # embeddings, rotary tables and the like run on the device; the blocks stay where they are
    _move_outside(model, layers, device)
    try:
        for row in batches:
            try:
                model(row.unsqueeze(0).to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        layers[0] = catcher.block
        _move_outside(model, layers, "cpu")
    return catcher.inputs


def _move_outside(model: nn.Module, layers: nn.ModuleList, device: str) -> None:
    """Move every parameter and buffer that is not inside a decoder block."""
    inside = {id(x) for b in layers for x in b.modules()}
    for m in model.modules():
        if id(m) in inside:
            continue
        for p in m._parameters.values():
            if p is not None:
                p.data = p.data.to(device)
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = b.to(device)


def stream_blocks(
    model: nn.Module,
    batches: torch.Tensor,
    planned: list[tuple[Module, nn.Linear]],
    on_block: Callable[[int, list[tuple[Module, nn.Linear]], dict[str, torch.Tensor], int], None],
    device: str = "cpu",
    progress: bool = True,
) -> None:
    """Run the model one block at a time; after each block call `on_block(i, its planned linears, H, n_tokens)`.

    `H[name]: [K, K]` float64 is `Σ xxᵀ` over every calibration token's input to that linear; for a
    routed expert's linear, over the tokens routed to it, each weighted by its routing weight squared.
    """
    layers = decoder_layers(model)
    inputs = block_inputs(model, batches, device)
    n_tokens = batches.numel()
    by_layer: dict[int, list[tuple[Module, nn.Linear]]] = {}
    for m, lin in planned:
        if m.layer is not None:
            by_layer.setdefault(m.layer, []).append((m, lin))
    with torch.no_grad():
        for i, block in enumerate(tqdm(layers, desc="profiling blocks", unit="block", disable=not progress)):
            block.to(device)
            mine = by_layer.get(i, [])
            H = {m.name: torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64, device=device)
                 for m, lin in mine}
            hooks = [lin.register_forward_hook(_accumulate(H[m.name], _expert_of(model, m))) for m, lin in mine]
            try:
                outputs = []
                for hidden, kwargs in inputs:
                    out = block(hidden, **kwargs)
                    outputs.append((out[0] if isinstance(out, tuple) else out, kwargs))
                inputs = outputs
            finally:
                for h in hooks:
                    h.remove()
                block.to("cpu")
            on_block(i, mine, H, n_tokens)


def collect_hessians(model: nn.Module, batches: torch.Tensor, planned: list[tuple[Module, nn.Linear]],
                     device: str = "cpu", dtype: torch.dtype = torch.float32,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """`H = Σ xxᵀ` of every planned linear (on the CPU, in `dtype`), for `apply_plan(quantizer="gptq")`.

    Statistics of the unquantized model, as the profile's GPTQ ΔW uses (a routed expert's weighted by
    `w²`, so GPTQ minimises the error the block output sees).  Holds every `H` at once:
    `Σ K²` values (SmolLM2-135M: 0.5 GiB in float32).
    """
    H: dict[str, torch.Tensor] = {}

    def keep(_i, _mods, Hb, _n):
        H.update({k: v.to("cpu", dtype) for k, v in Hb.items()})

    stream_blocks(model, batches, planned, keep, device, progress)
    outside = [(m, lin) for m, lin in planned if m.layer is None]
    H.update({k: v.to("cpu", dtype) for k, v in outside_hessians(model, batches, outside, device).items()})
    return H


@torch.no_grad()
def outside_hessians(model: nn.Module, batches: torch.Tensor, mods: list[tuple[Module, nn.Linear]],
                     device: str = "cpu") -> dict[str, torch.Tensor]:
    """`H = Σ xxᵀ` of planned linears outside the blocks (an untied `lm_head`): one whole-model pass.

    `stream_blocks` sees only the blocks' linears; the head's inputs are the final norm's outputs,
    which come out of an ordinary forward pass.
    """
    H = {m.name: torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64, device=device)
         for m, lin in mods}
    if not mods:
        return H
    hooks = [lin.register_forward_hook(_accumulate(H[m.name])) for m, lin in mods]
    model.to(device)
    try:
        for row in batches:
            model(row.unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.to("cpu")
    return H


def _expert_of(model: nn.Module, m: Module) -> ExpertMLP | None:
    """The routed expert that owns module `m`'s linear, or None for a dense module."""
    if m.expert is None:
        return None
    owner = model.get_submodule(m.name.rsplit(".", 1)[0])
    return owner if isinstance(owner, ExpertMLP) else None


def _accumulate(H: torch.Tensor, expert: ExpertMLP | None = None):
    """`H += Σ xxᵀ`; in a routed expert `Σ w² xxᵀ`, `w` the tokens' routing weights (profiler/moe.py: why)."""
    def hook(_mod, args, _out):
        x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)  # [tokens, K]
        if expert is not None and expert.routing_weight is not None:
            x = x * expert.routing_weight.reshape(-1, 1).to(torch.float64)
        H.addmm_(x.T, x)
    return hook
