"""A layer x expert text heat map of an MoE plan's bits (`bitplan show PLAN`).

Each cell is one routed expert's bits per weight: the option's bits where its matrices share one
(always, with `--granularity expert`), else their mean weighted by size.  `*` marks an expert whose
error is the fallback for one that received no calibration tokens (profiler/moe.py).  Up to
`WIDE` experts a layer get a numbered column each; more (DeepSeek-V3's 256) get one character each,
the bits rounded (`F` = 16, `*` in place of the bits for a fallback expert).
"""

from __future__ import annotations

import re
from collections import defaultdict

from bitplan.db.types import Plan, Profile

WIDE = 32
_NAME = re.compile(r"\.(\d+)\.(?:.*\.)?experts\.(\d+)\.[^.]+$")  # ...layers.3.mlp.experts.5.down_proj
_GLYPH = {2: "2", 3: "3", 4: "4", 5: "5", 6: "6", 8: "8", 16: "F"}


def _experts(plan: Plan, profile: Profile | None) -> dict[tuple[int, int], list[tuple[int, int, bool]]]:
    """(layer, expert) -> [(bits, numel, fallback)] of its matrices; from the profile, else from the names."""
    cells: dict[tuple[int, int], list[tuple[int, int, bool]]] = defaultdict(list)
    if profile is not None:
        for m in profile.modules:
            if m.expert is not None and m.layer is not None and m.name in plan.assignment:
                cells[(m.layer, m.expert)].append((plan.assignment[m.name].bits, m.numel, m.fallback))
        return cells
    for name, option in plan.assignment.items():
        match = _NAME.search(name)
        if match:
            cells[(int(match.group(1)), int(match.group(2)))].append((option.bits, 1, False))
    return cells


def _bits(matrices: list[tuple[int, int, bool]]) -> float:
    return sum(b * n for b, n, _ in matrices) / sum(n for _, n, _ in matrices)


def expert_heatmap(plan: Plan, profile: Profile | None = None) -> str:
    """The heat map as text, or "" for a plan without routed experts."""
    cells = _experts(plan, profile)
    if not cells:
        return ""
    layers = sorted({l for l, _ in cells})
    n_experts = max(e for _, e in cells) + 1
    bits = {k: _bits(v) for k, v in cells.items()}
    cold = {k for k, v in cells.items() if any(f for _, _, f in v)}
    label = max(len(f"L{layers[-1]}"), 5)
    lines = [f"  bits per routed expert (layer x expert){'; * no calibration tokens (fallback error)' if cold else ''}"]
    if n_experts <= WIDE:
        width = max(len(f"e{n_experts - 1}"), 4) + 1
        lines.append(f"  {'':<{label}}" + "".join(f"{f'e{e}':>{width - 1}} " for e in range(n_experts)) + "   mean")
        for l in layers:
            row = "".join(f"{_cell(bits.get((l, e)), (l, e) in cold):>{width}}" for e in range(n_experts))
            lines.append(f"  {f'L{l}':<{label}}{row}  {_layer_mean(cells, l):6.2f}")
        return "\n".join(lines)
    ticks = "".join(f"{e:<10}" for e in range(0, n_experts, 10))[:n_experts]
    lines.append(f"  {'':<{label}} {ticks}    mean")
    for l in layers:
        row = "".join(_glyph(bits.get((l, e)), (l, e) in cold) for e in range(n_experts))
        lines.append(f"  {f'L{l}':<{label}} {row}  {_layer_mean(cells, l):6.2f}")
    lines.append(f"  (one character per expert e0..e{n_experts - 1}: its bits rounded, F = 16, . = absent)")
    return "\n".join(lines)


def _cell(b: float | None, fallback: bool) -> str:
    if b is None:
        return "."
    text = f"{b:.0f}" if b == round(b) else f"{b:.1f}"
    return text + ("*" if fallback else " ")


def _glyph(b: float | None, fallback: bool) -> str:
    if b is None:
        return "."
    return "*" if fallback else _GLYPH.get(round(b), "?")


def _layer_mean(cells, layer: int) -> float:
    return _bits([m for (l, _), v in cells.items() if l == layer for m in v])
