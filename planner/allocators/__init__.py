"""Every allocator: `solve(problem, *, seed=0, time_limit=None, **params) -> Assignment`, by name.

An allocator whose `solve` takes a `context` keyword measures the model (`evolutionary`): `allocate`
hands it the caller's context and the module -> unit map; `needs_context` tells which ones.
"""

import inspect

from bitplan.db.types import InvalidInput
from bitplan.planner.allocators import closed_form, dp, evolutionary, greedy, ilp, uniform

ALLOCATORS = {
    "uniform": uniform.solve,
    "greedy": greedy.solve,
    "dp": dp.solve,
    "ilp": ilp.solve,
    "closed_form": closed_form.solve,
    "evolutionary": evolutionary.solve,
}


def needs_context(name: str) -> bool:
    """Whether the named allocator measures the model (takes `context=`): no plan from a profile alone."""
    return name in ALLOCATORS and "context" in inspect.signature(ALLOCATORS[name]).parameters


def lookup_allocator(name: str):
    """The named allocator's `solve`, or InvalidInput listing the known names."""
    if name not in ALLOCATORS:
        raise InvalidInput(f"unknown allocator {name!r}; known: {sorted(ALLOCATORS)}")
    return ALLOCATORS[name]


def check_allocator_params(name: str, solve, params: dict) -> None:
    """Unknown allocator parameters are the user's mistake: say which ones exist."""
    known = [p for p, v in inspect.signature(solve).parameters.items()
             if v.kind is inspect.Parameter.KEYWORD_ONLY and p not in ("seed", "time_limit", "context", "unit")]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InvalidInput(f"allocator {name!r} has no parameter {unknown}; it takes {known or 'none'}")
