"""The evolutionary allocator: budget kept by every candidate, determinism, resuming, the additive
optimum, and the real KL fitness on a tiny Llama (variants, replay, token counts, held-out report)."""

import copy
import json

import numpy as np
import pytest

from bitplan.db.types import InfeasibleBudget, InvalidInput
from bitplan.planner import synthetic
from bitplan.planner.allocators import dp, evolutionary as evo, ilp, uniform
from bitplan.planner.plan import allocate, problem_from_profile
from bitplan.planner.request import PlanRequest
from bitplan.planner.problem import AllocationProblem

FAST = {"generations": 6, "offspring": 6, "patience": None}


def small_problem(seed: int) -> AllocationProblem:
    """random_problem's masks and ties on odd seeds, strictly convex curves at a random budget on even."""
    if seed % 2:
        return synthetic.random_problem(seed)
    p = synthetic.convex_problem(seed)
    budget = int(np.random.default_rng(seed).integers(p.smallest(), p.largest() + 1))
    return AllocationProblem(p.error, p.size, p.allowed, budget)


class Checked(evo.AdditiveOracle):
    """An additive oracle that fails the test on any candidate over budget or disallowed."""

    def __init__(self, problem, **kw):
        super().__init__(problem, **kw)
        self.seen = 0

    def _score(self, choice, rows):
        p = self.problem
        assert p.total_size(choice) <= p.budget, "a candidate over budget"
        assert p.allowed[np.arange(p.n_units), choice].all(), "a disallowed candidate"
        self.seen += 1
        return super()._score(choice, rows)


# ------------------------------------------------------------------------------------ the search


@pytest.mark.parametrize("seed", range(12), ids=lambda s: f"seed{s}")
def test_every_candidate_within_budget_and_allowed(seed):
    p = small_problem(1000 + seed)
    oracle = Checked(p, noise=0.05 * p.error.std(), seed=seed)
    a = evo.solve(p, seed=seed, context=oracle, start="uniform" if seed % 3 else "ilp", **FAST)
    assert oracle.seen > 0
    assert p.total_size(a.choice) <= p.budget and p.allowed[np.arange(p.n_units), a.choice].all()
    assert a.status.startswith("heuristic")


def test_infeasible_and_tight_budgets():
    p = synthetic.random_problem(7)
    with pytest.raises(InfeasibleBudget):
        tight = AllocationProblem(p.error, p.size, p.allowed, p.smallest() - 1)
        evo.solve(tight, context=evo.AdditiveOracle(tight))
    tight = AllocationProblem(p.error, p.size, p.allowed, p.smallest())
    a = evo.solve(tight, context=Checked(tight), **FAST)
    assert tight.total_size(a.choice) == tight.smallest()


def test_needs_an_oracle_and_sane_parameters(make_profile):
    p = synthetic.random_problem(3)
    with pytest.raises(InvalidInput, match="needs the model"):
        evo.solve(p)
    with pytest.raises(InvalidInput, match="needs the model"):
        allocate(make_profile(n_layers=2), PlanRequest(budget="3.5bpw", allocator="evolutionary"))
    with pytest.raises(InvalidInput, match="survivors"):
        evo.solve(p, context=evo.AdditiveOracle(p), survivors=[1, 2])
    with pytest.raises(InvalidInput, match="stage_tokens"):
        evo.solve(p, context=evo.AdditiveOracle(p, n_rows=2), stage_tokens=[64, 1024])


