"""The resumable search state: what a search carries from one generation to the next, the key that a
stored state must match to be resumed, and the state file (one line of JSON, keys sorted)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from bitplan.db.files import write_json
from bitplan.db.types import InvalidInput
from bitplan.planner.allocators.evolutionary.oracle import SearchContext
from bitplan.planner.problem import AllocationProblem

STATE_FORMAT = "bitplan.evolutionary/2"


@dataclass
class SearchState:
    """The start, the current parent and the bookkeeping around them; its fields are the state file's
    keys (with `format`).  Tokens count what this search has fed through the oracle, over every call."""

    key: str  # `state_key` of the search this state belongs to
    start: np.ndarray  # the start allocator's plan
    start_status: str
    start_heldout: float
    parent: np.ndarray
    best: np.ndarray  # the parent that scored `best_heldout`: the search's result
    heldout: float  # the parent's held-out fitness
    best_heldout: float  # lowest held-out fitness of any parent so far
    generation: int = 0  # generations done
    best_generation: int = 0  # the generation whose parent scored `best_heldout`
    stale: int = 0  # generations since `best_heldout` last improved
    accepted: int = 0  # generations whose child replaced the parent
    tokens: int = 0  # search and held-out tokens together
    heldout_tokens: int = 0
    seconds: float = 0.0  # search time, without the start allocator and the report
    history: list[dict] = field(default_factory=list)  # one entry a generation

    def to_json(self) -> dict:
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state.update(format=STATE_FORMAT, start=self.start.tolist(), parent=self.parent.tolist(),
                     best=self.best.tolist())
        return state

    @classmethod
    def from_json(cls, state: dict) -> SearchState:
        values = {f.name: state[f.name] for f in fields(cls)}
        values["start"] = np.asarray(values["start"], dtype=np.int64)
        values["parent"] = np.asarray(values["parent"], dtype=np.int64)
        values["best"] = np.asarray(values["best"], dtype=np.int64)
        return cls(**values)


def state_key(problem: AllocationProblem, unit, context: SearchContext, params: dict) -> str:
    """What a stored state must match to be resumed: problem, unit ties, oracle and search parameters."""
    h = hashlib.sha256()
    for a in (problem.error, problem.size, problem.allowed, np.asarray([problem.budget]),
              np.asarray([] if unit is None else unit, dtype=np.int64)):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps([context.describe(), params], sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def write_state(path: Path, state: SearchState) -> None:
    """Atomically (a crash leaves the previous state, never half of one), on one line."""
    write_json(path, state.to_json(), indent=None)


def read_state(path: Path, key: str) -> SearchState | None:
    """The state stored at `path` for the search with `key`; None if there is none yet."""
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidInput(f"search state {path} is unreadable ({e}); delete it to start afresh") from e
    if state.get("format") != STATE_FORMAT or state.get("key") != key:
        raise InvalidInput(f"search state {path} belongs to another search (problem, oracle or parameters "
                           f"differ); give another --search-state or delete it")
    return SearchState.from_json(state)
