"""Latency in planning: the latency budget (`8ms@batch1`), the objective (`error+0.5*latency`), and a
profile's latency table read at one batch.

A profile's table (`Profile.latency [M, O, B]`, profiler/latency.py) holds seconds per module call at
each of its batch sizes; a plan's latency at batch B is the sum over its modules (one call each, in
sequence: a forward pass of one token per sequence at batch B). The budget and the objective both use
one batch; every plan records its latency at all of the profile's batches.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from bitplan.db.types import InvalidInput, Profile

_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(s|ms|us|µs)\s*@\s*batch\s*([0-9]+)\s*$")
_OBJECTIVE_RE = re.compile(r"^\s*error\s*\+\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*[*·]?\s*latency\s*$")


@dataclass(frozen=True)
class LatencyBudget:
    """At most `value` `unit` (s, ms, us) per forward pass of the planned modules at batch `batch`."""

    value: float
    unit: str
    batch: int

    @classmethod
    def parse(cls, text: str) -> "LatencyBudget":
        m = _BUDGET_RE.match(str(text))
        if not m or float(m.group(1)) <= 0 or int(m.group(3)) <= 0:
            raise InvalidInput(f"bad latency budget {text!r}: write e.g. '8ms@batch1', '250us@batch16' or "
                               "'0.05s@batch256' (a positive time, then @batch and a batch size)")
        unit = "us" if m.group(2) == "µs" else m.group(2)
        return cls(float(m.group(1)), unit, int(m.group(3)))

    @property
    def seconds(self) -> float:
        return self.value * _SECONDS[self.unit]

    def __str__(self) -> str:
        return f"{self.value:g}{self.unit}@batch{self.batch}"

    def describe(self, seconds: float) -> str:
        """`seconds` in this budget's unit, rounded *up* to 3 decimals (so "ask for at least that" holds)."""
        return f"{math.ceil(seconds / _SECONDS[self.unit] * 1000 - 1e-9) / 1000:g}{self.unit}"


@dataclass(frozen=True)
class Objective:
    """What the planner minimises: `error_weight`·error + `per_ms`·latency in milliseconds.

    error is the profile's predicted loss increase (nats per token), so `per_ms` — λ in
    `error+λ*latency` — is in nats per millisecond of latency at the planning batch.
    """

    error_weight: float = 1.0
    per_ms: float = 0.0

    @classmethod
    def parse(cls, text: str | None) -> "Objective":
        t = (text or "error").strip()
        if t == "error":
            return cls()
        if t == "latency":
            return cls(0.0, 1.0)
        m = _OBJECTIVE_RE.match(t)
        if not m:
            raise InvalidInput(f"bad objective {text!r}: write error, latency, or error+λ*latency with λ in nats "
                               "per millisecond, e.g. error+0.5*latency")
        return cls(1.0, float(m.group(1)))

    @property
    def uses_latency(self) -> bool:
        return self.per_ms != 0.0

    def __str__(self) -> str:
        if not self.uses_latency:
            return "error"
        return "latency" if self.error_weight == 0 else f"error+{self.per_ms:g}*latency"

    def matrix(self, error: np.ndarray, latency: np.ndarray | None) -> np.ndarray:
        """The objective of every (module, option): error and `latency` seconds combined."""
        if not self.uses_latency:
            return error
        return self.error_weight * error + self.per_ms * 1e3 * latency


def batch_index(profile: Profile, batch: int) -> int:
    """Where `batch` sits in the profile's latency table; InvalidInput naming the batches it has."""
    if profile.latency is None:
        from bitplan.db.devices import GPUS
        raise InvalidInput(f"profile {profile.id or '(file)'} has no latency table: make one with `bitplan profile "
                           f"MODEL --latency roofline:GPU` (GPU one of {', '.join(GPUS)})")
    if batch not in profile.latency_batches:
        raise InvalidInput(f"batch {batch} is not in the latency table of profile {profile.id or '(file)'}; "
                           f"it has batches {', '.join(map(str, profile.latency_batches))}")
    return profile.latency_batches.index(batch)


def plan_latency(profile: Profile, option_of_module: np.ndarray) -> dict[int, float] | None:
    """Seconds per forward pass at each of the profile's batches for module m at option `option_of_module[m]`."""
    if profile.latency is None:
        return None
    per_module = profile.latency[np.arange(len(profile.modules)), option_of_module]  # [M, B]
    return {b: float(t) for b, t in zip(profile.latency_batches, per_module.sum(axis=0).tolist())}


def format_seconds(seconds: float) -> str:
    """`0.008213` -> '8.213 ms', `4.1e-05` -> '41 µs'."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if seconds >= scale:
            return f"{seconds / scale:.4g} {unit}"
    return f"{seconds / 1e-6:.4g} µs"


def planning_terms(profile: Profile, latency_budget: str | LatencyBudget | None,
                   objective: str | Objective | None) -> tuple[LatencyBudget | None, Objective, int | None]:
    """The parsed latency budget and objective, and the batch they read the profile's table at: the
    budget's batch, else (an objective alone) the table's smallest; None when latency plays no part."""
    if latency_budget is not None and not isinstance(latency_budget, LatencyBudget):
        latency_budget = LatencyBudget.parse(latency_budget)
    if not isinstance(objective, Objective):
        objective = Objective.parse(objective)
    if latency_budget is None and not objective.uses_latency:
        return None, objective, None
    if latency_budget is not None:
        batch = latency_budget.batch
    else:
        batch = profile.latency_batches[0] if profile.latency is not None else 1
    batch_index(profile, batch)  # no table, or not this batch: say what to do
    return latency_budget, objective, batch
