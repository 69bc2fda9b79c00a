"""`PlanRequest`: everything a plan is asked for, as one typed value.

The CLI, the HTTP service and `allocate` take this one type, so a setting is named, typed, defaulted
and checked in one place; a plan's id is the hash of its profile and its normalised request.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bitplan.db.types import Budget, InvalidInput
from bitplan.planner.allocators import ALLOCATORS, check_allocator_params, lookup_allocator, needs_context
from bitplan.planner.blocks import BUDGET_SPLITS, check_split
from bitplan.planner.engines import ENGINES, check_engine
from bitplan.planner.latency import LatencyBudget, Objective
from bitplan.planner.pins import parse_pin

DEFAULT_BUDGET = "3.5bpw"
DEFAULT_ALLOCATOR = "ilp"
GRANULARITIES = ("module", "expert", "layer", "layer_experts")


class PlanRequest(BaseModel):
    """A plan for one profile: its budget, the allocator and its parameters, and the constraints."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget: str = Field(DEFAULT_BUDGET, description="3.5bpw (overheads included), 900MiB, 0.9GiB, ...")
    allocator: str = Field(DEFAULT_ALLOCATOR, description=f"one of {', '.join(ALLOCATORS)}")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="the allocator's own parameters, e.g. {\"generations\": 20}")
    granularity: str = Field("module", description="units that share one option: " + ", ".join(GRANULARITIES))
    engine: str | None = Field(None, description="whose kernels will run the plan: " + ", ".join(ENGINES)
                               + " (default: the profile's, llamacpp for GGUF options, else bitplan)")
    pins: tuple[str, ...] = Field((), description="e.g. ['model.layers.0.*>=4', 'lm_head=8']")
    latency_budget: str | None = Field(None, description="e.g. 8ms@batch1 (a profile with a latency table; ilp)")
    objective: str | None = Field("error", description="error, latency, or error+λ*latency (λ in nats per millisecond)")
    seed: int = 0
    time_limit: float | None = Field(None, gt=0, description="solver time limit, seconds")
    budget_split: str = Field("model", description="model, or block: equal bits per weight in every decoder block")

    @field_validator("budget", "latency_budget", "objective", mode="before")
    @classmethod
    def _parsed_as_text(cls, v: Any) -> Any:
        # a parsed Budget, LatencyBudget or Objective reads back as its text
        return str(v) if isinstance(v, (Budget, LatencyBudget, Objective)) else v

    @field_validator("params", mode="before")
    @classmethod
    def _none_is_default(cls, v: Any, info) -> Any:
        return (cls.model_fields[info.field_name].get_default(call_default_factory=True) if v is None else v)

    def checked(self) -> PlanRequest:
        """This request with every setting parsed and written one way (same plan, same text), or
        InvalidInput naming the bad setting; nothing is solved or loaded before this passes."""
        solve = lookup_allocator(self.allocator)
        check_allocator_params(self.allocator, solve, self.params)
        if self.granularity not in GRANULARITIES:
            raise InvalidInput(f"unknown granularity {self.granularity!r}; known: {list(GRANULARITIES)}")
        if self.engine is not None:
            check_engine(self.engine)
        check_split(self.budget_split)
        if self.budget_split != "model" and needs_context(self.allocator):
            raise InvalidInput(f"allocator {self.allocator!r} searches the whole model: it takes no per-block budget "
                               f"(--budget-split one of {list(BUDGET_SPLITS)} with another allocator)")
        pins = tuple(f"{pattern}{op}{bits}" for pattern, op, bits in sorted(parse_pin(p) for p in self.pins))
        latency = str(LatencyBudget.parse(self.latency_budget)) if self.latency_budget else None
        return self.model_copy(update={"budget": str(Budget.parse(self.budget)), "pins": pins,
                                       "latency_budget": latency, "objective": str(Objective.parse(self.objective))})
