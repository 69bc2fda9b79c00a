"""What every benchmark in bench/ shares: its command line, the record of where it ran, its table, its file.

A benchmark script uses it in four calls:

    ap = harness.parser("scale", __doc__, quick={"layers": 4})   # --out PATH (alias --output), --quick
    ap.add_argument(...)                                          # the script's own arguments
    args = ap.parse_args(argv)
    meta = harness.metadata(args)                                 # time, git commit, device, versions
    ...
    print(harness.table(rows, [("allocator", "label", "<"), ("time s", "seconds", ".2f"), ...]))
    harness.write_result(args.out, {"rows": rows}, meta)          # atomically, `meta` first

Results go to `bench/results/<name>.json` (or `$BITPLAN_BENCH_RESULTS/<name>.json`, the folder the
allocator notebook reads), unless `--out` names another file.  `bench/results/` holds the latest result
of each benchmark, the ones the documentation shows; older ones are in git history.

`--quick` runs the script on tiny settings (the `quick` defaults each script declares; arguments given
explicitly still win) to check that it works, and writes to a scratch file under the temporary directory
instead of `bench/results/`, so that a smoke run never replaces a measurement the docs cite.

Every script starts with these lines, before any third-party import:

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also under PYTHONSAFEPATH=1
    import harness  # bench/harness.py

    harness.leave_sys_path()

`python bench/x.py` puts bench/ first on `sys.path`, but not under `PYTHONSAFEPATH=1` (CI sets it), nor
when a script is loaded by file name; hence the insert.  And bench/ must not stay there: transformers
probes for Hugging Face's `kernels` package and would import bench/kernels.py in its place (an
ImportError as soon as transformers is imported, where that package is installed).  A script that needs
another script's code takes it with `harness.sibling(name)`.

Only the standard library here: a CPU benchmark of the planner must not import torch because of us
(the metadata reads installed versions from package metadata, and the GPU name only where the script
has imported torch itself).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from bitplan.db.files import atomic_write

BENCH = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("BITPLAN_BENCH_RESULTS") or BENCH / "results")
SCRATCH = Path(tempfile.gettempdir()) / "bitplan-bench"  # where --quick runs write

# distributions whose versions a result records, when installed (looked up, never imported)
VERSIONS = ("bitplan", "torch", "triton", "transformers", "numpy", "scipy", "pulp", "ortools", "highspy")


def leave_sys_path() -> None:
    """Take bench/ off `sys.path` (every entry naming it, `''` too when run from inside it)."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]


