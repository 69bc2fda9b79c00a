"""Sibling projections in one launch: linears that read the same input (an attention block's q, k and v;
an MLP's gate and up) computed as one linear whose outputs are the siblings' side by side.

At batch 1 a small linear costs a launch and a ramp more than its bytes (a 1024 x 4096 projection reads
2 MB), so three launches of q, k and v cost more than one of their concatenation.  Serving engines hold
such projections merged in their own model code; here the model is transformers', which calls each
projection by name, so each sibling is replaced by a `FusedProjection` that shares one `SiblingGroup`:
the first sibling called with an input runs the merged linear and keeps the others' slices, which they
return when called with that same input tensor.  The last sibling called drops them again, so no state
outlives the forward pass that made it (what `torch.compile` and CUDA graph capture need).

Siblings are found by running the model once (`sibling_linears`): linears of one parent module that
are called one after another with the identical tensor.  Only siblings that can be concatenated are
merged: `QuantLinear`s of one `Option` (the packed layout runs along the input, so outputs concatenate as
columns), or `nn.Linear`s of one dtype.  The merged model computes the same outputs as before.
"""

from __future__ import annotations

import torch
from torch import nn

from bitplan.executor.quant_linear import QuantExpertLinears, QuantLinear
from bitplan.profiler.moe import ExpertMLP


class SiblingGroup:
    """The merged linear of some siblings and, within one forward pass, its output split among them."""

    def __init__(self, merged: nn.Module, sizes: list[int]):
        self.merged, self.sizes = merged, sizes
        self.source: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()
        self.served = 0

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self.source is not x:
            self.source, self.parts, self.served = x, self.merged(x).split(self.sizes, dim=-1), 0
        part = self.parts[index]
        self.served += 1
        if self.served == len(self.sizes):
            self.source, self.parts = None, ()
        return part


class FusedProjection(nn.Module):
    """One sibling of a `SiblingGroup`: its slice of the merged linear's output."""

    def __init__(self, group: SiblingGroup, index: int, in_features: int, out_features: int):
        super().__init__()
        self.group, self.index = group, index
        self.in_features, self.out_features = in_features, out_features
        # every sibling holds the merged linear, so that `.to()` and `.cuda()` reach it from any of them
        self.merged = group.merged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(x, self.index)

    def extra_repr(self) -> str:
        return f"part {self.index} of {len(self.group.sizes)}: {self.out_features} outputs"


def _merge_key(m: nn.Module) -> tuple | None:
    """Linears of equal keys concatenate into one (None: this one never does)."""
    if type(m) is QuantLinear:
        return "quant", m.option, m.in_features, m.bias is not None
    if type(m) is nn.Linear:
        return "dense", m.weight.dtype, m.in_features, m.bias is not None
    return None


def _merge(linears: list[nn.Module]) -> nn.Module:
    """One linear computing `linears`' outputs side by side (they share a `_merge_key`)."""
    first = linears[0]
    n = sum(m.out_features for m in linears)
    bias = None if first.bias is None else torch.cat([m.bias.detach() for m in linears])
    if type(first) is QuantLinear:
        merged = QuantLinear(first.in_features, n, first.option, bias=bias is not None, device=first.scales.device,
                             dtype=torch.float32 if bias is None else bias.dtype)
        for name, _ in first.named_buffers():
            getattr(merged, name).copy_(torch.cat([getattr(m, name) for m in linears], dim=-1))
    else:
        merged = nn.Linear(first.in_features, n, bias=bias is not None, device=first.weight.device,
                           dtype=first.weight.dtype)
        merged.weight.data.copy_(torch.cat([m.weight.detach() for m in linears]))
    if bias is not None:
        merged.bias.data.copy_(bias)
    return merged


@torch.no_grad()
def sibling_linears(model: nn.Module, probe: torch.Tensor) -> list[tuple[str, list[str]]]:
    """`(parent, [child, ...])` for each run of two or more linears of one parent called one after another
    with the same input tensor in `model(probe)`.  Routed experts are left out (their fused kernel
    does not call their linears one by one)."""
    skip = {n for n, m in model.named_modules() if isinstance(m, (ExpertMLP, QuantExpertLinears))}
    calls: list[tuple[str, str, torch.Tensor]] = []  # the inputs are kept, so no id is reused meanwhile
    hooks = []
    for name, mod in model.named_modules():
        parent, _, child = name.rpartition(".")
        if isinstance(mod, (nn.Linear, QuantLinear)) and child and parent not in skip \
                and not any(parent.startswith(s + ".") for s in skip):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, parent=parent, child=child: calls.append((parent, child, args[0]))))
    try:
        model(probe)
    finally:
        for h in hooks:
            h.remove()
    runs: list[tuple[str, list[str]]] = []
    for i, (parent, child, x) in enumerate(calls):
        prev = calls[i - 1] if i else None
        if prev is not None and prev[0] == parent and prev[2] is x and child not in runs[-1][1]:
            runs[-1][1].append(child)
        else:
            runs.append((parent, [child]))
    seen, out = set(), []
    for parent, children in runs:  # a layer called twice (a second token) repeats its runs: keep the first
        if len(children) > 1 and (parent, tuple(children)) not in seen:
            seen.add((parent, tuple(children)))
            out.append((parent, children))
    return out


def fuse_projections(model: nn.Module, probe: torch.Tensor) -> int:
    """Replace the sibling linears of each run (`sibling_linears`) that share a merge key (one `Option`,
    or one dtype) by one merged linear shared through `FusedProjection`s, in place; a run of q at 3 bits
    and k and v at 4 merges k and v.  Returns how many merged linears were made."""
    n = 0
    for parent_name, children in sibling_linears(model, probe):
        parent = model.get_submodule(parent_name) if parent_name else model
        by_key: dict[tuple, list[str]] = {}
        for c in children:
            key = _merge_key(getattr(parent, c))
            if key is not None:
                by_key.setdefault(key, []).append(c)
        for names in by_key.values():
            if len(names) < 2:
                continue
            linears = [getattr(parent, c) for c in names]
            group = SiblingGroup(_merge(linears), [m.out_features for m in linears])
            for i, (child, lin) in enumerate(zip(names, linears)):
                setattr(parent, child, FusedProjection(group, i, lin.in_features, lin.out_features))
            n += 1
    return n
