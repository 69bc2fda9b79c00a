"""The tuners' choices kept across processes: one JSON file per GPU model, Triton version and kernel source.

`matmul.matmul` and `moe.moe_matmul` time their candidate configurations the first time a process meets a shape
(`matmul._fastest`), and each candidate is compiled first: for a decode model's handful of shapes that is minutes
of compiling, again in every new process.  Here a choice is also written to disk, and a later process on the same
GPU model takes it from there.  The file's name holds a digest of the kernels' source and Triton's version, so
a change to either starts a new file rather than reusing choices made for other code.

`BITPLAN_TUNED_DIR` puts the files elsewhere than the user's cache folder; set empty, nothing is kept on disk.
An unreadable file is ignored with a warning (the tuner times again) and replaced by the next choice written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
import triton

from bitplan.db.files import per_gpu_cache, write_json

log = logging.getLogger(__name__)

SOURCES = ("matmul.py", "skinny.py", "moe.py")  # the kernels whose configurations are kept
_STORED: dict[Path, dict[str, dict]] = {}  # each file read once per process


def cache_path(device: torch.device) -> Path | None:
    """The file of `device`'s GPU model, or None where nothing is kept (not CUDA, or `BITPLAN_TUNED_DIR=`)."""
    root = os.environ.get("BITPLAN_TUNED_DIR")
    if device.type != "cuda" or root == "":
        return None
    return per_gpu_cache("tuned", torch.cuda.get_device_name(device), f"triton{triton.__version__}", _source_digest(),
                         folder=root)


@cache
def _source_digest() -> str:
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in SOURCES)).hexdigest()[:12]


def tuned(table: dict[tuple, dict], kernel: str, key: tuple, device: torch.device, tune: Callable[[], dict]) -> dict:
    """The configuration for `key` on `device`: from `table` (this process's), else from its GPU model's file,
    else `tune()`'s, which is then kept in both.  `kernel` names the tuner, so that two share a file without
    sharing keys."""
    cfg = table.get(key)
    if cfg is not None:
        return cfg
    path = cache_path(device)
    stored = _read(path) if path is not None else {}
    name = f"{kernel}:" + "|".join(map(str, key))
    cfg = stored.get(name)
    if cfg is None:
        cfg = tune()
        if path is not None:
            stored[name] = cfg
            # another process's, since (an unreadable file was reported when it was first read)
            stored.update({k: v for k, v in _parse(path, warn=False).items() if k not in stored})
            try:
                write_json(path, stored, indent=1)
            except OSError as e:  # a read-only cache folder costs the next process a tuning, nothing more
                log.warning("could not keep the tuned configuration in %s (%s)", path, e)
    table[key] = cfg
    return cfg


def _read(path: Path) -> dict[str, dict]:
    if path not in _STORED:
        _STORED[path] = _parse(path)
    return _STORED[path]


def _parse(path: Path, warn: bool = True) -> dict[str, dict]:
    if not path.exists():
        return {}
    try:
        stored = json.loads(path.read_text())
        if not isinstance(stored, dict) or not all(isinstance(v, dict) for v in stored.values()):
            raise ValueError("not an object of configurations")
        return stored
    except (OSError, ValueError) as e:
        if warn:
            log.warning("ignoring the tuned configurations in %s (%s): timing again", path, e)
        return {}
