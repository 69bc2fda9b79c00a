"""Mixture-of-experts: per-expert linears in place of fused expert tensors, routing statistics, and the
fallback error of experts that the calibration text never reaches.

**Un-fusing.**  transformers 5 stores the routed experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and
DeepSeek-V2/V3 as one module with 3-D parameters, `gate_up_proj: [E, 2I, H]` and `down_proj: [E, H, I]`,
called as `experts(hidden_states, top_k_index, top_k_weights)`.  `unfuse_experts` replaces each such
module by an `ExpertLinears`: a ModuleList of `ExpertMLP`s holding three `nn.Linear`s each, computing
exactly what the fused module computed.  Everything downstream (hooks, Fisher gradients, the `kl`
replay, `apply`, `QuantLinear`, checkpoint names) works on `nn.Linear`s, so it works unchanged, and the
matrices read `model.layers.3.mlp.experts.5.down_proj` as in un-fused checkpoints.  Fused modules are
recognised by structure (the parameters' shapes, the forward's `top_k_index`/`top_k_weights`, a router
next to them), not by class name; a fused layout this cannot reproduce exactly is an error.

**Routing statistics.**  `record_routing` counts, per expert, the (token, slot) pairs routed to it and
the routing weights the model multiplies its output by (after any top-k renormalisation or scaling
factor: what `ExpertLinears.forward` receives).

**Per-expert H.**  An expert's linears see only the tokens routed to it, and while they run
`ExpertMLP.routing_weight` holds those tokens' weights `w`; `bitplan.profiler.stream` accumulates
`H = Σ w² xxᵀ` for expert linears (in float32, from the routed rows themselves while an expert has seen
fewer rows than its width, spilled to disk over a budget: `BlockHessians`).  Why `w²`: the block adds
`w · expert(x)` to the residual stream, so an error `ΔW` inside the expert reaches the block output as
`w · ΔW x` (to first order, for gate and up as for down), whose square carries `w²`.  Divided by *all*
calibration tokens, as for a dense module, `tr(ΔW H ΔWᵀ)/n` is the expert's share of the mean per-token
block-output error: a rarely routed expert is cheap because few tokens pay for its error.  The Fisher
estimator needs nothing of this: its gradients flow through the routing weights already.

**Experts without calibration tokens.**  Their measured error is exactly zero (no token ever multiplies
their weights), which would tell the planner they can take 2 bits for free, however the deployed
traffic routes.  `fill_unrouted` never lets that stand: such an expert's matrix gets the layer's
routed experts' mean error *per routed token* (per option, for the same role), times the token count
of the layer's rarest routed expert, the smallest frequency the calibration text shows to be possible
there; it is marked `fallback=True` and a warning names it.  This applies to every estimator.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bitplan.db.types import InvalidInput, Module

log = logging.getLogger(__name__)

SUPPORTED = ("fused experts with gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I], "
             "act(gate)·up, no biases, as in Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3")


class ExpertMLP(nn.Module):
    """One routed expert: `down_proj(act(gate_proj(x)) * up_proj(x))`."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, *, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)
        self.act_fn = act_fn
        # [n, 1]: the routing weights of the tokens in the current call, for hooks on the linears
        # (`bitplan.profiler.stream` weighs H by them); None outside a routed call.
        self.routing_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class RoutingRecord:
    """Per expert of one MoE block: (token, slot) pairs routed to it and the sum of their weights."""

    tokens: torch.Tensor  # [E] int64
    weight: torch.Tensor  # [E] float64

    @classmethod
    def zeros(cls, n_experts: int) -> "RoutingRecord":
        return cls(torch.zeros(n_experts, dtype=torch.int64), torch.zeros(n_experts, dtype=torch.float64))


class ExpertLinears(nn.ModuleList):
    """The routed experts of one MoE block as `ExpertMLP`s, called like transformers' fused experts.

    A ModuleList, so that expert 5's down projection is `<block>.experts.5.down_proj`.
    """

    def __init__(self, experts: Sequence[ExpertMLP]):
        super().__init__(experts)
        self.record: RoutingRecord | None = None  # set by `record_routing`

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        # experts in increasing order, as the fused loop: the same summation order per token
        for e in torch.unique(top_k_index).tolist():
            if e >= len(self):  # an index past the last expert marks a slot masked out (expert parallelism)
                continue
            token_idx, slot = torch.where(top_k_index == e)
            w = top_k_weights[token_idx, slot, None]
            expert = self[e]
            expert.routing_weight = w
            try:
                out = expert(hidden_states[token_idx]) * w
            finally:
                expert.routing_weight = None
            final.index_add_(0, token_idx, out.to(final.dtype))
            if self.record is not None:
                self.record.tokens[e] += token_idx.numel()
                self.record.weight[e] += float(w.detach().double().sum())
        return final


# ------------------------------------------------------------------------------------ un-fusing


