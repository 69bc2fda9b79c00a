"""Profiles fanned out over a local Ray cluster (`--ray`): the same tables, the same ids, the same plans.

Ray itself runs here (`ray.init(num_cpus=2)`: two workers of one torch thread, as this process runs while
they do), installed by `make setup` with the `ray` extra.
"""

import subprocess
import sys

import numpy as np
import pytest
import ray
import torch

from bitplan.db.types import Quantizer, parse_options
from bitplan.planner.plan import allocate
from bitplan.planner.request import PlanRequest
from bitplan.profiler.cluster import RAY_ENV, Cluster
from bitplan.profiler.model import load_model
from bitplan.profiler.profile import profile_model


@pytest.fixture(scope="module")
def cluster():
    # workers run the driver's torch threads: with one, the two CPUs are two workers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield Cluster("local")
    ray.shutdown()
    torch.set_num_threads(threads)


def test_workers_take_the_drivers_threads(cluster):
    assert cluster.workers("cpu") == (2, 1, {"num_cpus": 1})
    torch.set_num_threads(2)
    try:
        assert cluster.workers("cpu") == (1, 2, {"num_cpus": 2})
    finally:
        torch.set_num_threads(1)


def _both(loaded, cluster, text_file, **kw):
    kw = dict(calib=str(text_file), n_tokens=512, seq_len=64, progress=False, embeddings="plan") | kw
    return (profile_model(loaded, parse_options("2,3,4,8"), **kw),
            profile_model(loaded, parse_options("2,3,4,8"), cluster=cluster, **kw))


@pytest.mark.parametrize("estimator,quantizer", [("calibrated", "gptq"), ("hessian", "gptq"), ("kl", "rtn"),
                                                 ("fisher", "rtn")])
def test_a_profile_on_the_cluster_is_the_one_made_here(loaded, cluster, text_file, estimator, quantizer):
    alone, fanned = _both(loaded, cluster, text_file, estimator=estimator, quantizer=Quantizer.parse(quantizer))
    assert fanned.id == alone.id
    np.testing.assert_array_equal(fanned.error, alone.error)
    assert (alone.error[:, 0] > 0).all()  # a real table: every module measured at 2 bits
    assert fanned.estimated == alone.estimated
    for budget in ("3.0bpw", "4.5bpw"):
        a, b = (allocate(p, PlanRequest(budget=budget, allocator="ilp")) for p in (alone, fanned))
        assert (b.id, b.assignment) == (a.id, a.assignment)


def test_an_moe_profile_on_the_cluster_is_the_one_made_here(moe_checkpoint, cluster, text_file):
    # routed experts: each one's H over its own tokens, the KL points' routing counts from a worker's base pass
    loaded = load_model(str(moe_checkpoint("mixtral")))
    alone, fanned = _both(loaded, cluster, text_file, estimator="calibrated", quantizer=Quantizer.parse("gptq"))
    np.testing.assert_array_equal(fanned.error, alone.error)
    assert fanned.modules == alone.modules  # with their routing statistics
    assert any(m.tokens_routed for m in fanned.modules)
    assert fanned.estimated == alone.estimated


def test_parse_reads_the_variable_and_off(monkeypatch):
    monkeypatch.setenv(RAY_ENV, "10.0.0.5:6379")
    assert Cluster.parse(None) == Cluster("10.0.0.5:6379")
    assert Cluster.parse("off") is None  # --ray off wins over the variable
    monkeypatch.delenv(RAY_ENV)
    assert Cluster.parse(None) is None


@pytest.mark.parametrize("value,says", [("nonsense", "host:port"), ("127.0.0.1:1", "cannot reach")])
def test_a_cluster_that_cannot_be_used_is_one_line_before_any_work(value, says, tiny_checkpoint, db):
    # Ray itself would retry an unreachable head for minutes
    r = subprocess.run([sys.executable, "-m", "bitplan.planner.app.cli", "profile", str(tiny_checkpoint),
                        "--ray", value, "--tokens", "64"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert says in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_the_evolutionary_search_on_the_cluster_takes_the_same_path(loaded, cluster, text_file):
    # each worker holds the model and scores the candidates handed to it, the parent recorded on every worker
    from bitplan.planner.allocators.evolutionary import SearchContext
    from bitplan.profiler.fitness import ClusterFitness, kl_fitness_for_profile

    profile = profile_model(loaded, parse_options("2,3,4,8"), calib=str(text_file), n_tokens=512, seq_len=64,
                            progress=False, estimator="fisher", quantizer=Quantizer.parse("gptq"))
    request = PlanRequest(budget="3.0bpw", allocator="evolutionary", params={"generations": 3, "offspring": 4})
    plans = []
    for where in (None, cluster):
        with kl_fitness_for_profile(loaded, profile, fitness_tokens=256, heldout_tokens=128, row_tokens=32,
                                    cluster=where) as oracle:
            assert isinstance(oracle, ClusterFitness) == (where is not None)
            plans.append(allocate(profile, request, context=SearchContext(oracle)))
    alone, fanned = plans
    assert (fanned.id, fanned.assignment) == (alone.id, alone.assignment)
    assert fanned.params["search"]["fitness_kl"] == alone.params["search"]["fitness_kl"]
    assert fanned.params["search"]["heldout_kl"] == alone.params["search"]["heldout_kl"]
    # every worker records each generation's parent: more tokens than one process, and said so
    assert fanned.params["search"]["tokens_used"] > alone.params["search"]["tokens_used"]


def test_a_service_worker_runs_its_profile_jobs_on_the_cluster(cluster, tiny_checkpoint, text_file, tmp_path,
                                                                monkeypatch):
    # `bitplan serve --ray` hands its workers the cluster; a profile job then fans out, with the same profile
    from bitplan.db.store import Store
    from bitplan.planner.app.worker import Worker
    from bitplan.profiler import profile as prof

    seen = []
    real = prof.profile_model
    monkeypatch.setattr(prof, "profile_model", lambda *a, **kw: seen.append(kw["cluster"]) or real(*a, **kw))
    params = {"model": str(tiny_checkpoint), "calib": str(text_file), "tokens": 256, "seq_len": 64,
              "estimator": "hessian", "quantizer": "gptq", "options": "2,4"}
    ids = []
    for where, db in ((None, "alone.db"), (cluster, "fanned.db")):
        store = Store(str(tmp_path / db))
        id = store.create_job("profile", params)
        assert Worker(store.url, poll=0.01, cluster=where).run(once=True) == 1
        job = store.get_job(id)
        assert job["state"] == "succeeded", job
        ids.append(store.find(job["result_id"])[1])
        store.close()
    assert seen == [None, cluster]
    alone, fanned = ids
    assert fanned.id == alone.id
    np.testing.assert_array_equal(fanned.error, alone.error)
