"""The HTTP service over a real socket: uvicorn on 127.0.0.1, requests from an HTTP client."""

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from bitplan.db.store import Store
from bitplan.planner.app.service import create_app



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path, make_profile):
    """A live server over a store holding one synthetic profile; yields (base URL, store)."""
    url = str(tmp_path / "svc.db")
    store = Store(url)
    store.save_profile(make_profile())
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(url, token=""), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", store
    srv.should_exit = True
    thread.join(timeout=10)


def test_create_read_list(server):
    base, store = server
    with httpx.Client(base_url=base, timeout=30) as c:
        r = c.post("/v1/plans", json={"profile_id": "prof-synthetic", "budget": "3.5bpw", "allocator": "ilp"})
        assert r.status_code == 201, r.text
        plan = r.json()
        assert plan["bits_per_weight"] <= 3.5 and plan["status"] == "optimal"
        assert c.get(f"/v1/plans/{plan['id']}").json() == plan
        assert store.get_plan(plan["id"]).to_dict() == plan
        assert [p["id"] for p in c.get("/v1/plans", params={"profile_id": "prof-synthetic"}).json()] == [plan["id"]]
        assert c.get("/v1/plans", params={"profile_id": "prof-other"}).json() == []
        profiles = c.get("/v1/profiles").json()
        assert [p["id"] for p in profiles] == ["prof-synthetic"] and profiles[0]["n_modules"] == 211
        assert c.get("/v1/profiles/prof-synthetic").json()["format"] == "bitplan.profile/2"
        assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200


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
        assert c.get("/v1/profiles", headers={"Authorization": "Bearer s3cret"}).json() == []


def test_every_route_documents_its_response(tmp_path):
    """/openapi.json gives a schema for every route's success response, and the error shape for 4xx."""
    spec = create_app(str(tmp_path / "o.db"), token="").openapi()
    routes = [(path, method, op) for path, ops in spec["paths"].items() for method, op in ops.items()]
    assert len(routes) == 6
    for path, method, op in routes:
        ok = next(v for k, v in op["responses"].items() if k.startswith("2"))
        schema = ok["content"]["application/json"]["schema"]
        assert schema.get("$ref") or schema.get("items", {}).get("$ref"), (method, path, schema)
        assert {"404", "422"} <= set(op["responses"]), (method, path)
    plan = spec["components"]["schemas"]["PlanDocument"]["properties"]
    assert {"assignment", "bits_per_weight", "size_mib", "status"} <= set(plan)
    body = spec["components"]["schemas"]["PlanBody"]
    assert body.get("additionalProperties") is False and "profile_id" in body["required"]
