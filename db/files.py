"""Atomic writes: a reader, or a process that dies halfway, sees the old file (or folder) or the new one.

Every file bitplan writes outside the database (profile and plan JSON, search states, latency caches,
streamed activations, checkpoints, exports, benchmark results) goes through these two.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bitplan.db.types import InvalidInput, Profile

log = logging.getLogger(__name__)


def _temporary(path: Path) -> Path:
    # beside the target (a rename within one file system is atomic); the pid keeps two writers apart
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], Any]) -> Path:
    """Write `data` to `path` through a temporary file and a rename, creating the folder.

    `data` is text (UTF-8), bytes, or a function that writes the file at the path it is given
    (`torch.save`, `safetensors.save_file`).  Returns the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            data(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """`obj` as JSON (keys sorted, so equal objects give equal bytes), written atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")


def per_gpu_cache(kind: str, gpu_name: str, *tags: str, folder: str | Path | None = None) -> Path:
    """`<folder>/<kind>-<GPU name>[-<tag>...].json`, by default in the user cache folder: measurements kept per
    GPU model (kernel latencies, tuned kernel configurations), which can be deleted and are measured again."""
    if folder is None:
        import platformdirs

        folder = platformdirs.user_cache_dir("bitplan")
    return Path(folder) / ("-".join([kind, re.sub(r"[^A-Za-z0-9]+", "-", gpu_name), *tags]) + ".json")


WRITTEN_MARK = "bitplan_plan.json"  # every checkpoint and export bitplan writes holds its plan


def _remove_orphans(out: Path) -> None:
    """`.NAME.tmp-PID` and `.NAME.old-PID` folders beside `out` whose process is gone."""
    for leftover in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = leftover.name.rpartition("-")
        if not (kind.endswith((".tmp", ".old")) and pid.isdigit()) or _alive(int(pid)):
            continue
        shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; on success it becomes `out`, on any error it is
    removed.  An existing `out` is refused unless `overwrite`, and even then unless bitplan wrote it
    (it holds `WRITTEN_MARK`) and it does not hold the working directory; it is moved aside and removed
    only after the new folder is in place.  Temporary folders that dead processes left beside `out`
    are removed."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise InvalidInput(f"{out} exists; choose another --out or pass --overwrite")
    if out.exists():
        if Path.cwd().resolve().is_relative_to(out):
            raise InvalidInput(f"--overwrite would delete {out}, which holds the working directory; choose another --out")
        if not (out / WRITTEN_MARK).is_file():
            raise InvalidInput(f"--overwrite replaces only a folder bitplan wrote, and {out} has no {WRITTEN_MARK}: "
                               f"choose another --out, or move it away yourself")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def exclusive(lock_file: str | Path, *, waiting: str = "") -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created if missing) while inside: a second process that asks
    for it waits, logging `waiting` once, until the first is done or dies (the kernel drops a dead
    process's lock)."""
    import fcntl

    path = Path(lock_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                log.info("%s", waiting)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_profile_file(path: str | Path) -> Profile:
    """A `bitplan.profile/2` (or `/1`) JSON file (docs/formats.md), validated."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidInput(f"no such profile file: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{path} is not a profile file (not UTF-8 JSON): give the JSON that `bitplan profile "
                           f"--output` or `bitplan show PROFILE --json` writes") from None
    return Profile.from_json(text)
