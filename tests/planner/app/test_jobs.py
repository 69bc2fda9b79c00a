"""Jobs and what keeps the service safe: allowed roots (403, symlinks too), params validated as the CLI
validates them (422), the lifecycle (queued -> running -> succeeded, cancelled, a killed worker's job
resumed or failed), server-sent progress; and `apply` refusing a model that is not the plan's."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bitplan.db.store import Store
from bitplan.db.types import InvalidInput, ModelRef, PathNotAllowed
from bitplan.planner.app.jobs import allowed_roots, inside_roots
from bitplan.planner.app.service import create_app
from bitplan.planner.app.worker import Worker, is_dead, worker_id
from bitplan.planner.plan import allocate
from bitplan.planner.request import PlanRequest


@pytest.fixture()
def roots(tmp_path):
    """An allowed root holding a model folder, a text file and a profile file, a folder outside it, and
    symlinks from inside to outside."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for d in (root / "models" / "m", outside / "secret"):
        d.mkdir(parents=True)
    (root / "calib.txt").write_text("hello")
    (outside / "secret.txt").write_text("secret")
    (root / "link-model").symlink_to(outside / "secret")
    (root / "link-text.txt").symlink_to(outside / "secret.txt")
    (root / "texts").mkdir()
    (root / "texts" / "a.txt").write_text("a")
    (root / "texts" / "b.txt").symlink_to(outside / "secret.txt")
    return root, outside


@pytest.fixture()
def client(tmp_path, roots, make_profile):
    url = str(tmp_path / "jobs.db")
    store = Store(url)
    profile = store.save_profile(make_profile())
    plan = store.save_plan(allocate(profile, PlanRequest(budget="3.5bpw", allocator="greedy")))
    (roots[0] / "profile.json").write_text(json.dumps(profile.to_dict()))
    with TestClient(create_app(url, token="", roots=str(roots[0]))) as c:
        yield c, store, plan


