"""Solver stacks behind the `ilp` allocator: one module per backend, each `solve(model, ...) -> Outcome`.

`mck` builds the shared, reduced multiple-choice knapsack (integer size steps, normalised costs,
options fixed by the Lagrangian bound); `cbc` (PuLP), `cpsat` (OR-Tools CP-SAT) and `highs`
(scipy.optimize.milp) solve it. Backends import their solver library lazily, and `highspy` is never
imported: it cannot share a process with OR-Tools' bundled HiGHS (DESIGN.md).
"""
