"""Pins: constraints on the bits of named modules, e.g. `lm_head=8`, `model.layers.0.*>=4`, `*.down_proj<=4`.

A pin is `PATTERN OP BITS`: PATTERN an fnmatch glob matched against whole module names, OP one
of `=`, `>=`, `<=`, BITS a bit width (16 = unquantized). Every pin applies; options that break
any pin are removed from a module's allowed set.
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

import numpy as np

from bitplan.db.types import InvalidInput, Module, Option, UnknownModule

PIN_SYNTAX = "PATTERN=BITS, PATTERN>=BITS or PATTERN<=BITS, e.g. 'lm_head=8', 'model.layers.0.*>=4'"
_PIN_RE = re.compile(r"^\s*(?P<pattern>[^<>=\s]+)\s*(?P<op>>=|<=|==|=)\s*(?P<bits>\d+)\s*$")
_OPS = {"=": operator.eq, ">=": operator.ge, "<=": operator.le}

Pin = tuple[str, str, int]


def parse_pin(text: str) -> Pin:
    """`'lm_head>=8'` -> `('lm_head', '>=', 8)`; raises InvalidInput showing the syntax."""
    m = _PIN_RE.match(str(text))
    if not m:
        raise InvalidInput(f"bad pin {text!r}: write {PIN_SYNTAX}")
    op = "=" if m["op"] == "==" else m["op"]
    bits = int(m["bits"])
    if not 1 <= bits <= 16:
        raise InvalidInput(f"bad pin {text!r}: bits must be between 1 and 16, got {bits}")
    return m["pattern"], op, bits


def _examples(pattern: str, names: Sequence[str], n: int = 3) -> list[str]:
    """A few module names to show next to a pattern that matched none: the closest ones, else the first."""
    return difflib.get_close_matches(pattern, names, n=n, cutoff=0.5) or list(names[:n])


def apply_pins(modules: Sequence[Module], options: Sequence[Option], pins: Iterable[str | Pin]) -> np.ndarray:
    """allowed [M, O] bool after every pin; UnknownModule for a pattern matching nothing, InvalidInput
    for a module left with no option."""
    names = [m.name for m in modules]
    bits = np.array([o.bits for o in options])
    allowed = np.ones((len(modules), len(options)), dtype=bool)
    pinned_by: dict[int, list[str]] = {}
    for pin in pins:
        pattern, op, b = parse_pin(pin) if isinstance(pin, str) else pin
        hit = np.array([fnmatchcase(n, pattern) for n in names], dtype=bool)
        if not hit.any():
            raise UnknownModule(f"pin pattern {pattern!r} matches no module; module names look like "
                                f"{_examples(pattern, names)}")
        allowed[hit] &= _OPS[op](bits, b)[None, :]
        for i in np.flatnonzero(hit):
            pinned_by.setdefault(int(i), []).append(f"{pattern}{op}{b}")
    empty = np.flatnonzero(~allowed.any(axis=1))
    if empty.size:
        i = int(empty[0])
        more = f" (and {empty.size - 1} more)" if empty.size > 1 else ""
        raise InvalidInput(f"pins {pinned_by[i]} leave module {names[i]!r}{more} no option among "
                           f"{[o.label for o in options]}")
    return allowed
