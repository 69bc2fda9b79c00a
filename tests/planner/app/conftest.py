"""What the application's tests share: the CLI that must succeed, read as JSON, and a profile file (the
`db` and `run_cli` fixtures are tests/planner/conftest.py's)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def cli_json(run_cli):
    """`cli_json(*argv)`: `run_cli(*argv)`, which must exit 0; its stdout parsed as JSON."""
    def run(*argv):
        code, out, err = run_cli(*argv)
        assert code == 0, err
        return json.loads(out)
    return run


@pytest.fixture
def profile_file(tmp_path, make_profile):
    """The synthetic profile (`make_profile()`) written as a profile file."""
    p = tmp_path / "profile.json"
    p.write_text(json.dumps(make_profile().to_dict()))
    return p
