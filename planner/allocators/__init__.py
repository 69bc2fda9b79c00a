"""Every allocator: `solve(problem, *, seed=0, time_limit=None, **params) -> Assignment`, by name."""

from bitplan.planner.allocators import dp, greedy, ilp, uniform

ALLOCATORS = {
    "uniform": uniform.solve,
    "greedy": greedy.solve,
    "dp": dp.solve,
    "ilp": ilp.solve,
}
