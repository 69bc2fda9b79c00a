"""Every allocator: `solve(problem, *, seed=0, time_limit=None, **params) -> Assignment`, by name.

An allocator whose `solve` takes a `context` keyword measures the model (`evolutionary`): `allocate`
hands it the caller's context and the module -> unit map; `needs_context` tells which ones.
"""

import inspect

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