def _fused_candidate(mod: nn.Module, block: nn.Module) -> bool:
    """Looks like fused experts: a forward that takes the router's top-k choice, transformers' experts
    layout flags, or a 3-D parameter with one slice per expert of a router next to it."""
    if isinstance(mod, ExpertLinears):
        return False
    try:
        if "top_k_index" in inspect.signature(type(mod).forward).parameters:
            return True
    except (TypeError, ValueError):
        pass
    if hasattr(mod, "has_gate") and hasattr(mod, "is_transposed"):
        return True
    return any(p.dim() == 3 and _router(block, mod, p.shape[0]) is not None
               for p in mod.parameters(recurse=False))


def _unsupported(name: str, mod: nn.Module, why: str) -> InvalidInput:
    return InvalidInput(f"{name} ({type(mod).__name__}) is an MoE expert layout bitplan cannot un-fuse: {why}; "
                        f"supported: {SUPPORTED}")


def _check_fused(name: str, mod: nn.Module, block: nn.Module) -> tuple[int, int, int]:
    """`(E, H, I)` of a fused-experts module bitplan can reproduce exactly, else a one-line error."""
    params = dict(mod.named_parameters(recurse=False))
    gu, down = params.get("gate_up_proj"), params.get("down_proj")
    if gu is None or down is None or gu.dim() != 3 or down.dim() != 3:
        raise _unsupported(name, mod, f"parameters {sorted((k, tuple(p.shape)) for k, p in params.items())}")
    E, two_i, H = gu.shape
    if two_i % 2 or tuple(down.shape) != (E, H, two_i // 2):
        raise _unsupported(name, mod, f"gate_up_proj {tuple(gu.shape)} and down_proj {tuple(down.shape)} "
                                      f"do not read [E, 2I, H] and [E, H, I]")
    if set(params) != {"gate_up_proj", "down_proj"}:
        raise _unsupported(name, mod, f"extra parameters {sorted(set(params) - {'gate_up_proj', 'down_proj'})}")
    sig = inspect.signature(type(mod).forward).parameters
    if not {"top_k_index", "top_k_weights"} <= set(sig):
        raise _unsupported(name, mod, f"its forward takes {list(sig)[1:]}, not (hidden_states, top_k_index, "
                                      f"top_k_weights)")
    # transformers' experts decorator records the layout; anything but the default is another computation
    layout = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True,
              "has_post_expert_norm": False}
    odd = {k: getattr(mod, k) for k, v in layout.items() if getattr(mod, k, v) != v}
    if odd:
        raise _unsupported(name, mod, f"layout {odd}")
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        _default_apply_gate = None
    own_gate = getattr(type(mod), "_apply_gate", _default_apply_gate)
    if own_gate is not _default_apply_gate:
        raise _unsupported(name, mod, "its own _apply_gate (not act(gate)·up)")
    if not isinstance(getattr(mod, "act_fn", None), nn.Module):
        raise _unsupported(name, mod, "no act_fn module")
    if _router(block, mod, E, H) is None:
        raise _unsupported(name, mod, f"no router with a [{E}, {H}] weight next to it")
    return E, H, two_i // 2


def _router(block: nn.Module, experts: nn.Module, n_experts: int, hidden: int | None = None) -> nn.Module | None:
    """The block's router: a sibling of the experts whose weight maps the hidden state to one logit per expert."""
    for child in block.children():
        w = getattr(child, "weight", None)
        if (child is not experts and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == n_experts
                and hidden in (None, w.shape[1])):
            return child
    return None


def unfuse_experts(model: nn.Module) -> int:
    """In place: every fused-experts module becomes an `ExpertLinears` with the same weights; returns how many.

    Raises InvalidInput for a module that looks like fused experts but has a layout this cannot
    reproduce exactly (it would otherwise be silently left out of the plan).
    """
    found = []
    for block_name, block in model.named_modules():
        for child_name, child in block.named_children():
            if _fused_candidate(child, block):
                name = f"{block_name}.{child_name}" if block_name else child_name
                found.append((name, child, _check_fused(name, child, block)))
    for name, fused, (E, H, I) in found:
        gu, down = fused.gate_up_proj, fused.down_proj
        experts = []
        for e in range(E):
            mlp = ExpertMLP(H, I, fused.act_fn, device=gu.device, dtype=gu.dtype)
            with torch.no_grad():
                mlp.gate_proj.weight.copy_(gu[e, :I])
                mlp.up_proj.weight.copy_(gu[e, I:])
                mlp.down_proj.weight.copy_(down[e])
            mlp.requires_grad_(gu.requires_grad)
            experts.append(mlp)
        unfused = ExpertLinears(experts).train(fused.training)
        model.set_submodule(name, unfused)
        del fused, gu, down
    if found:
        log.info("un-fused %d MoE expert modules into per-expert linears", len(found))
    return len(found)


