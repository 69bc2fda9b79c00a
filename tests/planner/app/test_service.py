"""The HTTP service over a real socket: uvicorn on 127.0.0.1, requests from an HTTP client."""

import json
import socket
import time

import httpx
import pytest

from bitplan.db.store import Store
from bitplan.planner.app.service import create_app


@pytest.fixture()
def server(tmp_path, make_profile, live_server):
    """A live server over a store holding one synthetic profile; yields (base URL, store)."""
    url = str(tmp_path / "svc.db")
    store = Store(url)
    store.save_profile(make_profile())
    with live_server(create_app(url, token="")) as base:
        yield base, store


def test_create_read_list(server):
    base, store = server
    with httpx.Client(base_url=base, timeout=30) as c:
        r = c.post("/v1/plans", json={"profile_id": "prof-synthetic", "budget": "3.5bpw", "allocator": "ilp"})
        assert r.status_code == 201, r.text
        plan = r.json()
        assert plan["bits_per_weight"] <= 3.5 and plan["status"] == "optimal"
        assert c.get(f"/v1/plans/{plan['id']}").json() == plan
        assert store.get_plan(plan["id"]).to_dict() == plan
        page = c.get("/v1/plans", params={"profile_id": "prof-synthetic"}).json()
        assert [p["id"] for p in page["items"]] == [plan["id"]] and page["next_cursor"] is None
        assert "assignment" not in page["items"][0]  # a summary: the assignment is one GET away
        assert page["items"][0]["size_mib"] == pytest.approx(plan["size_mib"])
        assert c.get("/v1/plans", params={"profile_id": "prof-other"}).json() == {"items": [], "next_cursor": None}
        profiles = c.get("/v1/profiles").json()["items"]
        assert [p["id"] for p in profiles] == ["prof-synthetic"] and profiles[0]["n_modules"] == 211
        assert "modules" not in profiles[0]
        assert c.get("/v1/profiles/prof-synthetic").json()["format"] == "bitplan.profile/2"
        assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200


