"""Budget lists: the budgets a comparison sweeps, from one string or a list."""

from __future__ import annotations

import math
from collections.abc import Sequence

from bitplan.db.types import Budget, InvalidInput

# Each just above the embedded model's size at 2, 3 and 4 bits everywhere (its embedding at 4 bits), so
# that each ilp plan of the demo sits beside a uniform one of about its size.
DEMO_BUDGETS = ("44MiB", "57MiB", "70MiB")


MAX_BUDGETS = 200  # one compare plans each with every allocator: a range is for a curve, not a sweep


def parse_budgets(spec: str | Sequence[str]) -> list[str]:
    """`"2.5:4.5:0.25"` (a bpw range, both ends included) or `"3bpw,3.5bpw,900MiB"`, or a mix -> budgets."""
    items = [x.strip() for x in spec.split(",")] if isinstance(spec, str) else [str(x).strip() for x in spec]
    budgets = []
    for item in filter(None, items):
        if ":" not in item:
            budgets.append(str(Budget.parse(item)))
            continue
        try:
            start, stop, step = (float(x) for x in item.split(":"))
        except ValueError as e:
            raise InvalidInput(f"bad budget range {item!r}: write START:STOP:STEP in bits per weight, "
                               "e.g. 2.5:4.5:0.25") from e
        if not all(map(math.isfinite, (start, stop, step))) or step <= 0 or stop < start or start <= 0:
            raise InvalidInput(f"bad budget range {item[:40]!r}: need finite numbers, 0 < START <= STOP and "
                               f"STEP > 0, e.g. 2.5:4.5:0.25")
        n = math.floor((stop - start) / step + 1e-9) + 1  # the tolerance keeps STOP when it is on the grid
        if n > MAX_BUDGETS:
            raise InvalidInput(f"budget range {item[:40]!r} makes {n:,} budgets; at most {MAX_BUDGETS} are planned "
                               f"in one run: take a larger STEP")
        budgets += [str(Budget.parse(f"{round(start + i * step, 10):g}bpw")) for i in range(n)]
    if not budgets:
        raise InvalidInput("no budgets given: write e.g. 2.5:4.5:0.25 or 3bpw,3.5bpw,900MiB")
    return list(dict.fromkeys(budgets))  # each budget once, in the order given
