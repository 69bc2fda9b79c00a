"""Fan-out of a profile's independent work over a Ray cluster (`--ray`, `$BITPLAN_RAY_ADDRESS`).

Two kinds of work are spread, each identical in what it computes to the single-process path (same
functions, same inputs, results put back in the same places; only the order in which they finish differs):

- **A block's modules** (`error_table`, and the GPTQ results the KL points need): each module's
  quantization at every option from its `H`, and its error, is a task of its own.  The driver streams
  the blocks and collects `H`; the tasks get one matrix, its `H` and its statistics, and return the row
  (and the GPTQ results, for the cache the KL points and `apply` read).
- **KL points** (`kl`, `calibrated`): each worker is an actor holding the model once, with its own base
  pass; modules are handed to whichever worker is free, with the GPTQ results they need.
- **The evolutionary search's offspring** (`profiler.fitness.ClusterFitness`): each worker holds the
  model and its own KL oracle; a generation's parent is recorded on every worker, and a stage's
  candidates are scored in parallel.

A worker runs torch with the driver's thread count (`torch.get_num_threads()` where the fan-out starts),
so on `device="cpu"` it takes that many of the cluster's CPUs (as many workers as fit), on `cuda` one GPU:
a floating-point sum split over another number of threads can round otherwise, and with the same count
every number is the one this process computes.  Run the driver with fewer threads (`torch.set_num_threads`,
`OMP_NUM_THREADS`) for more, narrower workers.  bitplan (with the `model` extra) must be importable on every
node: a local cluster (`--ray local`) starts its workers from this interpreter.  Ray is an optional extra
(`pip install 'bitplan[ray]'`); without `--ray` or the variable nothing here imports it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from bitplan.db.types import InvalidInput

log = logging.getLogger(__name__)

RAY_ENV = "BITPLAN_RAY_ADDRESS"
# `--ray local`: start a cluster on this machine; `auto`: the cluster this machine is a node of (Ray's own
# meaning); anything else: a cluster's address (`host:port`, `ray://host:port`)
LOCAL, OFF = "local", "off"


@dataclass(frozen=True)
class Cluster:
    """Where a profile's fan-out runs: a Ray cluster's `address` (see LOCAL; a local one has every CPU)."""

    address: str

    @classmethod
    def parse(cls, value: str | None) -> Cluster | None:
        """`--ray VALUE` (None: `$BITPLAN_RAY_ADDRESS`), `off` or empty for none."""
        if value is None:
            value = os.environ.get(RAY_ENV)
        value = (value or "").strip()
        if not value or value == OFF:
            return None
        if any(c.isspace() for c in value):
            raise InvalidInput(f"--ray takes local, auto or a cluster's address (host:port), not {value!r}")
        return cls(value)

    def connect(self):
        """The `ray` module, connected to this cluster (once per process)."""
        try:
            import ray
        except ImportError:
            raise InvalidInput("--ray needs Ray: pip install 'bitplan[ray]' (or drop --ray and unset "
                               f"${RAY_ENV})") from None
        if not ray.is_initialized():
            if self.address not in (LOCAL, "auto"):
                _check_reachable(self.address)
            kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            try:
                ray.init(**({} if self.address == LOCAL else {"address": self.address}), **kw)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise InvalidInput(f"cannot reach the Ray cluster at {self.address!r} ({str(e).splitlines()[0]}): "
                                   f"start it (`ray start --head`), or give --ray local") from None
            log.info("Ray cluster %s: %s", self.address, ray.cluster_resources())
        return ray

    def workers(self, device: str) -> tuple[int, int, dict]:
        """How many workers a step runs on `device`, their torch threads (the driver's), and the resources
        each takes."""
        import torch

        ray = self.connect()
        res, threads = ray.cluster_resources(), torch.get_num_threads()
        if device.startswith("cuda"):
            gpus = int(res.get("GPU", 0))
            if gpus < 1:
                raise InvalidInput(f"the Ray cluster at {self.address!r} has no GPU: profile with --device cpu")
            return gpus, threads, {"num_gpus": 1, "num_cpus": 1}
        widest = max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive"))
        if widest < threads:
            log.warning("the Ray cluster's nodes have at most %d CPUs, this process runs %d torch threads: its "
                        "workers run %d, and their sums may round otherwise than here", widest, threads, widest)
            threads = max(1, widest)
        return max(1, int(res.get("CPU", 1)) // threads), threads, {"num_cpus": threads}

    def map(self, fn: Callable, calls: Iterable[tuple], device: str, *, total: int,
            on_result: Callable[[int, object], None], progress: bool = False, desc: str = "") -> None:
        """`fn(*args, device)` for every `args` of the `total` in `calls` as Ray tasks, at most a few per
        worker in flight (each holds its inputs in the object store; `calls` is read as they go out);
        `on_result(index, result)` as each one finishes."""
        ray = self.connect()
        workers, threads, resources = self.workers(device)
        task = ray.remote(max_retries=0, **resources)(_run)
        window = 2 * workers
        pending: dict = {}
        bar = tqdm(total=total, desc=desc, unit="module", leave=False, disable=not progress or total < 2)

        def wait_one() -> None:
            done, _ = ray.wait(list(pending), num_returns=1)
            on_result(pending.pop(done[0]), ray.get(done[0]))
            bar.update()

        try:
            for i, args in enumerate(calls):
                pending[task.remote(threads, fn, *args, _worker_device(device))] = i
                while len(pending) >= window:
                    wait_one()
            while pending:
                wait_one()
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.close()

    def actors(self, cls: type, args: Sequence, device: str) -> list:
        """One actor holding `cls(*args, device)` per worker (`args` put in the object store once); its
        methods are called through `call` (`pool`, `call_all`)."""
        ray = self.connect()
        workers, threads, resources = self.workers(device)
        refs = [ray.put(a) for a in args]
        host = ray.remote(max_restarts=0, **resources)(_Host)
        return [host.remote(threads, cls, *refs, _worker_device(device)) for _ in range(workers)]

    def call_all(self, actors: list, method: str, *args) -> list:
        """`<method>(*args)` on every actor's object, their results in actor order."""
        return self.connect().get([a.call.remote(method, *args) for a in actors])

    def pool(self, actors: list, calls: Iterable[tuple], method: str, *,
             on_result: Callable[[int, object], None], progress: bool = False, desc: str = "") -> None:
        """`<method>(*args)` for every `args` of `calls`, each on the next free actor's object;
        `on_result(index, result)` as each finishes."""
        ray = self.connect()
        calls = list(calls)
        bar = tqdm(total=len(calls), desc=desc, unit="module", disable=not progress)
        free, pending, todo = list(actors), {}, iter(enumerate(calls))
        try:
            while True:
                while free and (nxt := next(todo, None)) is not None:
                    actor = free.pop()
                    pending[actor.call.remote(method, *nxt[1])] = (nxt[0], actor)
                if not pending:
                    break
                done, _ = ray.wait(list(pending), num_returns=1)
                i, actor = pending.pop(done[0])
                on_result(i, ray.get(done[0]))
                bar.update()
                free.append(actor)
        finally:
            bar.close()

    def close(self, actors: list) -> None:
        """End `actors` (their model copies go with them)."""
        ray = self.connect()
        for actor in actors:
            ray.kill(actor)


def _run(threads: int, fn: Callable, *args):
    """A task: `fn(*args)` with the driver's torch threads."""
    import torch

    torch.set_num_threads(threads)
    return fn(*args)


class _Host:
    """An actor: one object of `cls`, built and called with the driver's torch threads."""

    def __init__(self, threads: int, cls: type, *args):
        import torch

        torch.set_num_threads(threads)
        self.obj = cls(*args)

    def call(self, method: str, *args):
        return getattr(self.obj, method)(*args)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """InvalidInput unless `address` (`host:port` or `ray://host:port`) takes a TCP connection: Ray itself
    retries an unreachable head for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InvalidInput(f"--ray takes local, auto or a Ray head's host:port, not {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise InvalidInput(f"cannot reach the Ray cluster at {address!r} ({e.strerror or e}): start it "
                           f"(`ray start --head`), or give --ray local") from None


def _worker_device(device: str) -> str:
    # Ray hands each GPU task one card, visible to it as device 0
    return "cuda" if device.startswith("cuda") else device