def test_pages_walk_every_plan_once(server):
    base, store = server
    budgets = [f"{b / 4}bpw" for b in range(10, 17)]  # 7 plans
    with httpx.Client(base_url=base, timeout=30) as c:
        made = {c.post("/v1/plans", json={"profile_id": "prof-synthetic", "budget": b, "allocator": "greedy"}).json()["id"]
                for b in budgets}
        seen, cursor, pages = [], None, 0
        while True:
            page = c.get("/v1/plans", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
            seen += [p["id"] for p in page["items"]]
            pages, cursor = pages + 1, page["next_cursor"]
            if cursor is None:
                break
        assert pages == 3 and sorted(seen) == sorted(made) and len(seen) == len(made)
        assert seen == [p.id for p in store.list_plans()]  # newest first, as the store lists them
        for bad in ({"limit": 0}, {"limit": 10_000}, {"cursor": "not-a-cursor"}):
            r = c.get("/v1/plans", params=bad)
            assert r.status_code == 422, (bad, r.text)


BAD = {
    "unknown plan": ("get", "/v1/plans/plan-nope", None, 404, "plan-nope"),
    "unknown profile": ("post", "/v1/plans", {"profile_id": "prof-nope"}, 404, "prof-nope"),
    "bad budget": ("post", "/v1/plans", {"profile_id": "prof-synthetic", "budget": "lots"}, 422, "3.5bpw"),
    "infeasible": ("post", "/v1/plans", {"profile_id": "prof-synthetic", "budget": "1bpw"}, 422, "smallest"),
    "bad allocator": ("post", "/v1/plans", {"profile_id": "prof-synthetic", "allocator": "magic"}, 422, "magic"),
    "unknown pin": ("post", "/v1/plans", {"profile_id": "prof-synthetic", "pins": ["model.decoder.*=8"]}, 422, "model.decoder"),
    "missing field": ("post", "/v1/plans", {"budget": "3bpw"}, 422, "profile_id"),
    "unknown field": ("post", "/v1/plans", {"profile_id": "prof-synthetic", "budjet": "3bpw"}, 422, "budjet"),
    "overflowing budget": ("post", "/v1/plans", {"profile_id": "prof-synthetic", "budget": "1e400bpw"}, 422,
                           "too large"),
    "gigabits": ("post", "/v1/plans", {"profile_id": "prof-synthetic", "budget": "40Gb"}, 422, "reads as bits"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_requests(server, case):
    base, store = server
    method, path, body, status, needle = BAD[case]
    with httpx.Client(base_url=base, timeout=30) as c:
        r = c.request(method, path, json=body)
    assert r.status_code == status and needle in json.dumps(r.json())
    assert store.list_plans() == []
    assert str(store.engine.url.database) not in r.text  # the server's paths are not the client's business


def test_plans_solved_in_processes(tmp_path, make_profile):
    """What `bitplan serve` runs: the solve in a process of its own, a library error back as its status."""
    from fastapi.testclient import TestClient
    url = str(tmp_path / "p.db")
    Store(url).save_profile(make_profile())
    with TestClient(create_app(url, token="", solve_in="processes", solvers=1)) as c:
        r = c.post("/v1/plans", json={"profile_id": "prof-synthetic", "budget": "3bpw"})
        assert r.status_code == 201 and Store(url).get_plan(r.json()["id"]).budget == "3bpw"
        r = c.post("/v1/plans", json={"profile_id": "prof-synthetic", "budget": "1bpw"})
        assert r.status_code == 422 and "smallest" in r.json()["detail"]
        r = c.post("/v1/plans", json={"profile_id": "prof-nope"})
        assert r.status_code == 404 and str(tmp_path) not in r.text


def test_a_bad_body_is_not_echoed(server):
    base, _ = server
    with httpx.Client(base_url=base, timeout=30) as c:
        r = c.post("/v1/plans", json={"profile_id": "prof-synthetic", "pins": 12345, "junk": "x" * 100_000})
    assert r.status_code == 422 and len(r.content) < 2_000 and "junk" in r.text


def test_bearer_token(tmp_path):
    from fastapi.testclient import TestClient
    app = create_app(str(tmp_path / "t.db"), token="s3cret")
    with TestClient(app) as c:
        assert c.get("/v1/profiles").status_code == 401
        assert c.get("/v1/profiles", headers={"Authorization": "Bearer s3cre"}).status_code == 401
        assert c.get("/v1/profiles", headers={"Authorization": "Bearer s3cret"}).json()["items"] == []
        assert c.get("/openapi.json").status_code == 200  # the docs are no secret


def _raw(port: int, head: str, body: bytes = b"", *, wait: float = 5.0) -> tuple[int, bytes, float]:
    """Send `head` (and `body`) on a socket; the status, the answer, and the seconds it took to come."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        t0 = time.perf_counter()
        s.sendall(head.encode() + body)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return int(answer.split(b" ", 2)[1]), answer, time.perf_counter() - t0


@pytest.fixture()
def guarded(tmp_path, make_profile, live_server):
    """A live server with a token and a 64 KiB body limit; yields its port."""
    url = str(tmp_path / "g.db")
    Store(url).save_profile(make_profile())
    with live_server(create_app(url, token="s3cret", max_body=65536)) as base:
        yield int(base.rsplit(":", 1)[1])


GUARD = {
    # the body is announced but never sent: an answer at all shows the headers alone decided it
    "no token, body never sent": ("Content-Length: 10000000\r\n", None, b"", 401),
    "wrong token, body never sent": ("Content-Length: 10000000\r\n", "Bearer wrong", b"", 401),
    "too long by Content-Length": ("Content-Length: 10000000\r\n", "Bearer s3cret", b"", 413),
    "too long, streamed": ("Transfer-Encoding: chunked\r\n", "Bearer s3cret",
                           b"".join(b"%x\r\n%s\r\n" % (8192, b"x" * 8192) for _ in range(20)) + b"0\r\n\r\n", 413),
    "bad Content-Length": ("Content-Length: lots\r\n", "Bearer s3cret", b"", 400),
}


@pytest.mark.parametrize("case", GUARD, ids=list(GUARD))
def test_token_and_size_before_the_body(guarded, case):
    length, auth, body, status = GUARD[case]
    head = (f"POST /v1/plans HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{length}"
            + (f"Authorization: {auth}\r\n" if auth else "") + "\r\n")
    got, answer, seconds = _raw(guarded, head, body)
    assert got == status and seconds < 4, answer[:300]
    assert b"detail" in answer or status == 400


def test_a_body_under_the_limit_passes(guarded):
    with httpx.Client(base_url=f"http://127.0.0.1:{guarded}", timeout=30,
                      headers={"Authorization": "Bearer s3cret"}) as c:
        r = c.post("/v1/plans", json={"profile_id": "prof-synthetic", "budget": "3.5bpw"})
        assert r.status_code == 201, r.text
        def chunks():  # streamed without a Content-Length, under the limit
            yield json.dumps({"profile_id": "prof-synthetic", "budget": "3bpw"}).encode()
        r = c.post("/v1/plans", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 201, r.text
        r = c.post("/v1/plans", json={"profile_id": "prof-synthetic", "pins": ["x" * 70_000]})
        assert r.status_code == 413 and "send less" in r.text


def test_every_route_documents_its_response(tmp_path):
    """/openapi.json gives a schema for every route's success response, and the error shape for 4xx."""
    spec = create_app(str(tmp_path / "o.db"), token="").openapi()
    routes = [(path, method, op) for path, ops in spec["paths"].items() for method, op in ops.items()]
    assert len(routes) == 15
    for path, method, op in routes:
        ok = next(v for k, v in op["responses"].items() if k.startswith("2"))
        if path.endswith("/output"):  # a checkpoint: bytes
            assert ok["content"]["application/x-tar"]["schema"] == {"type": "string", "format": "binary"}
        else:
            content = ok["content"].get("application/json") or ok["content"]["text/event-stream"]
            assert content["schema"].get("$ref"), (method, path, content)
        assert {"401", "404", "413", "422"} <= set(op["responses"]), (method, path)
    pages = [k for k in spec["components"]["schemas"] if k.startswith("Page")]
    assert len(pages) == 4 and all("next_cursor" in spec["components"]["schemas"][k]["properties"] for k in pages)
    assert "assignment" not in spec["components"]["schemas"]["PlanSummary"]["properties"]
    plan = spec["components"]["schemas"]["PlanDocument"]["properties"]
    assert {"assignment", "bits_per_weight", "size_mib", "status"} <= set(plan)
    body = spec["components"]["schemas"]["PlanBody"]
    assert body.get("additionalProperties") is False and "profile_id" in body["required"]


def test_profile_validation_ranks_predicted_against_measured(tmp_path, make_profile):
    """Spearman's rho per evaluation text, over each plan's newest bitplan evaluation: 1.0 where the
    measured KL keeps the predicted order, scipy's value where one pair is swapped; fewer than 3 plans
    give none."""
    from fastapi.testclient import TestClient
    from scipy.stats import spearmanr

    from bitplan.db.types import Evaluation
    from bitplan.planner.plan import allocate
    from bitplan.planner.request import PlanRequest

    store = Store(str(tmp_path / "v.db"))
    profile = store.save_profile(make_profile())
    plans = sorted((store.save_plan(allocate(profile, PlanRequest(budget=f"{b}bpw", allocator="greedy")))
                    for b in (2.5, 3.0, 3.5, 4.0, 5.0)), key=lambda p: p.predicted_error)
    assert len({p.predicted_error for p in plans}) == 5

    def evaluate(plan, corpus, kl, ppl, engine="bitplan"):
        store.save_evaluation(Evaluation(plan_id=plan.id, checkpoint="c", corpus=corpus, n_tokens=8, window=8,
                                         perplexity=ppl, kl_divergence=kl, engine=engine))

    for i, p in enumerate(plans):
        evaluate(p, "a", kl=10.0 + i, ppl=20.0 + i)           # superseded below
        evaluate(p, "a", kl=float(i), ppl=30.0 + [0, 2, 1, 3, 4][i])
        evaluate(p, "b", kl=5.0 - i, ppl=9.0, engine="llamacpp")  # not bitplan's evaluator: left out
    for p in plans[:2]:
        evaluate(p, "c", kl=1.0, ppl=2.0)
    with TestClient(create_app(store.url, token="")) as c:
        v = c.get(f"/v1/profiles/{profile.id}/validation").json()
        assert c.get("/v1/profiles/prof-nope/validation").status_code == 404
    assert (v["n_plans"], v["n_evaluated"]) == (5, 5)
    a, cc = v["texts"]
    assert (a["corpus"], a["n_plans"], a["spearman_kl"]) == ("a", 5, 1.0)
    want = spearmanr([p.predicted_error for p in plans], [30, 32, 31, 33, 34]).statistic
    assert a["spearman_perplexity"] == pytest.approx(want, abs=1e-4) and want < 1
    assert (cc["corpus"], cc["n_plans"], cc["spearman_kl"], cc["spearman_perplexity"]) == ("c", 2, None, None)
