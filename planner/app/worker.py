"""The worker: a process that claims queued jobs from the database and runs them, one at a time.

`bitplan worker` runs one; `bitplan serve --workers N` starts N beside the HTTP server (they die with
it).  Any number of workers, on any hosts sharing the database, may run at once: a job is claimed by
one conditional update (`Store.claim_job`), so two never run one job.

While it runs a job, a thread of the worker reports every `heartbeat` seconds: the job's progress (the
progress bar the CLI would show, read from tqdm's live bars: fraction, what is being done, ETA; else the
last log line), and it reads back whether a cancel was asked for (then the job is interrupted where
Python next runs, its `finally` blocks remove its temporary folders, and it ends `cancelled`).

A worker killed (kill -9, out of memory, the machine gone) stops reporting.  Every worker, each time it
looks for work, recovers the jobs of dead workers: one whose process is gone (same host, pid no longer
running that process) at once, any other when its lease (`lease` seconds without a heartbeat) has run
out.  Such a job goes back to the queue to be resumed (`jobs.run_job` says how each kind resumes), at
most `max_attempts` claims in all; after that it fails with the reason.  Temporary folders its dead
process left beside its output are removed either way.

A job that loads a model on a GPU holds that GPU's lock (a file per device under the temporary folder)
while it runs: workers of one host, of any database, run at most one such job per device at a time
(two models that each fit alone may not fit together, and their timings would mix).
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import socket
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

from bitplan.db.files import exclusive
from bitplan.db.store import Store
from bitplan.db.types import BitplanError
from bitplan.planner.app.jobs import output_of, run_job

log = logging.getLogger(__name__)

LEASE_S = 30.0  # a worker that has not reported for this long is taken for dead
HEARTBEAT_S = 1.0
POLL_S = 0.5
MAX_ATTEMPTS = 2  # a job is resumed once after its worker died; the second death fails it


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid from the
    process that had it; '' where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def worker_id() -> str:
    """`host:pid:start`: names this process among every worker on every host sharing the database."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def is_dead(worker: str | None) -> bool:
    """Whether `worker` (a `worker_id`) is a process of this host that is gone; a worker of another host
    is never taken for dead here (its lease tells)."""
    if not worker:
        return True
    host, _, rest = worker.partition(":")
    pid, _, ticks = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return bool(ticks) and _start_ticks(int(pid)) not in ("", ticks)


def _progress() -> tuple[float, str, float | None] | None:
    """`(fraction, message, eta seconds)` of the outermost live tqdm bar, or None when none runs."""
    try:
        from tqdm.std import tqdm
    except ImportError:
        return None
    bars = [b for b in list(tqdm._instances) if getattr(b, "total", None) and not getattr(b, "disable", True)]
    if not bars:
        return None
    bar = min(bars, key=lambda b: b.pos if isinstance(b.pos, int) else 0)
    n, total = bar.n, bar.total
    rate = bar.format_dict.get("rate") or (n / bar.format_dict["elapsed"] if bar.format_dict.get("elapsed") else None)
    eta = (total - n) / rate if rate else None
    message = f"{bar.desc or 'working'}: {n}/{total} {bar.unit}" + (f", ETA {eta:.0f} s" if eta is not None else "")
    return min(n / total, 1.0), message, eta