def test_roots_default_to_the_data_directory(monkeypatch, tmp_path):
    import platformdirs
    monkeypatch.delenv("BITPLAN_ROOTS", raising=False)
    assert allowed_roots() == (Path(platformdirs.user_data_dir("bitplan")).resolve(),)
    monkeypatch.setenv("BITPLAN_ROOTS", os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    assert allowed_roots() == ((tmp_path / "a").resolve(), (tmp_path / "b").resolve())


def test_inside_roots(roots):
    root, outside = roots
    r = (root,)
    assert inside_roots("models/m", "model", r) == str(root / "models" / "m")  # relative: to the first root
    assert inside_roots("smollm2-135m", "model", r, names=("smollm2-135m",)) == "smollm2-135m"
    assert inside_roots(str(root / "new" / "out"), "out", r) == str(root / "new" / "out")  # need not exist
    for bad in (str(outside / "secret"), str(root / "link-model"), "../outside/secret", str(root / "texts/*.txt")):
        with pytest.raises(PathNotAllowed, match="outside the folders"):
            inside_roots(bad, "model", r, pattern=True)
    assert inside_roots(str(root / "*.txt"), "text", r, pattern=False) == str(root / "*.txt")  # no glob: a name


FORBIDDEN = {
    "profile model": ("profile", {"model": "{outside}/secret"}),
    "profile model via symlink": ("profile", {"model": "{root}/link-model"}),
    "profile model via ..": ("profile", {"model": "{root}/models/../../outside/secret"}),
    "profile calib": ("profile", {"model": "{root}/models/m", "calib": "{outside}/secret.txt"}),
    "profile calib via symlink": ("profile", {"model": "{root}/models/m", "calib": "{root}/link-text.txt"}),
    "profile calib glob reaching a symlink": ("profile", {"model": "{root}/models/m", "calib": "{root}/texts/*.txt"}),
    "profile imatrix": ("profile", {"model": "{root}/models/m", "imatrix": "{outside}/secret.txt",
                                    "estimator": "imatrix"}),
    "plan profile_file": ("plan", {"profile_file": "{outside}/secret.txt"}),
    "compare profile_file": ("compare", {"profile_file": "{root}/link-text.txt", "budgets": "3bpw"}),
    "apply out": ("apply", {"plan": "{plan}", "out": "{outside}/quantized"}),
    "apply out via symlink": ("apply", {"plan": "{plan}", "out": "{root}/link-model/quantized"}),
    "eval checkpoint": ("eval", {"checkpoint": "{outside}/secret"}),
    "eval text": ("eval", {"checkpoint": "smollm2-135m", "text": "{outside}/secret.txt"}),
    "eval base": ("eval", {"checkpoint": "{root}/models/m", "base": "{root}/link-model"}),
}


def _fill(params: dict, roots, plan) -> dict:
    root, outside = roots
    return {k: v.format(root=root, outside=outside, plan=plan.id) if isinstance(v, str) else v
            for k, v in params.items()}


@pytest.mark.parametrize("case", FORBIDDEN, ids=list(FORBIDDEN))
def test_paths_outside_the_roots_are_403(client, roots, case):
    c, store, plan = client
    kind, params = FORBIDDEN[case]
    r = c.post("/v1/jobs", json={"kind": kind, "params": _fill(params, roots, plan)})
    assert r.status_code == 403, r.text
    assert "outside the folders" in r.json()["detail"]
    assert str(roots[1]) not in r.json()["detail"] or str(roots[1]) in json.dumps(params)  # no server path added
    assert store.list_jobs() == []


INVALID = {
    "unknown field in params": ("profile", {"model": "{root}/models/m", "tokenz": 10}, 422, "tokenz"),
    "typo in a plan field": ("plan", {"profile": "prof-synthetic", "budjet": "3bpw"}, 422, "budjet"),
    "unknown kind": ("quantize", {"model": "x"}, 422, "kind"),
    "missing model": ("profile", {"tokens": 10}, 422, "model"),
    "zero tokens": ("eval", {"checkpoint": "smollm2-135m", "tokens": 0}, 422, "tokens"),
    "bad budget": ("plan", {"profile": "prof-synthetic", "budget": "lots"}, 422, "3.5bpw"),
    "bad budgets": ("compare", {"profile": "prof-synthetic", "budgets": "nan:4:0.5"}, 422, "budget"),
    "bad options": ("profile", {"model": "{root}/models/m", "options": "2,7"}, 422, "7"),
    "both profile and file": ("plan", {"profile": "prof-synthetic", "profile_file": "{root}/profile.json"}, 422,
                              "one of them"),
    "unknown plan": ("apply", {"plan": "plan-nope", "out": "{root}/q"}, 404, "plan-nope"),
    "unknown format": ("apply", {"plan": "{plan}", "out": "{root}/q", "format": "onnx"}, 422, "format"),
    "unknown profile": ("plan", {"profile": "prof-nope"}, 404, "prof-nope"),
}


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_bad_params_are_refused_before_queueing(client, roots, case):
    c, store, plan = client
    kind, params, status, needle = INVALID[case]
    r = c.post("/v1/jobs", json={"kind": kind, "params": _fill(params, roots, plan)})
    assert r.status_code == status and needle in r.text, r.text
    assert store.list_jobs() == []
    assert len(r.content) < 3000 and "Traceback" not in r.text


def test_a_plan_job_runs_to_its_plan(client, roots):
    """submit -> queued; a worker runs it -> succeeded with the plan's id; events tell the same."""
    c, store, _ = client
    r = c.post("/v1/jobs", json={"kind": "plan", "params": {"profile_file": str(roots[0] / "profile.json"),
                                                            "budget": "3bpw", "allocator": "greedy"}})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and job["id"].startswith("job-")
    assert Worker(store.url, poll=0.01).run(once=True) == 1
    done = c.get(f"/v1/jobs/{job['id']}").json()
    assert (done["state"], done["progress"], done["attempts"]) == ("succeeded", 1.0, 1), done
    plan = c.get(f"/v1/plans/{done['result_id']}").json()
    assert plan["budget"] == "3bpw" and plan["allocator"] == "greedy"
    events = c.get(f"/v1/jobs/{job['id']}/events").text
    assert events.startswith("event: progress\ndata: ") and json.loads(events.split("data: ")[-1])["state"] == "succeeded"
    assert c.get("/v1/jobs").json()["items"][0]["id"] == job["id"]


def test_compare_and_eval_params_reach_their_use_cases(client, roots):
    c, store, _ = client
    ids = [c.post("/v1/jobs", json={"kind": "compare", "params": {"profile": "prof-synthetic", "budgets": "3bpw,4bpw",
                                                                  "allocators": "greedy,uniform"}}).json()["id"],
           c.post("/v1/jobs", json={"kind": "apply", "params": {"plan": store.list_plans()[0].id,
                                                                "out": str(roots[0] / "q")}}).json()["id"]]
    Worker(store.url, poll=0.01).run(once=True)
    compare, apply = (store.get_job(i) for i in ids)
    assert compare["state"] == "succeeded" and len(compare["result"]["rows"]) == 4
    # the synthetic profile names no model: the job fails with the use case's one-line reason
    assert apply["state"] == "failed" and apply["error"] and "Traceback" not in apply["error"]


def test_pages_of_jobs(client):
    c, store, _ = client
    ids = [store.create_job("plan", {}) for _ in range(5)]
    got, cursor = [], None
    while True:
        page = c.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        got += [j["id"] for j in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
    assert sorted(got) == sorted(ids) and len(got) == 5
    assert "params" not in page["items"][0]
    assert c.get("/v1/jobs", params={"state": "running"}).json()["items"] == []


def test_cancel(client):
    c, store, _ = client
    id = c.post("/v1/jobs", json={"kind": "plan", "params": {"profile": "prof-synthetic"}}).json()["id"]
    assert c.post(f"/v1/jobs/{id}/cancel").json()["state"] == "cancelled"
    assert Worker(store.url, poll=0.01).run(once=True) == 0  # a cancelled job is never claimed
    r = c.post(f"/v1/jobs/{id}/cancel")
    assert r.status_code == 409 and "cancelled already" in r.text
    assert c.post("/v1/jobs/job-nope/cancel").status_code == 404
    running = store.create_job("plan", {})
    store.claim_job("elsewhere:1:")
    assert c.post(f"/v1/jobs/{running}/cancel").json()["cancel_requested"] is True


def test_two_workers_never_claim_one_job(tmp_path):
    store = Store(str(tmp_path / "claim.db"))
    ids = {store.create_job("plan", {}) for _ in range(30)}
    other = Store(store.url)
    claimed = []
    for _ in range(20):
        for s, w in ((store, "a:1:"), (other, "b:2:")):
            job = s.claim_job(w)
            if job:
                claimed.append(job["id"])
    assert sorted(claimed) == sorted(ids)


DEAD = "nohost-but-this:999999:"  # no such pid on this host


def test_a_dead_workers_job_is_resumed_then_failed(tmp_path):
    store = Store(str(tmp_path / "dead.db"))
    dead = f"{worker_id().split(':')[0]}:{2**22 + 12345}:1"  # this host, a pid that cannot run
    assert is_dead(dead) and not is_dead(worker_id())
    id = store.create_job("plan", {})
    store.claim_job(dead)
    worker = Worker(store.url, lease=3600)
    assert worker.recover() == [id]
    job = store.get_job(id)
    assert job["state"] == "queued" and "resumed" in job["message"]
    store.claim_job(dead)
    assert worker.recover() == [id]
    job = store.get_job(id)
    assert job["state"] == "failed" and "2 attempts" in job["error"]


def test_a_silent_worker_loses_its_job_after_its_lease(tmp_path):
    store = Store(str(tmp_path / "lease.db"))
    id = store.create_job("plan", {})
    store.claim_job("another-host:1:")  # alive for all this host knows: only the lease tells
    assert Worker(store.url, lease=3600).recover() == []
    assert Worker(store.url, lease=0).recover() == [id]
    assert store.heartbeat_job(id, "another-host:1:") is None  # it learns that the job is no longer its own


def _submit_profile(c, checkpoint, text) -> str:
    r = c.post("/v1/jobs", json={"kind": "profile", "params": {
        "model": str(checkpoint), "calib": str(text), "tokens": 256, "seq_len": 64, "estimator": "hessian",
        "quantizer": "rtn", "options": "2,4"}})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _wait(store, id, states, seconds=120):
    deadline = time.monotonic() + seconds
    while (job := store.get_job(id))["state"] not in states:
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    return job


def _worker_process(url: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONSAFEPATH="1")
    return subprocess.Popen([sys.executable, "-m", "bitplan.planner.app.cli", "worker", "--db", url, "-q"], env=env)


def test_profile_job_killed_then_resumed(tmp_path, tiny_checkpoint, text_file):
    """kill -9 of the worker while it profiles: a new worker resumes the job and it succeeds."""
    url = str(tmp_path / "kill.db")
    store = Store(url)
    with TestClient(create_app(url, token="", roots=str(tmp_path.parent))) as c:
        id = _submit_profile(c, tiny_checkpoint, text_file)
        proc = _worker_process(url)
        _wait(store, id, ("running",))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        worker = Worker(url, lease=3600, poll=0.01)
        assert worker.recover() == [id]
        assert worker.run(once=True) == 1
        job = store.get_job(id)
        assert (job["state"], job["attempts"]) == ("succeeded", 2), job
        assert store.get_profile(job["result_id"]).estimator == "hessian"


def test_a_running_job_is_cancelled(tmp_path, tiny_checkpoint, text_file):
    url = str(tmp_path / "cancel.db")
    store = Store(url)
    with TestClient(create_app(url, token="", roots=str(tmp_path.parent))) as c:
        r = c.post("/v1/jobs", json={"kind": "profile", "params": {
            "model": str(tiny_checkpoint), "calib": str(text_file), "tokens": 4096, "seq_len": 64,
            "estimator": "kl", "quantizer": "rtn"}})
        id = r.json()["id"]
        proc = _worker_process(url)
        try:
            _wait(store, id, ("running",))
            time.sleep(1)
            assert c.post(f"/v1/jobs/{id}/cancel").json()["cancel_requested"]
            job = _wait(store, id, ("cancelled", "succeeded", "failed"))
            assert job["state"] == "cancelled", job
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


# ------------------------------------------------------------------------------ apply's fingerprint


@pytest.fixture()
def foreign_plan(tiny_checkpoint, make_profile):
    """A plan whose profile measured a model of fingerprint 0123456789abcdef at the tiny checkpoint's path."""
    profile = make_profile()
    plan = allocate(profile, PlanRequest(budget="3.5bpw", allocator="greedy"))
    return plan.model_copy(update={"model": ModelRef(name="tiny", fingerprint="0123456789abcdef",
                                                     source=str(tiny_checkpoint))})


def test_apply_refuses_another_model(tmp_path, foreign_plan, store):
    from bitplan.planner.app.usecases import run_apply
    from bitplan.planner.app.workspace import Workspace

    with pytest.raises(InvalidInput, match="fingerprint") as e:
        run_apply(Workspace(store, progress=False), foreign_plan, tmp_path / "out")
    assert "0123456789abcdef" in str(e.value) and str(e.value).count("fingerprint") >= 2
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out*")) == []


def test_apply_cli_refuses_another_model(tmp_path, foreign_plan, run_cli):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(foreign_plan.to_dict()))
    code, _, err = run_cli("apply", str(plan_file), "--out", str(tmp_path / "out"), "--db", str(tmp_path / "c.db"), "-q")
    assert code == 2 and "0123456789abcdef" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


# ------------------------------------------------------------------------------ one GPU job per device


def test_jobs_that_load_a_model_on_a_gpu_take_turns(monkeypatch, tmp_path):
    import tempfile
    import threading
    import types

    import torch

    from bitplan.planner.app import worker

    def job(kind, **params):
        return {"id": f"job-{kind}", "kind": kind, "params": params}

    assert worker.uses_gpu(job("profile", model="m"), cuda=True)
    assert not worker.uses_gpu(job("profile", model="m", device="cpu"), cuda=True)
    assert not worker.uses_gpu(job("profile", model="m"), cuda=False)
    assert worker.uses_gpu(job("plan", allocator="evolutionary"), cuda=True)
    assert not worker.uses_gpu(job("plan", allocator="ilp"), cuda=True)
    assert worker.uses_gpu(job("compare", evaluate=True), cuda=True)
    assert not worker.uses_gpu(job("compare", evaluate=False), cuda=True)

    # a host with one GPU: the second job waits until the first is done
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid=f"test-{i}"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the lock file is this test's own
    first_in, release, order = threading.Event(), threading.Event(), []

    def first():
        with worker.device_lock(job("eval", checkpoint="c")):
            order.append("first in")
            first_in.set()
            release.wait(10)
            order.append("first out")

    def second():
        first_in.wait(10)
        with worker.device_lock(job("apply", plan="p", out="o")):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    first_in.wait(10)
    time.sleep(0.3)
    assert order == ["first in"]  # the second is waiting for the device
    release.set()
    for t in threads:
        t.join(10)
    assert order == ["first in", "first out", "second in"]
    with worker.device_lock(job("plan", allocator="ilp")):  # no model, no lock: runs beside anything
        pass


def _finished_apply(store, plan, out: Path, state: str = "succeeded") -> str:
    id = store.create_job("apply", {"plan": plan.id, "out": str(out)})
    store.claim_job("w:1:")
    store.finish_job(id, "w:1:", state, result_id=plan.id, result={"checkpoint": str(out)})
    return id


def test_an_apply_jobs_checkpoint_downloads(client, roots, tmp_path):
    """A folder comes as a tar of every file, byte for byte; a .gguf file as it is; nothing before the job
    has succeeded (409), of another kind of job, or once the output is gone (404); outside the roots 403."""
    import io
    import tarfile

    c, store, plan = client
    folder = roots[0] / "exports" / "q"
    (folder / "sub").mkdir(parents=True)
    files = {"model.safetensors": os.urandom(3 * 2**20 + 7), "config.json": b'{"a": 1}', "sub/x.txt": b"x"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    r = c.get(f"/v1/jobs/{_finished_apply(store, plan, folder)}/output")
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    assert r.headers["content-disposition"] == 'attachment; filename="q.tar"'
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert got == {f"q/{name}": data for name, data in files.items()}

    gguf = roots[0] / "exports" / "m.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(1000))
    r = c.get(f"/v1/jobs/{_finished_apply(store, plan, gguf)}/output")
    assert r.status_code == 200 and r.content == gguf.read_bytes() and 'filename="m.gguf"' in r.headers["content-disposition"]

    queued = store.create_job("apply", {"plan": plan.id, "out": str(folder)})
    assert c.get(f"/v1/jobs/{queued}/output").status_code == 409
    store.cancel_job(queued)
    assert c.get(f"/v1/jobs/{_finished_apply(store, plan, folder, 'failed')}/output").status_code == 409
    other = store.create_job("plan", {})
    store.claim_job("w:1:")
    store.finish_job(other, "w:1:", "succeeded")
    r = c.get(f"/v1/jobs/{other}/output")
    assert r.status_code == 404 and "only apply jobs" in r.json()["detail"]
    outside = roots[1] / "secret"
    r = c.get(f"/v1/jobs/{_finished_apply(store, plan, outside)}/output")
    assert r.status_code == 403 and str(roots[1]) not in r.text
    gone = _finished_apply(store, plan, roots[0] / "exports" / "gone")
    r = c.get(f"/v1/jobs/{gone}/output")
    assert r.status_code == 404 and "run the apply again" in r.json()["detail"]
    assert c.get("/v1/jobs/job-nope/output").status_code == 404


def test_server_info_names_the_roots(client, roots):
    c, _, _ = client
    info = c.get("/v1/server").json()
    assert info["roots"] == [str(roots[0].resolve())] and info["database"] == "sqlite"
    assert "gguf" in info["export_formats"] and info["version"]
