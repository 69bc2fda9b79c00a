"""What the planner's tests share, the core's and the application's (tests/planner/app/): the checks of an
allocator's answer, and the `bitplan` command run in this process (with tests/conftest.py's `db`).

conftest.py is not importable under `--import-mode=importlib`: each helper is handed out by a fixture.
"""

from __future__ import annotations

import numpy as np
import pytest


def assert_valid(p, choice: np.ndarray) -> None:
    """`choice` is one allowed option per unit of the allocation problem `p`, within its budget."""
    assert choice.shape == (p.n_units,)
    assert p.allowed[np.arange(p.n_units), choice].all(), "chose a disallowed option"
    assert p.total_size(choice) <= p.budget, "over budget"


@pytest.fixture(scope="session", name="assert_valid")
def assert_valid_fixture():
    """`assert_valid(problem, choice)`: see `assert_valid` above."""
    return assert_valid


@pytest.fixture
def run_cli(capsys):
    """`run_cli(*argv)`: `bitplan *argv` in this process; returns (exit code, stdout, stderr)."""
    from bitplan.planner.app.cli import main

    def run(*argv) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse's own refusals (usage, a bad value for a typed flag)
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err
    return run
