"""The service under load and under kill -9, on loopback only (127.0.0.1), bounded in time.

Burst: `bitplan serve` over a fresh SQLite file holding the synthetic SmolLM2-shaped profile (211
modules); `--plans` concurrent `POST /v1/plans` (distinct budgets, allocators ilp / greedy / closed_form),
while a separate process sends `GET`s (a profile page, a plan page, one plan) one after another.
Reported: errors, lost writes (every 201's plan read back from the database, and the count of
stored plans), POST latency p50/p99, GET latency p50/p99/max during the burst and idle before it.

Faults: `--kills` cycles, alternating an apply job and a profile job of a small random Llama (built from
a transformers config with a fixed seed, its own byte-level BPE tokenizer trained here: nothing is
downloaded), each killed with SIGKILL once it runs: the whole server (its workers die with it) on
even cycles, the worker alone on odd ones; then the server restarted (or left to replace its worker).
Checked after each: the job's end state (succeeded after a resume, or failed with a reason), that no
temporary folder (`.NAME.tmp-PID`, `.NAME.old-PID`), temporary file or unfinished profile work is left,
that an apply's output is whole (it holds its plan) or absent, and `PRAGMA integrity_check`.

    python bench/service.py                 # 300 plans, 20 kill cycles (about 10 minutes on 2 cores)
    python bench/service.py --quick         # 40 plans, 2 kill cycles

On PostgreSQL, several replicas: `--db postgresql://USER@HOST:PORT/DB --replicas 2` runs each burst on a
new database of that server (made and dropped by the run: the user needs CREATEDB), served by two
`bitplan serve` processes on two ports, the POSTs sent to each in turn and the GETs to the first; the
plans are read back from the database.  The kill -9 cycles keep their SQLite file.

    python bench/service.py --db postgresql://bitplan@127.0.0.1:5433/postgres --replicas 2 --skip-faults \
        --out bench/results/service_postgres.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
import harness  # bench/harness.py

harness.leave_sys_path()

import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import httpx  # noqa: E402

HOST = "127.0.0.1"  # loopback only
ALLOCATORS = ("ilp", "greedy", "closed_form")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


class Server:
    """`bitplan serve` in a process of its own (a session of its own: kill -9 reaches it alone)."""

    def __init__(self, db: Path | str, root: Path, *, workers: int, log: Path, solve_in: str | None = None):
        self.db, self.root, self.workers, self.log, self.solve_in = db, root, workers, log, solve_in
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> Server:
        env = dict(os.environ, BITPLAN_ROOTS=str(self.root), PYTHONSAFEPATH="1", BITPLAN_TOKEN="")
        if self.solve_in:
            env["BITPLAN_SOLVE_IN"] = self.solve_in
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "bitplan.planner.app.cli", "serve", "--db",
                                          str(self.db), "--host", HOST, "--port", str(self.port), "--workers",
                                          str(self.workers), "-q"], env=env, stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/openapi.json", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: see {self.log}")
            time.sleep(0.2)

    def workers_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(x) for x in out.split()]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------------------------------ burst


def probe(url: str, out: str, stop_file: str) -> None:
    """`--probe`: GETs one after another until `stop_file` exists; their latencies (s) to `out`."""
    rows = []
    with httpx.Client(base_url=url, timeout=60) as c:
        plan_id = None
        while not os.path.exists(stop_file):
            for path in ("/v1/profiles", "/v1/plans?limit=20", f"/v1/plans/{plan_id}" if plan_id else None):
                if path is None:
                    continue
                t0 = time.perf_counter()
                r = c.get(path)
                rows.append({"t": time.time(), "path": path.split("?")[0].rsplit("/", 1)[0] if plan_id and
                             path.startswith("/v1/plans/") else path.split("?")[0],
                             "seconds": time.perf_counter() - t0, "status": r.status_code})
                if path.startswith("/v1/plans?") and r.status_code == 200 and r.json()["items"]:
                    plan_id = r.json()["items"][0]["id"]
    Path(out).write_text(json.dumps(rows))


def fresh_database(server_url: str | None, work: Path, name: str) -> tuple[str, Callable[[], None]]:
    """A new, empty database and the call that removes it: a SQLite file under `work`, or, given a
    PostgreSQL server's URL, a database made on that server (never one that holds data already)."""
    if not server_url:
        return str(work / f"{name}.db"), lambda: None
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(server_url).set(drivername="postgresql+psycopg")
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    db = f"bitplan_bench_{name}_{os.getpid()}".replace("-", "_")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()

    return url.set(database=db).render_as_string(hide_password=False), drop


