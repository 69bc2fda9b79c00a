"""`allocate`: profile + PlanRequest -> Plan. The one place that checks, times and names plans.

Allocators only solve; here the budget is turned into bits, pins are applied,
infeasible budgets are reported in the budget's own unit, the answer is verified (an allocator
bug raises instead of returning an over-budget plan) and the plan gets its content id.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np

from bitplan.db.types import Budget, InfeasibleBudget, InvalidInput, Module, Plan, Profile, content_id
from bitplan.planner.allocators import lookup_allocator, needs_context
from bitplan.planner.blocks import block_of_units, solve_per_block
from bitplan.planner.engines import constrain, profile_engine, tie_keys
from bitplan.planner.pins import apply_pins, parse_pin
from bitplan.planner.latency import LatencyBudget, Objective, batch_index, plan_latency, planning_terms
from bitplan.planner.problem import AllocationProblem, Assignment, InfeasibleLatency
from bitplan.planner.request import GRANULARITIES, PlanRequest


class AllocatorBug(RuntimeError):
    """An allocator returned a choice that breaks the problem: our bug, never the user's input."""




def unit_of(modules: Sequence[Module], granularity: str = "module", engine: str = "bitplan") -> np.ndarray:
    """[M] the unit of each module, numbered in order of first appearance.

    `expert`: all matrices of one (layer, expert); `layer`: all modules of one layer; `layer_experts`:
    all routed experts of one layer, every matrix kind (what vLLM's fused MoE, exllamav3 and ModelOpt
    run: one setting per layer's experts), other modules on their own. A module without an expert (or
    without a layer) stays a unit of its own. `engine` adds that engine's ties
    (planner/engines.py); a unit is then a connected component of both partitions.
    """
    if granularity not in GRANULARITIES:
        raise InvalidInput(f"unknown granularity {granularity!r}; known: {list(GRANULARITIES)}")

    def key(i: int, m: Module):
        if granularity == "expert" and m.expert is not None:
            return ("expert", m.layer, m.expert)
        if granularity == "layer" and m.layer is not None:
            return ("layer", m.layer)
        if granularity == "layer_experts" and m.expert is not None:
            return ("layer_experts", m.layer)
        return ("module", i)

    ids: dict = {}
    unit = np.array([ids.setdefault(key(i, m), len(ids)) for i, m in enumerate(modules)], dtype=np.int64)
    return unit if engine == "bitplan" else _join(unit, tie_keys(modules, engine))