def expert_sets(module: nn.Module) -> Iterator[tuple[str, ExpertLinears]]:
    """`(name, ExpertLinears)` under `module`."""
    for name, mod in module.named_modules():
        if isinstance(mod, ExpertLinears):
            yield name, mod


def classify_linears(layer: nn.Module) -> dict[int, tuple[str, int | None] | None]:
    """For the linears of one decoder layer that belong to an MoE block: `id(linear)` -> `(role, expert)`,
    or None for a gate that stays unplanned.  Linears of dense blocks are absent.

    Routed experts' matrices: `(gate_proj|up_proj|down_proj, e)`.  A block's other linears are its
    shared expert (`shared_<role>`, no expert id) and, where the router or a shared-expert gate is an
    nn.Linear (Qwen2-MoE's `shared_expert_gate` maps the hidden state to one value), its gates: one output
    per expert, or one.  Gates stay at 16 bits (counted in the profile's fixed bits): they decide
    which experts run and how much each counts, so a small error there moves whole expert outputs,
    and they hold a negligible share of the weights (`hidden x experts`).
    """
    out: dict[int, tuple[str, int | None] | None] = {}
    blocks = {}
    for name, experts in expert_sets(layer):
        block = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
        blocks[id(block)] = (block, experts)
    for block, experts in blocks.values():
        mine = set()
        for e, mlp in enumerate(experts):
            for role in ("gate_proj", "up_proj", "down_proj"):
                lin = getattr(mlp, role)
                out[id(lin)] = (role, e)
                mine.add(id(lin))
        for sub_name, lin in block.named_modules():
            if isinstance(lin, nn.Linear) and id(lin) not in mine:
                # a gate has one output per expert or a single one; a shared expert narrower than the
                # expert count (a scaled-down DeepSeek-V3's) is still planned
                out[id(lin)] = None if lin.out_features in (1, len(experts)) else \
                    (f"shared_{sub_name.rsplit('.', 1)[-1]}", None)
    return out


# -------------------------------------------------------------------------------- routing stats


@contextmanager
def record_routing(model: nn.Module) -> Iterator[dict[str, RoutingRecord]]:
    """Inside: every forward pass adds to `{ExpertLinears name: RoutingRecord}` (the yielded dict)."""
    sets = dict(expert_sets(model))
    records = {name: RoutingRecord.zeros(len(ex)) for name, ex in sets.items()}
    for name, ex in sets.items():
        ex.record = records[name]
    try:
        yield records
    finally:
        for ex in sets.values():
            ex.record = None


def expert_set_name(module: Module) -> str:
    """`model.layers.3.mlp.experts.5.down_proj` -> `model.layers.3.mlp.experts`."""
    return module.name.rsplit(".", 2)[0]


def with_routing(modules: Sequence[Module], records: dict[str, RoutingRecord]) -> list[Module]:
    """`modules` with each expert matrix's routing statistics filled in."""
    out = []
    for m in modules:
        if m.expert is None:
            out.append(m)
            continue
        rec = records[expert_set_name(m)]
        tokens, total = int(rec.tokens[m.expert]), float(rec.weight[m.expert])
        out.append(m.model_copy(update={"tokens_routed": tokens, "routing_weight_total": total,
                                        "routing_weight": total / tokens if tokens else None}))
    return out


def fill_unrouted(error: np.ndarray, modules: Sequence[Module]) -> tuple[np.ndarray, list[Module]]:
    """Fallback error for expert matrices with no calibration tokens (module docstring); `fallback=True`.

    Needs the routing statistics (`with_routing`).  Returns new arrays/lists; the inputs are unchanged.
    """
    error, modules = error.copy(), list(modules)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, m in enumerate(modules):
        if m.expert is not None:
            if m.tokens_routed is None:
                raise ValueError(f"{m.name} has no routing statistics; call with_routing first")
            groups.setdefault((expert_set_name(m), m.role), []).append(i)
    unrouted_by_set: dict[str, list[int]] = {}
    for (set_name, _role), idx in groups.items():
        tokens = np.array([modules[i].tokens_routed for i in idx], dtype=np.float64)
        cold = [i for i, t in zip(idx, tokens) if t == 0]
        if not cold:
            continue
        hot = [i for i, t in zip(idx, tokens) if t > 0]
        if not hot:
            raise InvalidInput(f"no expert of {set_name} received a calibration token; profile more tokens")
        per_token = (error[hot] / tokens[tokens > 0, None]).mean(axis=0)
        error[cold] = per_token * tokens[tokens > 0].min()
        for i in cold:
            modules[i] = modules[i].model_copy(update={"fallback": True})
        unrouted_by_set[set_name] = sorted({modules[i].expert for i in cold})
    for set_name, experts in unrouted_by_set.items():
        log.warning("%s: experts %s received no calibration tokens; their error is the routed experts' mean "
                    "per-token error times the rarest routed expert's token count (fallback=True); profile "
                    "more or more varied text to measure them", set_name, experts)
    return error, modules