def burst(n_plans: int, work: Path, solve_in: str, *, db_server: str | None = None, replicas: int = 1) -> dict:
    from bitplan.db.store import Store
    from bitplan.planner import synthetic

    db, drop = fresh_database(db_server, work, f"burst-{solve_in}")
    store = Store(db)
    store.save_profile(synthetic.synthetic_profile())
    store.close()
    servers = [Server(db, work, workers=0, log=work / f"burst-server-{i}.log", solve_in=solve_in)
               for i in range(replicas)]
    for s in servers:
        s.start()
    server = servers[0]
    try:
        # one plan first: the solvers have started and imported what they need before the burst
        httpx.post(f"{server.url}/v1/plans", json={"profile_id": "prof-synthetic", "budget": "4.5bpw"}, timeout=120)
        idle = _probe_for(server.url, work / f"idle-{solve_in}", seconds=3.0)
        stop_file = work / f"burst-{solve_in}.stop"
        probe_out = work / f"probe-{solve_in}.json"
        prober = subprocess.Popen([sys.executable, __file__, "--probe", server.url, str(probe_out), str(stop_file)])
        time.sleep(1.0)  # the prober has its first GETs in before the burst
        t0 = time.time()
        posts = asyncio.run(_post_all([s.url for s in servers], n_plans))
        t1 = time.time()
        stop_file.write_text("")
        prober.wait(timeout=120)
        gets = json.loads(probe_out.read_text())
    finally:
        for s in servers:
            s.stop()
    during = [g for g in gets if t0 <= g["t"] <= t1]
    ok = [p for p in posts if p["status"] == 201]
    store = Store(db)
    stored = {p.id for p in store.list_plans()} - {p.id for p in store.list_plans() if p.budget == "4.5bpw"}
    lost = [p["id"] for p in ok if p["id"] not in stored]
    store.close()
    drop()
    post_s = [p["seconds"] for p in posts]
    get_s = [g["seconds"] for g in during]
    return {
        "db": "postgresql" if db_server else "sqlite", "replicas": replicas,
        "solve_in": solve_in, "plans": n_plans, "seconds": round(t1 - t0, 2), "post_errors": len(posts) - len(ok),
        "error_statuses": sorted({p["status"] for p in posts if p["status"] != 201}),
        "lost_writes": len(lost), "distinct_plans_stored": len(stored),
        "post_p50_s": pct(post_s, 50), "post_p99_s": pct(post_s, 99), "post_max_s": max(post_s),
        "gets_during": len(get_s), "get_errors": sum(g["status"] != 200 for g in during),
        "get_p50_s": pct(get_s, 50), "get_p99_s": pct(get_s, 99), "get_max_s": max(get_s) if get_s else None,
        "idle_get_p50_s": pct(idle, 50), "idle_get_p99_s": pct(idle, 99),
    }


def _probe_for(url: str, stem: Path, seconds: float) -> list[float]:
    stop_file, out = stem.with_suffix(".stop"), stem.with_suffix(".json")
    p = subprocess.Popen([sys.executable, __file__, "--probe", url, str(out), str(stop_file)])
    time.sleep(seconds)
    stop_file.write_text("")
    p.wait(timeout=60)
    return [g["seconds"] for g in json.loads(out.read_text())]


async def _post_all(urls: list[str], n: int) -> list[dict]:
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        async def one(i: int) -> dict:
            body = {"profile_id": "prof-synthetic", "budget": f"{2.5 + 1.5 * i / n:.4f}bpw",
                    "allocator": ALLOCATORS[i % len(ALLOCATORS)]}
            t0 = time.perf_counter()
            try:
                r = await c.post(f"{urls[i % len(urls)]}/v1/plans", json=body)
                status, id = r.status_code, (r.json().get("id") if r.status_code == 201 else None)
            except httpx.HTTPError as e:
                status, id = type(e).__name__, None
            return {"status": status, "id": id, "seconds": time.perf_counter() - t0}
        return await asyncio.gather(*(one(i) for i in range(n)))