def _join(unit: np.ndarray, keys: list) -> np.ndarray:
    """Units merged wherever two modules share a key (union-find), renumbered in order of first appearance."""
    parent = list(range(int(unit.max()) + 1))

    def root(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    first: dict = {}
    for u, k in zip(unit.tolist(), keys):
        a, b = root(u), root(first.setdefault(k, u))
        parent[max(a, b)] = min(a, b)
    ids: dict = {}
    return np.array([ids.setdefault(root(u), len(ids)) for u in unit.tolist()], dtype=np.int64)


def problem_from_profile(profile: Profile, budget_bits: int, allowed: np.ndarray | None = None,
                         granularity: str = "module", *, latency_batch: int | None = None,
                         latency_budget: float | None = None,
                         objective: Objective | None = None,
                         engine: str = "bitplan") -> tuple[AllocationProblem, np.ndarray]:
    """The knapsack of a profile at `granularity`, and `unit [M]`: module m takes the option of unit[m].

    A unit's error, size (bits) and latency at an option are its modules' sums; it may take an option
    only where every member may (`allowed` per module, e.g. from pins). With `latency_batch`, the
    problem carries the profile's latencies at that batch (and `latency_budget`, seconds); `objective`
    replaces the error the allocator minimises (planner/latency.py).
    """
    if allowed is None:
        allowed = np.ones(profile.error.shape, dtype=bool)
    numel = np.array([m.numel for m in profile.modules], dtype=np.int64)
    unit = unit_of(profile.modules, granularity, engine)
    U = int(unit.max()) + 1
    lat = None if latency_batch is None else profile.latency[:, :, batch_index(profile, latency_batch)]
    objective = objective or Objective()
    timing = dict(latency_budget=latency_budget, objective=str(objective))
    if U == len(unit):  # one module per unit: the profile's own matrices
        return AllocationProblem(objective.matrix(profile.error, lat), profile.size_bits, allowed, budget_bits,
                                 numel, latency=lat, **timing), unit
    error = np.zeros((U, profile.error.shape[1]))
    size = np.zeros((U, profile.error.shape[1]), dtype=np.int64)
    banned = np.zeros((U, profile.error.shape[1]), dtype=np.int64)
    np.add.at(error, unit, profile.error)
    np.add.at(size, unit, profile.size_bits)
    if lat is not None:
        unit_lat = np.zeros((U, profile.error.shape[1]))
        np.add.at(unit_lat, unit, lat)
        error, lat = objective.matrix(error, unit_lat), unit_lat
    np.add.at(banned, unit, ~allowed)
    empty = np.flatnonzero((banned > 0).all(axis=1))
    if empty.size:
        names = [m.name for m, u in zip(profile.modules, unit.tolist()) if u == empty[0]]
        tied = granularity if engine == "bitplan" else f"{granularity} tied for the {engine} engine"
        raise InvalidInput(f"the pins leave no option every module of one {tied} may take: "
                           f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}")
    return AllocationProblem(error, size, banned == 0, budget_bits, np.bincount(unit, numel, U), latency=lat,
                             **timing), unit


def _smallest_plan(profile: Profile, problem: AllocationProblem) -> str:
    """What the smallest plan is, in words: one option everywhere, or each unit's smallest."""
    labels = {profile.options[o].label for o in problem.smallest_choice()}
    if len(labels) == 1:
        return f"all modules at {labels.pop()}"
    return "every module at its smallest allowed option"


def _infeasible(budget: Budget, profile: Profile, smallest_bits: int, what: str) -> InfeasibleBudget:
    need = budget.describe_bits(smallest_bits, profile.n_params, profile.fixed_bits)
    return InfeasibleBudget(f"budget {budget} is below the smallest feasible plan: {need} ({what}); "
                            f"ask for at least that", smallest_bits=smallest_bits)


def _verify(name: str, problem: AllocationProblem, choice: np.ndarray) -> np.ndarray:
    """The allocator's choice as [U] int64, or AllocatorBug if it is malformed, disallowed or over budget."""
    choice = np.asarray(choice)
    if choice.shape != (problem.n_units,) or not np.issubdtype(choice.dtype, np.integer):
        raise AllocatorBug(f"allocator {name!r} returned a choice of shape {choice.shape} {choice.dtype}, "
                           f"expected [{problem.n_units}] integers")
    choice = choice.astype(np.int64)
    if np.any((choice < 0) | (choice >= problem.n_options)):
        raise AllocatorBug(f"allocator {name!r} returned option indices outside [0, {problem.n_options})")
    bad = np.flatnonzero(~problem.allowed[np.arange(problem.n_units), choice])
    if bad.size:
        raise AllocatorBug(f"allocator {name!r} chose disallowed options for units {bad[:5].tolist()}")
    total = problem.total_size(choice)
    if total > problem.budget:
        raise AllocatorBug(f"allocator {name!r} returned {total} bits for a budget of {problem.budget} bits")
    if problem.latency_budget_ps is not None and problem.total_latency_ps(choice) > problem.latency_budget_ps:
        raise AllocatorBug(f"allocator {name!r} returned {problem.total_latency_ps(choice)} ps for a latency "
                           f"budget of {problem.latency_budget_ps} ps")
    return choice


def allocate(profile: Profile, request: PlanRequest, *, context=None) -> Plan:
    """Plan every module of `profile` as `request` asks (planner/request.py).

    `request.granularity` ties modules into units that share one option (`unit_of`).
    `context` goes to allocators that measure the model (`needs_context`, e.g. `evolutionary`: a
    `SearchContext` holding a fitness oracle over the profile's modules), with the module -> unit map;
    its `describe()` is recorded in `params["fitness"]`, so it is part of the plan's id.
    `latency_budget` (`8ms@batch1`) and `objective` (`error|latency|error+λ*latency`) need a profile
    with a latency table and the `ilp` allocator.  `engine` (`bitplan`, `vllm`, `llamacpp`:
    planner/engines.py) adds that engine's ties, allowed options and exact sizes.
    `budget_split="block"` gives every decoder block the same bits per weight, each solved on its own
    (MC-MoE's equal budgets per block: planner/blocks.py).  The plan's `params` lists the allocator's
    parameters and every setting that differs from the request's default, so a plan reads short.
    Every plan of a profile with a latency table records its latency at each of the table's batches.

    Raises InvalidInput (unknown allocator or parameter, bad budget or pin), UnknownModule (a pin
    matching nothing) or InfeasibleBudget (naming the smallest feasible budget in the budget's unit;
    InfeasibleLatency, a kind of it, for a latency budget below the fastest plan within the memory budget).
    """
    request = request.checked()
    if request.engine is None:
        request = request.model_copy(update={"engine": profile_engine(profile)})
    setup = _setup(profile, request)
    result, seconds = _solve(setup, request, context)
    return _plan(setup, request, context, result, seconds)


@dataclass(frozen=True)
class _Setup:
    """What `allocate` solves: the profile as the engine sees it, the knapsack, the module -> unit map."""

    profile: Profile
    budget: Budget
    budget_bits: int
    problem: AllocationProblem
    unit: np.ndarray
    latency_budget: LatencyBudget | None
    objective: Objective
    batch: int | None


def _setup(profile: Profile, request: PlanRequest) -> _Setup:
    """The budget in bits for the planned modules, pins and the engine's options as the allowed mask,
    modules tied into units; InfeasibleBudget when not even the smallest plan fits."""
    budget = Budget.parse(request.budget)
    allowed = apply_pins(profile.modules, profile.options, [parse_pin(p) for p in request.pins])
    # the engine's exact sizes (GGUF types) and allowed options; the error stays the profile's
    names = [m.name for m in profile.modules]
    profile, engine_allowed, _ = constrain(profile, request.engine)
    if len(profile.modules) != len(names):  # the engine leaves a module out of the plan (vLLM: the embedding)
        pos = {n: i for i, n in enumerate(names)}
        allowed = allowed[[pos[m.name] for m in profile.modules]]
    allowed &= engine_allowed
    budget_bits = budget.planned_bits(profile.n_params, profile.fixed_bits)
    latency_budget, objective, batch = planning_terms(profile, request.latency_budget, request.objective)
    problem, unit = problem_from_profile(profile, budget_bits, allowed, request.granularity, engine=request.engine,
                                         latency_batch=batch, latency_budget=latency_budget and latency_budget.seconds,
                                         objective=objective)
    # checked here once, so every allocator gets the same message
    if budget_bits < problem.smallest():
        raise _infeasible(budget, profile, problem.smallest(), _smallest_plan(profile, problem))
    return _Setup(profile, budget, budget_bits, problem, unit, latency_budget, objective, batch)


def _solve(setup: _Setup, request: PlanRequest, context) -> tuple[Assignment, float]:
    """The allocator's verified answer and its seconds; its own infeasibility (e.g. uniform's) is reported
    in the budget's unit as `allocate`'s is."""
    allocator, solve = request.allocator, lookup_allocator(request.allocator)
    problem, params = setup.problem, dict(request.params)
    t0 = time.perf_counter()
    try:
        if request.budget_split == "block":
            result = solve_per_block(problem, block_of_units(setup.profile.modules, setup.unit), solve,
                                     seed=request.seed, time_limit=request.time_limit, **params)
        else:
            extra = {"context": context, "unit": setup.unit} if needs_context(allocator) else {}
            result = solve(problem, seed=request.seed, time_limit=request.time_limit, **params, **extra)
    except InfeasibleLatency as e:
        lb = setup.latency_budget
        raise InfeasibleLatency(f"latency budget {lb} is below the fastest plan within {setup.budget}: "
                                f"{lb.describe(e.smallest_seconds)} at batch {lb.batch}; ask for at least that",
                                e.smallest_seconds) from e
    except InfeasibleBudget as e:
        what = ("equal bits per weight in every block" if request.budget_split == "block"
                else f"the smallest plan {allocator} can make")
        raise _infeasible(setup.budget, setup.profile, e.smallest_bits, what) from e
    seconds = time.perf_counter() - t0
    return Assignment(_verify(allocator, problem, result.choice), result.status, result.info), seconds


SEARCH_FACTS = ("tokens_used", "tokens_search", "tokens_heldout", "generations", "accepted", "kept_start",
                "fitness_kl", "start_fitness_kl", "heldout_kl", "start_heldout_kl", "best_heldout_generation",
                "search_seconds")


def _plan(setup: _Setup, request: PlanRequest, context, result: Assignment, seconds: float) -> Plan:
    """The Plan with its predictions (unit sums are module sums) and its content id."""
    profile, problem, unit, choice = setup.profile, setup.problem, setup.unit, result.choice
    params = dict(request.params)
    defaults = PlanRequest()
    for setting in ("granularity", "budget_split"):
        if getattr(request, setting) != getattr(defaults, setting):
            params[setting] = getattr(request, setting)
    if request.engine != "bitplan":  # `allocate` filled in the profile's; bitplan plans keep their ids
        params["engine"] = request.engine
    if needs_context(request.allocator) and hasattr(context, "describe"):
        params["fitness"] = context.describe()
    if needs_context(request.allocator):
        # what the search spent and found, kept with the plan (not part of its id: a resumed search is one)
        params["search"] = {k: result.info[k] for k in SEARCH_FACTS if k in result.info}
    if setup.latency_budget is not None:
        params["latency_budget"] = str(setup.latency_budget)
    if setup.objective.uses_latency:
        params.update(objective=str(setup.objective), objective_batch=setup.batch)
    total_bits = problem.total_size(choice)
    module_choice = choice[unit]
    predicted = (float(profile.error[np.arange(len(unit)), module_choice].sum()) if setup.objective.uses_latency
                 else problem.total_error(choice))
    return Plan(
        # the time limit stays out: a deadline on the solver, not a different question
        id=content_id(profile.id, request.model_dump(exclude={"time_limit"}), params.get("fitness"), prefix="plan-"),
        profile_id=profile.id, model=profile.model, budget=str(setup.budget), budget_bits=setup.budget_bits,
        allocator=request.allocator, params=params, pins=list(request.pins),
        assignment={m.name: profile.options[o] for m, o in zip(profile.modules, module_choice.tolist())},
        total_bits=total_bits, fixed_bits=profile.fixed_bits, n_params=profile.n_params,
        bits_per_weight=total_bits / profile.n_params, predicted_error=predicted, status=result.status,
        solve_seconds=seconds, predicted_latency=plan_latency(profile, module_choice),
        latency_source=profile.latency_source or None,
    )


def summarize(plan: Plan, profile: Profile | None = None) -> dict[str, dict[int, int]]:
    """Per-role bit histogram, role -> {bits: modules}; without the profile, roles come from the names."""
    roles = {m.name: m.role for m in profile.modules} if profile else {}
    hist: dict[str, Counter] = {}
    for name, option in plan.assignment.items():
        role = roles.get(name) if profile else name.rsplit(".", 1)[-1]
        hist.setdefault(role or "other", Counter())[option.bits] += 1
    return {role: dict(sorted(c.items())) for role, c in sorted(hist.items())}