def test_same_seed_same_result():
    p = synthetic.convex_problem(5, U=12, O=5)
    p = AllocationProblem(p.error, p.size, p.allowed, (p.smallest() + p.largest()) // 2)
    runs = [evo.solve(p, seed=s, context=evo.AdditiveOracle(p, noise=0.5, seed=1), start="uniform", **FAST)
            for s in (3, 3)]
    np.testing.assert_array_equal(runs[0].choice, runs[1].choice)
    drop = ("search_seconds",)
    assert {k: v for k, v in runs[0].info.items() if k not in drop} == \
        {k: v for k, v in runs[1].info.items() if k not in drop}


def test_resumed_search_equals_an_uninterrupted_one(tmp_path):
    p = synthetic.convex_problem(11, U=12, O=5)
    p = AllocationProblem(p.error, p.size, p.allowed, (p.smallest() + p.largest()) // 2)
    kw = {"seed": 4, "offspring": 6, "patience": None, "start": "uniform"}

    def oracle():
        return evo.AdditiveOracle(p, noise=0.3, seed=2)

    whole = evo.solve(p, generations=8, context=oracle(), **kw)
    state = tmp_path / "search.json"
    first = evo.solve(p, generations=3, context=evo.SearchContext(oracle(), state), **kw)
    assert json.loads(state.read_text())["generation"] == 3 and first.info["generations"] == 3
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, then renamed
    resumed = evo.solve(p, generations=8, context=evo.SearchContext(oracle(), state), **kw)
    np.testing.assert_array_equal(resumed.choice, whole.choice)
    for k in ("generations", "history", "fitness_kl", "heldout_kl", "start_heldout_kl", "tokens_used",
              "tokens_search", "tokens_heldout", "accepted"):
        assert resumed.info[k] == whole.info[k], k
    # another search must not pick this state up
    with pytest.raises(InvalidInput, match="another search"):
        evo.solve(p, generations=8, context=evo.SearchContext(oracle(), state), **{**kw, "offspring": 5})


def test_state_file_is_one_line_of_json_with_sorted_keys(tmp_path):
    """The resumable state's file format: one line, keys sorted, the fields a resumed search reads."""
    p = synthetic.convex_problem(6, U=8, O=4)
    p = AllocationProblem(p.error, p.size, p.allowed, (p.smallest() + p.largest()) // 2)
    state = tmp_path / "search.json"
    evo.solve(p, generations=2, offspring=4, patience=None,
              context=evo.SearchContext(evo.AdditiveOracle(p, noise=0.1), state))
    text = state.read_text()
    assert text.count("\n") == 1 and text.endswith("\n")
    stored = json.loads(text)
    assert list(stored) == sorted(stored) and stored["format"] == evo.STATE_FORMAT == "bitplan.evolutionary/2"
    assert set(stored) == {"format", "key", "generation", "start", "start_status", "parent", "best", "tokens",
                           "heldout_tokens", "start_heldout", "heldout", "best_heldout", "best_generation",
                           "stale", "accepted", "seconds", "history"}
    assert stored["generation"] == len(stored["history"]) == 2


@pytest.mark.parametrize("seed", range(20), ids=lambda s: f"seed{s}")
def test_from_ilp_on_the_additive_error_stays_optimal(seed):
    p = small_problem(seed)
    a = evo.solve(p, seed=seed, context=evo.AdditiveOracle(p), **FAST)
    opt = p.total_error(dp.solve(p).choice)
    assert p.total_error(a.choice) == pytest.approx(opt, rel=1e-9, abs=1e-12)
    assert a.info["fitness_kl"] <= a.info["start_fitness_kl"]


def test_from_uniform_reaches_the_dp_optimum_on_small_problems():
    """A local search: never worse than its start, and at the exact optimum on nearly every small problem."""
    reached, n = 0, 30
    for seed in range(n):
        p = small_problem(seed)
        a = evo.solve(p, seed=seed, context=evo.AdditiveOracle(p), start="uniform", generations=40,
                      offspring=8, patience=10)
        err, opt = p.total_error(a.choice), p.total_error(dp.solve(p).choice)
        assert err <= p.total_error(uniform.solve(p).choice) + 1e-12
        reached += err <= opt + 1e-9 * max(1.0, abs(opt))
    assert reached >= 0.85 * n


def test_noisy_fitness_never_returns_worse_than_the_start_on_the_whole_pool():
    p = synthetic.convex_problem(2, U=10, O=5)
    p = AllocationProblem(p.error, p.size, p.allowed, (p.smallest() + p.largest()) // 2)
    a = evo.solve(p, context=evo.AdditiveOracle(p, noise=5 * p.error.std(), seed=3), **FAST)
    assert a.info["fitness_kl"] <= a.info["start_fitness_kl"]
    assert np.isfinite(a.info["heldout_kl"]) and np.isfinite(a.info["start_heldout_kl"])


def test_a_plan_worse_on_held_out_text_gives_back_the_start():
    """Fitness rewards leaving the start (its pool is fooled), held-out text punishes it: the start wins."""
    p = synthetic.convex_problem(4, U=10, O=5)
    p = AllocationProblem(p.error, p.size, p.allowed, (p.smallest() + p.largest()) // 2)
    start = ilp.solve(p).choice

    class Fooled(evo.AdditiveOracle):
        def fitness_rows(self, choice, rows):  # `fitness` is their mean
            self.tokens_used += len(rows) * self.row_tokens
            return [-float((choice != start).sum())] * len(rows)

        def heldout(self, choice):
            self.tokens_used += self.heldout_rows * self.row_tokens
            return float((choice != start).sum())

    a = evo.solve(p, context=Fooled(p), **FAST)
    assert a.info["accepted"] > 0 and a.info["kept_start"]
    assert np.array_equal(a.choice, start) and a.info["heldout_kl"] == a.info["start_heldout_kl"]


def test_the_result_is_the_best_held_out_parent_not_the_last():
    """Fitness keeps rewarding moves away from the start; held-out text rates the first two parents after
    the start better and every later one worse: the result is the second, however far the search went on."""
    p = synthetic.convex_problem(4, U=10, O=5)
    p = AllocationProblem(p.error, p.size, p.allowed, (p.smallest() + p.largest()) // 2)
    start = ilp.solve(p).choice
    rated = []  # every parent held-out text saw, in order (the start first)

    class Overfits(evo.AdditiveOracle):
        def fitness_rows(self, choice, rows):
            self.tokens_used += len(rows) * self.row_tokens
            return [-float((choice != start).sum())] * len(rows)

        def heldout(self, choice):
            self.tokens_used += self.heldout_rows * self.row_tokens
            rated.append(choice.copy())
            return [5.0, 3.0, 1.0][len(rated) - 1] if len(rated) <= 3 else float(len(rated))

    a = evo.solve(p, context=Overfits(p), **{**FAST, "patience": None, "generations": 8})
    assert len(rated) > 4 and a.info["last_heldout_kl"] > a.info["best_heldout_kl"] == 1.0
    assert a.info["heldout_kl"] == 1.0 and not a.info["kept_start"] and a.info["best_heldout_generation"] > 0
    assert np.array_equal(a.choice, rated[2]) and not np.array_equal(a.choice, rated[-1])


def test_allocate_ties_units_and_records_the_oracle(make_profile):
    profile = make_profile(n_layers=3)
    modules, _ = problem_from_profile(profile, 10**12)  # the oracle scores module choices
    ctx = evo.SearchContext(evo.AdditiveOracle(modules, noise=1e-3))
    plan = allocate(profile, PlanRequest(budget="3.2bpw", allocator="evolutionary", granularity="layer", params={"generations": 3, "offspring": 4}), context=ctx)
    assert plan.total_bits <= plan.budget_bits and plan.status.startswith("heuristic")
    for layer in range(3):
        assert len({o for n, o in plan.assignment.items() if n.startswith(f"model.layers.{layer}.")}) == 1
    assert plan.params["fitness"]["oracle"] == "additive" and plan.params["generations"] == 3
    search = plan.params["search"]  # what the search spent, kept with the plan
    assert search["tokens_used"] >= search["tokens_search"] + search["tokens_heldout"] > 0
    assert search["generations"] == 3


# ------------------------------------------------------------------------ the real KL fitness


def tiny(seed: int = 0):
    """A random 2-layer Llama (vocab 300), its planned linears, options and token rows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitplan.db.types import parse_options
    from bitplan.profiler.model import planned_linears

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    fit, held = torch.randint(0, 300, (4, 32), generator=g), torch.randint(0, 300, (2, 32), generator=g)
    return model, planned_linears(model), parse_options("2,3,4,8"), fit, held


def test_variants_are_the_quantizer_s_and_the_cache_is_bounded():
    import torch

    from bitplan.kernels.quantize import quantize_dequantize
    from bitplan.profiler.fitness import VariantStore

    _, planned, options, _, _ = tiny()
    weights = [lin.weight.data for _, lin in planned]
    store = VariantStore(weights, options, cache_mib=0.1)
    for m in (0, 5, 13):
        for o, opt in enumerate(options):
            assert torch.equal(store.weight(m, o), quantize_dequantize(weights[m], opt))
    assert store.cache_bytes <= 0.1 * 2**20 or len(store.cache) == 1
    n = store.quantized
    store.weight(0, 0)  # evicted long ago: dequantized again from its codes, never re-quantized
    assert store.quantized == n == 12
    # packed: about bits/8 bytes a weight (plus scales and zeros), not an int32 a code
    numel = sum(weights[m].numel() for m in (0, 5, 13))
    assert store.packed_bytes() < numel * (2 + 3 + 4 + 8) / 8 * 1.3


def test_kl_fitness_equals_whole_model_passes_with_and_without_replay(direct_kl):
    from bitplan.kernels.quantize import quantize_dequantize
    from bitplan.profiler.fitness import KLFitness

    model, planned, options, fit, held = tiny()
    rng = np.random.default_rng(0)
    parent = rng.integers(0, 4, len(planned))
    kid = parent.copy()
    kid[10] = (kid[10] + 1) % 4  # a module of block 1: the replay skips block 0
    quantized = copy.deepcopy(model)
    for (m, _), o in zip(planned, kid):
        lin = quantized.get_submodule(m.name)
        lin.weight.data = quantize_dequantize(lin.weight.data, options[o])
    with KLFitness(model, planned, options, fit, held) as oracle:
        cold = oracle.fitness(kid, [1, 2])
        oracle.prepare(parent, [0, 1, 2])
        blocks = oracle.forward_blocks
        warm = oracle.fitness(kid, [1, 2])
        assert oracle.forward_blocks - blocks == 2 * 1  # two rows, block 1 only
        held_kl = oracle.heldout(kid)
    want = direct_kl(model, quantized, fit[[1, 2]])
    assert cold == pytest.approx(want, rel=1e-4) and warm == pytest.approx(want, rel=1e-4)
    assert held_kl == pytest.approx(direct_kl(model, quantized, held), rel=1e-4)
    # closed: the model has its own weights back
    assert all(lin.weight.data_ptr() == W.data_ptr() for (_, lin), W in zip(planned, oracle.original))


def test_search_on_the_kl_fitness_counts_tokens_and_reports_held_out():
    import torch

    from bitplan.profiler.fitness import KLFitness

    model, planned, options, fit, held = tiny(1)
    size = np.array([[o.size_bits(*m.shape) for o in options] for m, _ in planned])
    error = size[:, ::-1] * 1e-6  # a crude estimator: only the ilp start and the move order use it
    p = AllocationProblem(error, size, np.ones(size.shape, dtype=bool), int(size[:, 1].sum() * 1.1))
    fed = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kw: fed.append(int((args[0] if args else kw["input_ids"]).numel())),
        with_kwargs=True)
    with KLFitness(model, planned, options, fit, held) as oracle:
        fed.clear()  # the base pass, made when the oracle was built
        a = evo.solve(p, context=oracle, generations=3, offspring=4, stage_tokens=[32, 64, 128],
                      patience=None)
    hook.remove()
    info = a.info
    assert info["tokens_used"] == sum(fed) == oracle.tokens_used
    assert info["tokens_used"] == info["tokens_search"] + info["tokens_heldout"] + info["tokens_report"]
    assert info["tokens_base"] == fit.numel() + held.numel()
    assert info["fitness_kl"] <= info["start_fitness_kl"]
    assert 0 <= info["heldout_kl"] < 10 and 0 <= info["start_heldout_kl"] < 10
    assert p.total_size(a.choice) <= p.budget
    assert torch.is_tensor(planned[0][1].weight)


@pytest.fixture(scope="module")
def tiny_profile(loaded, text_file):
    """The tiny Llama's profile (default estimator and quantizer, 128 calibration tokens), made once here."""
    from bitplan.db.types import parse_options
    from bitplan.profiler.profile import profile_model

    return profile_model(loaded, parse_options("2,3,4,8"), calib=str(text_file), n_tokens=128, seq_len=64,
                         progress=False)


def test_plan_cli_loads_the_profile_s_model_and_resumes(tiny_profile, tmp_path):
    from bitplan.db.store import Store
    from bitplan.planner.app.cli import main

    db = f"sqlite:///{tmp_path / 'bitplan.db'}"
    profile = Store(db).save_profile(tiny_profile)
    state = tmp_path / "state.json"
    args = ["plan", profile.id, "--allocator", "evolutionary", "--budget", "3.5bpw", "--generations", "2",
            "--offspring", "3", "--search-state", str(state), "--db", db, "-q", "--json"]
    assert main(args) == 0
    assert json.loads(state.read_text())["generation"] == 2
    plan = Store(db).list_plans()[0]  # newest first
    assert plan.allocator == "evolutionary" and plan.status.startswith("heuristic (KL fitness")
    assert plan.total_bits <= plan.budget_bits and plan.params["fitness"]["skip_tokens"] == 128


def test_the_fitness_pool_is_the_size_asked_and_a_bad_size_is_refused(tiny_profile, tmp_path, capsys):
    """--fitness-tokens / --heldout-tokens size the oracle's pools (recorded in the plan); a pool the text
    cannot give, a size that is no number, or an oracle of other sizes is refused in one line."""
    from bitplan.db.store import Store
    from bitplan.planner.app.cli import main
    from bitplan.planner.app.usecases import run_plan
    from bitplan.planner.app.workspace import Workspace
    from bitplan.profiler.fitness import KLFitness

    db = f"sqlite:///{tmp_path / 'bitplan.db'}"
    profile = Store(db).save_profile(tiny_profile)
    base = ["plan", profile.id, "--allocator", "evolutionary", "--budget", "3.5bpw", "--generations", "1",
            "--offspring", "2", "--db", db, "-q", "--json"]
    assert main(base + ["--fitness-tokens", "256", "--heldout-tokens", "128"]) == 0
    plan = Store(db).list_plans()[0]
    assert plan.params["fitness_tokens"] == 256 and plan.params["heldout_tokens"] == 128
    assert (plan.params["fitness"]["fitness_tokens"], plan.params["fitness"]["heldout_tokens"]) == (256, 128)
    capsys.readouterr()
    assert main(base + ["--fitness-tokens", str(10**9)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
    assert last.startswith("error:") and "fitness_tokens + heldout_tokens" in last and "or fewer" in last
    class NoLoad(Workspace):
        def model_of(self, *args, **kw):
            raise AssertionError("the model was loaded before the request was checked")

    with pytest.raises(InvalidInput, match="positive whole number"):
        run_plan(NoLoad(Store(db)), profile.id, PlanRequest(budget="3.5bpw", allocator="evolutionary",
                                                            params={"fitness_tokens": "many"}))
    assert len(Store(db).list_plans()) == 1  # nothing stored by the refusals

    model, planned, options, fit, held = tiny(1)
    size = np.array([[o.size_bits(*m.shape) for o in options] for m, _ in planned])
    p = AllocationProblem(size[:, ::-1] * 1e-6, size, np.ones(size.shape, dtype=bool), int(size[:, 1].sum()))
    with KLFitness(model, planned, options, fit, held) as oracle:
        with pytest.raises(InvalidInput, match="build it with fitness_tokens"):
            evo.solve(p, context=oracle, generations=1, fitness_tokens=fit.numel() * 2)


def test_compare_runs_the_search_beside_the_additive_allocators(tiny_profile, tmp_path):
    """`bitplan compare --allocators ilp,evolutionary --evaluate`: one model for the searches and the
    evaluation, every plan within budget, the search's parameters in its plan, and refused without it."""
    from bitplan.db.store import Store
    from bitplan.db.types import InvalidInput
    from bitplan.planner.app.cli import main
    from bitplan.planner.app.usecases import run_compare
    from bitplan.planner.app.workspace import Workspace

    db = f"sqlite:///{tmp_path / 'bitplan.db'}"
    profile = Store(db).save_profile(tiny_profile)
    out = tmp_path / "cmp.json"
    args = ["compare", profile.id, "--allocators", "ilp,evolutionary", "--budgets", "3bpw,4bpw", "--generations",
            "2", "--offspring", "3", "--evaluate", "--eval-tokens", "128", "--db", db, "-q", "--output", str(out)]
    assert main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["budget"], r["allocator"]) for r in rows] == [
        (b, a) for b in ("3bpw", "4bpw") for a in ("ilp", "evolutionary")]
    for r in rows:
        plan = Store(db).get_plan(r["plan_id"])
        assert plan.total_bits <= plan.budget_bits and r["kl"] >= 0 and r["perplexity"] > 1
        if r["allocator"] == "evolutionary":
            assert plan.status.startswith("heuristic (KL fitness") and plan.params["generations"] == 2
    with pytest.raises(InvalidInput, match="evolutionary allocator"):
        run_compare(Workspace(Store(db)), profile.id, "3bpw", ["ilp"], PlanRequest(params={"generations": 2}))


def test_the_final_contest_spends_reserve_rows_only_where_it_is_close():
    """A clear contest is decided on the stage's rows; a close one draws reserve rows, and so picks the
    truly better side more often than one look at the stage's rows does."""
    from bitplan.planner.allocators.evolutionary.search import race

    p = synthetic.convex_problem(4, U=10, O=5)
    parent = ilp.solve(AllocationProblem(p.error, p.size, p.allowed, (p.smallest() + p.largest()) // 2)).choice
    child = parent.copy()
    child[0] = (child[0] + 1) % p.n_options
    gap = abs(p.total_error(child) - p.total_error(parent))
    rows, reserve = [0, 1, 2, 3], list(range(4, 64))
    clear = evo.AdditiveOracle(p, n_rows=64, noise=gap / 100)
    assert race(clear, child, parent, rows, reserve)[0] == (p.total_error(child) < p.total_error(parent))
    assert clear.tokens_used == 2 * len(rows) * clear.row_tokens
    right = {}
    for name, spare in (("racing", reserve), ("stage rows only", [])):
        decided = [race(evo.AdditiveOracle(p, n_rows=64, noise=2 * gap, seed=s), child, parent, rows, spare)[0]
                   for s in range(200)]
        right[name] = np.mean([d == (p.total_error(child) < p.total_error(parent)) for d in decided])
    assert right["racing"] > right["stage rows only"] + 0.1, right


def test_a_stage_passes_on_no_child_that_is_already_clearly_worse():
    """`cut` keeps the best `keep` by mean, less those more than 2 standard errors worse than the best,
    paired by row: under small noise a clearly worse child stops there while one equal to the best goes on
    (nearly always: a 2-sigma rule); under noise larger than the gaps every one of the `keep` goes on; on
    one row there is no error to judge by."""
    from bitplan.planner.allocators.evolutionary.search import cut

    truth = np.array([1.0, 1.0, 1.5, 2.0, 3.0])  # the first two equal: they differ by the noise alone
    kept, loud_kept = [], []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        row_effect = rng.normal(0, 1.0, 8)  # text difficulty: shared by every candidate on a row
        quiet = truth[:, None] + row_effect + rng.normal(0, 0.005, (5, 8))
        kept.append(sorted(cut(quiet, 4)))
        loud = truth[:, None] + row_effect + rng.normal(0, 3.0, (5, 8))
        loud_kept.append(len(cut(loud, 4)))
        one_row = quiet[:, :1]
        assert cut(one_row, 3) == [int(j) for j in np.argsort(one_row[:, 0], kind="stable")[:3]]
    assert all(k in ([0, 1], [0], [1]) for k in kept)  # never a clearly worse one
    assert np.mean([k == [0, 1] for k in kept]) > 0.85
    assert np.mean(loud_kept) > 3.5


def test_cutting_clearly_worse_children_spends_fewer_tokens_for_the_same_result():
    """On a quiet additive oracle the search takes the same path with and without the cut (the children it
    drops were beaten anyway) and spends fewer tokens on the stages."""
    from bitplan.planner.allocators.evolutionary import search

    p = small_problem(4)
    params = dict(generations=5, offspring=8, stage_tokens=[128, 256, 512], patience=None, start="uniform")
    with_cut = evo.solve(p, context=evo.AdditiveOracle(p, noise=1e-9, n_rows=16), **params)
    keep_all = search.cut
    try:
        search.cut = lambda scores, keep, z=0: [int(j) for j in np.argsort(scores.mean(axis=1), kind="stable")[:keep]]
        without = evo.solve(p, context=evo.AdditiveOracle(p, noise=1e-9, n_rows=16), **params)
    finally:
        search.cut = keep_all
    assert np.array_equal(with_cut.choice, without.choice)
    assert with_cut.info["tokens_search"] < without.info["tokens_search"]