# ----------------------------------------------------------------------------------------- faults


WORDS = ("the king queen lord lady speak love death night day sword crown heart grief honour fair foul thou thee "
         "thy art doth hath shall will come go now here there what why when where how").split()


def small_model(root: Path) -> Path:
    """A 4-layer random Llama (hidden 256) with a byte-level BPE tokenizer trained on generated text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                     for _ in range(3000))
    (root / "calib.txt").write_text(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    out = root / "tiny-llama"
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def wait_for(c: httpx.Client, job: str, states: tuple[str, ...], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            j = c.get(f"/v1/jobs/{job}").json()
            if j["state"] in states:
                return j
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job} not {states} after {timeout} s")
        time.sleep(0.1)


def leftovers(root: Path, db: Path) -> list[str]:
    """Temporary folders and files under the root, and unfinished profile work beside the database."""
    found = [str(p.relative_to(root)) for p in root.rglob(".*") if ".tmp" in p.name or ".old-" in p.name]
    work = db.with_name(db.name + ".work")
    if work.exists():
        found += [f"work/{p.name}" for p in work.iterdir() if p.is_dir() and p.name.startswith("prof-")]
    return sorted(found)


def profile_params(model: Path, root: Path, i: int) -> dict:
    # settings differ per cycle (tokens), so that each profile job measures afresh instead of reusing one
    return {"model": str(model), "calib": str(root / "calib.txt"), "tokens": 512 + 64 * i, "seq_len": 64,
            "estimator": "hessian", "quantizer": "rtn", "options": "2,3,4,8"}


def faults(n: int, work: Path, seed: int) -> list[dict]:
    rng = random.Random(seed)
    root = work / "root"
    root.mkdir()
    db = work / "faults.db"
    model = small_model(root)
    server = Server(db, root, workers=1, log=work / "faults-server.log").start()
    rows = []
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            # the profile and plan that the apply jobs apply
            job = c.post("/v1/jobs", json={"kind": "profile", "params": profile_params(model, root, -1)}).json()
            profile_id = wait_for(c, job["id"], ("succeeded",), 600)["result_id"]
            plan_id = c.post("/v1/plans", json={"profile_id": profile_id, "budget": "3.5bpw"}).json()["id"]
            for i in range(n):
                kind = "apply" if i % 2 == 0 else "profile"
                target = "server" if (i // 2) % 2 == 0 else "worker"
                params = ({"plan": plan_id, "out": str(root / f"out-{i}")} if kind == "apply"
                          else profile_params(model, root, i))
                job = c.post("/v1/jobs", json={"kind": kind, "params": params}).json()
                running = wait_for(c, job["id"], ("running", "succeeded", "failed"), 300)
                # into its work (loading, quantizing, measuring blocks): an apply of this model takes a second or two
                time.sleep(rng.uniform(0.05, 1.0) if kind == "apply" else rng.uniform(0.5, 3.0))
                at_kill = c.get(f"/v1/jobs/{job['id']}").json()
                t0 = time.monotonic()
                if target == "server":
                    server.kill()  # its workers die with it (PR_SET_PDEATHSIG)
                    server.start()
                else:
                    for pid in server.workers_pids():
                        os.kill(pid, signal.SIGKILL)
                end = wait_for(c, job["id"], ("succeeded", "failed", "cancelled"), 600)
                left = leftovers(root, db)
                whole = None
                if kind == "apply":
                    out = Path(params["out"])
                    whole = (not out.exists()) or json.loads((out / "bitplan_plan.json").read_text())["id"] == plan_id
                with sqlite3.connect(db) as conn:
                    integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
                row = {"cycle": i, "kind": kind, "killed": target, "state_at_kill": at_kill["state"],
                       "message_at_kill": (at_kill["message"] or "")[:80], "state": end["state"],
                       "attempts": end["attempts"], "error": end["error"], "recovered_s": round(time.monotonic() - t0, 1),
                       "leftovers": left, "output_whole": whole, "integrity": integrity,
                       "ok": end["state"] in ("succeeded", "failed") and (end["state"] == "succeeded" or bool(end["error"]))
                       and not left and whole is not False and integrity == "ok"}
                if running["state"] != "running":
                    row["note"] = "the job ended before the kill"
                rows.append(row)
                print(f"  cycle {i}: {kind} killed {target} at {at_kill['state']} -> {end['state']} "
                      f"(attempts {end['attempts']}), leftovers {left or 'none'}", flush=True)
    finally:
        server.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe"]:
        probe(*argv[1:4])
        return 0
    ap = harness.parser("service", __doc__, quick={"plans": 40, "kills": 2})
    ap.add_argument("--plans", type=int, default=300, help="concurrent POST /v1/plans (default 300)")
    ap.add_argument("--kills", type=int, default=20, help="kill -9 cycles (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--solve-in", default="threads,processes",
                    help="where the server solves quick plans (BITPLAN_SOLVE_IN); one burst each (default both)")
    ap.add_argument("--db", metavar="URL", help="a PostgreSQL server (postgresql://USER@HOST:PORT/DB): each burst on a new "
                                               "database of it (default: a new SQLite file)")
    ap.add_argument("--replicas", type=int, default=1, help="`bitplan serve` processes sharing the database (default 1)")
    ap.add_argument("--skip-burst", action="store_true")
    ap.add_argument("--skip-faults", action="store_true")
    args = ap.parse_args(argv)
    meta = harness.metadata(args)
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="bitplan-service-") as tmp:
        work = Path(tmp)
        if not args.skip_burst:
            result["burst"] = []
            for solve_in in args.solve_in.split(","):
                print(f"burst: {args.plans} concurrent plans solved in {solve_in} by {args.replicas} server(s) on "
                      f"{'PostgreSQL' if args.db else 'SQLite'}, GETs beside them", flush=True)
                result["burst"].append(burst(args.plans, work, solve_in, db_server=args.db, replicas=args.replicas))
                harness.write_result(args.out, result, meta)
            print(harness.table(result["burst"], [
                ("db", "db", "<"), ("replicas", "replicas", "d"), ("solved in", "solve_in", "<"), ("plans", "plans", "d"), ("errors", "post_errors", "d"),
                ("lost", "lost_writes", "d"), ("POST p50 s", "post_p50_s", ".3f"), ("POST p99 s", "post_p99_s", ".3f"),
                ("GETs", "gets_during", "d"), ("GET p50 ms", lambda r: r["get_p50_s"] * 1e3, ".1f"),
                ("GET p99 ms", lambda r: r["get_p99_s"] * 1e3, ".1f"), ("GET max ms", lambda r: r["get_max_s"] * 1e3, ".1f"),
                ("idle p99 ms", lambda r: r["idle_get_p99_s"] * 1e3, ".1f")]), flush=True)
        if not args.skip_faults and args.kills:
            print(f"faults: {args.kills} kill -9 cycles", flush=True)
            rows = faults(args.kills, work, args.seed)
            result["faults"] = {"cycles": len(rows), "ok": sum(r["ok"] for r in rows),
                                "killed_while_running": sum(r["state_at_kill"] == "running" for r in rows),
                                "with_leftovers": sum(bool(r["leftovers"]) for r in rows),
                                "succeeded": sum(r["state"] == "succeeded" for r in rows),
                                "failed": sum(r["state"] == "failed" for r in rows), "rows": rows}
            print(harness.table(rows, [("cycle", "cycle", "d"), ("kind", "kind", "<"), ("killed", "killed", "<"),
                                       ("at kill", "state_at_kill", "<"), ("end", "state", "<"),
                                       ("attempts", "attempts", "d"), ("recovered s", "recovered_s", ".1f"),
                                       ("leftovers", lambda r: len(r["leftovers"]), "d"), ("ok", "ok", "")]))
    path = harness.write_result(args.out, result, meta)
    harness.done(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
