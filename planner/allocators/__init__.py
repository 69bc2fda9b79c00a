"""Every allocator: `solve(problem, *, seed=0, time_limit=None, **params) -> Assignment`, by name."""

from bitplan.planner.allocators import closed_form, dp, greedy, ilp, uniform

ALLOCATORS = {
    "uniform": uniform.solve,
    "greedy": greedy.solve,
    "dp": dp.solve,
    "ilp": ilp.solve,
    "closed_form": closed_form.solve,
}