class _LastLog(logging.Handler):
    """Keeps the last INFO line of bitplan's loggers: what a job is doing when no bar runs."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.line: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.line = record.getMessage()[:300]
        except Exception:  # a log call with bad arguments must not break the job
            pass


class Worker:
    """Claims and runs jobs of the database at `db_url` until stopped (`stop()`) or, with `once`, until
    the queue is empty."""

    def __init__(self, db_url: str | None = None, *, lease: float = LEASE_S, heartbeat: float = HEARTBEAT_S,
                 poll: float = POLL_S, max_attempts: int = MAX_ATTEMPTS, parent: int | None = None,
                 cluster=None):
        self.store, self.cluster = Store(db_url), cluster  # cluster: where profile jobs fan out (--ray)
        self.id = worker_id()
        self.lease, self.heartbeat, self.poll, self.max_attempts = lease, heartbeat, poll, max_attempts
        self.parent = parent
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._job: str | None = None  # the job the main thread runs now
        self._interrupted = False  # a cancel was delivered to the main thread
        self._log = _LastLog()

    def stop(self) -> None:
        self._stop.set()

    def run(self, *, once: bool = False) -> int:
        """Work until stopped; returns how many jobs this worker ran."""
        logging.getLogger("bitplan").addHandler(self._log)
        ran = 0
        log.info("worker %s on %s", self.id, self.store.url)
        try:
            while not self._stop.is_set():
                if self.parent is not None and os.getppid() != self.parent:
                    log.warning("the server that started this worker is gone: stopping")
                    break
                self.recover()
                job = self.store.claim_job(self.id)
                if job is None:
                    if once:
                        break
                    self._stop.wait(self.poll)
                    continue
                self.execute(job)
                ran += 1
        finally:
            logging.getLogger("bitplan").removeHandler(self._log)
        return ran

    # ----------------------------------------------------------------------------------- one job

    def execute(self, job: dict) -> None:
        """Run one claimed job to its end state, reporting while it runs."""
        from bitplan.planner.app.workspace import Workspace

        id = job["id"]
        log.info("job %s (%s), attempt %d", id, job["kind"], job["attempts"])
        self._log.line, self._interrupted = None, False
        with self._lock:
            self._job = id
        beat = threading.Thread(target=self._beat, args=(id,), daemon=True, name=f"heartbeat {id}")
        beat.start()
        # a fresh workspace per job: a model loaded for one job is not kept in memory after it
        ws = Workspace(self.store, progress=True, cluster=self.cluster)
        state, error, result_id, result = "failed", None, None, None
        try:
            try:
                with device_lock(job):
                    result_id, result = run_job(ws, job)
                state = "succeeded"
            finally:
                with self._lock:
                    self._job = None
        except KeyboardInterrupt:
            if not self._interrupted:
                raise
            state, error = "cancelled", None
        except BitplanError as e:
            error = str(e)
        except Exception as e:  # the job failed, not the worker: keep the reason, take the next job
            log.exception("job %s failed", id)
            error = f"{type(e).__name__}: {str(e)[:500]}"
        finally:
            beat.join(timeout=self.heartbeat * 3)
            del ws
        done = self.store.finish_job(id, self.id, state, error=error, result_id=result_id, result=result,
                                     message="cancelled" if state == "cancelled" else None)
        if not done:
            log.warning("job %s was taken from this worker (its lease ran out) before it ended %s", id, state)
        log.info("job %s %s%s", id, state, f": {error}" if error else "")

    def _beat(self, id: str) -> None:
        while True:
            with self._lock:
                if self._job != id:
                    return
            now = _progress()
            if now is not None:
                fraction, message, eta = now
            else:
                fraction, message, eta = None, self._log.line, None
            try:
                cancel = self.store.heartbeat_job(id, self.id, progress=fraction, message=message, eta_seconds=eta)
            except Exception as e:  # a busy database: the next beat tries again, the lease is longer
                log.warning("heartbeat of job %s failed: %s", id, e)
                cancel = False
            if cancel:
                with self._lock:
                    if self._job == id and not self._interrupted:
                        self._interrupted = True
                        log.info("job %s: cancel asked for, interrupting it", id)
                        _thread.interrupt_main()
            time.sleep(self.heartbeat)

    # ---------------------------------------------------------------------------------- recovery

    def recover(self) -> list[str]:
        """Requeue (or fail) the running jobs of dead workers; the ids of those recovered."""
        recovered = []
        for job in self.store.stale_jobs(timedelta(seconds=self.lease)):
            if job["worker"] == self.id:
                continue
            dead = is_dead(job["worker"])
            if not (dead or job["stale"]):
                continue
            why = ("its worker process is gone" if dead else
                   f"its worker sent no heartbeat for {self.lease:.0f} s")
            requeue = job["attempts"] < self.max_attempts
            reason = (f"{why} (killed or crashed): resumed" if requeue else
                      f"{why} (killed or crashed) on each of {job['attempts']} attempts: not retried again")
            if self.store.release_job(job["id"], job["worker"], requeue=requeue, reason=reason):
                log.warning("job %s: %s", job["id"], reason)
                recovered.append(job["id"])
                if dead:  # a process on another host may still be writing there
                    _remove_temporaries(output_of(job))
        return recovered


def uses_gpu(job: dict, cuda: bool) -> bool:
    """Whether `job` would load its model on a GPU, on a worker where one is (`cuda`)."""
    p, kind = job["params"], job["kind"]
    loads = (kind in ("profile", "apply", "eval") or (kind == "compare" and p.get("evaluate"))
             or (kind == "plan" and p.get("allocator") == "evolutionary"))
    # a profile and an eval name their device (None: the GPU where there is one); the rest take the default
    return bool(cuda and loads and p.get("device") in (None, "cuda"))


@contextlib.contextmanager
def device_lock(job: dict):
    """Hold the GPU's lock while `job` runs on it (module docstring); nothing for a CPU job."""
    import torch

    if not uses_gpu(job, torch.cuda.is_available()):
        yield
        return
    uuid = torch.cuda.get_device_properties(torch.cuda.current_device()).uuid
    with exclusive(Path(tempfile.gettempdir()) / f"bitplan-gpu-{uuid}.lock",
                   waiting=f"job {job['id']} waits for GPU {uuid}: another job runs on it"):
        yield


def _remove_temporaries(out: Path | None) -> None:
    """The temporary folders a dead process left beside `out` (`db.files.atomic_dir`'s)."""
    if out is None:
        return
    from bitplan.db.files import _remove_orphans

    try:
        _remove_orphans(out)
    except OSError as e:
        log.warning("could not remove the temporary folders beside %s: %s", out, e)


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (kill -9 of `bitplan serve` takes its workers
    with it, so a restart does not find the old ones still running beside the new); elsewhere the worker
    notices its parent is gone when it next looks for work."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_worker(db_url: str | None = None, *, parent: int | None = None, once: bool = False, **kw) -> int:
    """`bitplan worker`: work until interrupted (or, with `once`, until the queue is empty)."""
    if parent is not None:
        die_with_parent()
        if os.getppid() != parent:  # it died before the request above was made
            return 0
    worker = Worker(db_url, parent=parent, **kw)
    try:
        return worker.run(once=once)
    except KeyboardInterrupt:
        return 0
    finally:
        worker.store.close()