def sibling(name: str) -> ModuleType:
    """Another script of bench/ (`bench/<name>.py`) as a module, loaded by file name, once."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


class BenchParser(argparse.ArgumentParser):
    """An ArgumentParser that knows its benchmark's name, its `--quick` defaults and its result file."""

    def __init__(self, name: str, doc: str | None, *, quick: dict[str, Any] | None = None,
                 result: str | bool | None = None):
        super().__init__(prog=f"bench/{name}.py", description=doc,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        self.quick = dict(quick or {})
        self.result = None if result is False else (result or name)  # the result file's stem
        if self.result:
            self.add_argument("--out", "--output", dest="out", metavar="PATH",
                              help=f"result file (default {_shown(RESULTS / f'{self.result}.json')}; "
                                   f"with --quick {_shown(SCRATCH / f'{self.result}.json')})")
        if self.result or self.quick:
            self.add_argument("--quick", action="store_true",
                              help="tiny settings, to check that the script works"
                                   + (f" ({_describe(self.quick)})" if self.quick else "")
                                   + ("; writes to a scratch file, never to bench/results/" if self.result else ""))

    def parse_args(self, args: Sequence[str] | None = None, namespace=None) -> argparse.Namespace:
        ns = super().parse_args(args, namespace)
        if getattr(ns, "quick", False) and self.quick:
            self.set_defaults(**self.quick)  # the quick settings become defaults: explicit arguments win
            ns = super().parse_args(args, namespace)
        if self.result and ns.out is None:
            ns.out = str((SCRATCH if ns.quick else RESULTS) / f"{self.result}.json")
        argv = list(sys.argv[1:] if args is None else args)
        ns._command = shlex.join(["python", self.prog, *argv])  # as given, also when main(argv) is called
        return ns


def parser(name: str, doc: str | None, *, quick: dict[str, Any] | None = None,
           result: str | bool | None = None) -> BenchParser:
    """The command line of `bench/<name>.py` (its docstring as help): `--out` and `--quick`; the caller
    adds the script's own arguments.

    `quick`: argument defaults (by `dest`) that `--quick` puts in place.  `result`: the result file's
    name when it is not the script's (`bench/results/<result>.json`), or False for a script that writes
    none (the Nsight Compute drivers): then no `--out`, and `--quick` only when `quick` is given."""
    return BenchParser(name, doc, quick=quick, result=result)


def search_request(params: str | dict[str, Any]) -> dict[str, Any]:
    """`PlanRequest` keywords of the evolutionary allocator's parameters as a bench's `--search-params`
    gives them (JSON): `time_limit` and `seed` are the request's own fields, the rest its `params`."""
    try:
        params = dict(json.loads(params) if isinstance(params, str) else params)
    except (ValueError, TypeError) as e:  # a user's typo: one line and exit 2, as argparse refuses
        print(f"--search-params must be a JSON object, e.g. '{{\"generations\": 20}}': {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return {"params": params, "time_limit": params.pop("time_limit", None), "seed": params.pop("seed", 0)}


def metadata(args: argparse.Namespace | None = None, **extra: Any) -> dict[str, Any]:
    """Where and how a result was measured: start time (UTC), command line, arguments, git commit (and
    whether the tree had uncommitted changes), machine, device, and versions of the stack; `extra`
    holds what the script adds (e.g. the measured copy bandwidth)."""
    meta: dict[str, Any] = {
        "started": _now(),
        "command": getattr(args, "_command", None) or shlex.join(["python", _shown(Path(sys.argv[0])), *sys.argv[1:]]),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")} if args is not None else {},
        "git": _git(),
        "host": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                 "cpu": _cpu_model()},
        "device": _device(),
        "versions": _versions(),
    }
    meta.update(extra)
    return meta


def write_result(path: str | Path, payload: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write `{"meta": meta, **payload}` as JSON to `path` atomically (a temporary file beside it, then
    a rename), creating the folder; returns the path.  Call it again to replace a partial result (a long
    run saves after each step, so that a run cut short still leaves its rows)."""
    if "meta" in payload:
        raise ValueError("the payload has its own 'meta': pass it to metadata(**extra) instead")
    doc = {"meta": dict(meta, written=_now()), **payload}
    return atomic_write(path, json.dumps(doc, indent=2, default=_jsonable) + "\n")


Column = tuple  # (header, key or callable(row), format spec), e.g. ("time s", "seconds", ".2f")


def table(rows: Iterable[dict[str, Any]], columns: Sequence[Column], *, title: str | None = None) -> str:
    """Rows as a fixed-width text table.  Each column is `(header, key, spec)`: `key` names the row's
    value or is a function of the row, `spec` a format spec (`.2f`, `.2e`, `d`, ``); a spec starting
    with `<` left-aligns the column (numbers and the rest are right-aligned).  Missing values and
    None print as `-`.  Every column is as wide as its widest cell."""
    rows = list(rows)
    cells = [[_cell(r, key, spec) for _, key, spec in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _, _) in enumerate(columns)]
    left = [spec.startswith("<") for _, _, spec in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if lft else v.rjust(w) for v, w, lft in zip(values, widths, left)).rstrip()

    head = line([h for h, _, _ in columns])
    out = ([title] if title else []) + [head, "-" * len(head)] + [line(c) for c in cells]
    return "\n".join(out)


def done(path: Path) -> None:
    """The last line of a run: where its result went."""
    print(f"wrote {_shown(path)}", flush=True)


def rss(key: str = "VmRSS") -> int:
    """A `/proc/self/status` memory figure in bytes: `VmRSS` now, `VmHWM` its peak since `reset_peak`."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def reset_peak() -> None:
    """Restart the kernel's high-water mark (`VmHWM`) from the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class RssSampler(threading.Thread):
    """`VmRSS` every `every` seconds, its maximum kept: a check on `VmHWM`, which is the exact peak."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        self.every, self.peak, self.stop = every, 0, threading.Event()

    def run(self):
        while not self.stop.wait(self.every):
            self.peak = max(self.peak, rss())


def _cell(row: dict[str, Any], key: str | Callable[[dict], Any], spec: str) -> str:
    value = key(row) if callable(key) else row.get(key)
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec.lstrip("<"))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _shown(p: Path) -> str:
    """A path relative to the repository when inside it (how the docs cite result files)."""
    try:
        return str(Path(p).resolve().relative_to(BENCH.parent))
    except ValueError:
        return str(p)


def _describe(quick: dict[str, Any]) -> str:
    return ", ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in quick.items())


def _git() -> dict[str, Any] | None:
    """The commit of the repository the benchmark ran from, and whether tracked files differed from it."""
    def run(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(BENCH), *cmd], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        return {"commit": run("rev-parse", "HEAD"),
                "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout, or no git on this machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device() -> dict[str, Any]:
    """The GPU, if the script has imported torch and one is there; otherwise the CPU."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"kind": "cuda", "name": torch.cuda.get_device_name(), "count": torch.cuda.device_count(),
                "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                "torch_threads": torch.get_num_threads()}
    out: dict[str, Any] = {"kind": "cpu", "name": _cpu_model()}
    if torch is not None:
        out["torch_threads"] = torch.get_num_threads()
    return out


def _versions() -> dict[str, str]:
    out = {}
    for dist in VERSIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _jsonable(x: Any) -> Any:
    """numpy scalars and arrays, paths and the like, in JSON."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    return str(x)
