"""The install layout DESIGN.md asks for: one `bitplan.<folder>` namespace, nothing top-level."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_packages_match_folders_with_init():
    """A subpackage missing from pyproject imports in an editable install but is absent from the wheel."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {f"bitplan.{top}": Path(path) for top_name, path in cfg["package-dir"].items()
            for top in [top_name.removeprefix("bitplan.")]}
    found = set()
    for name, path in dirs.items():
        for init in (ROOT / path).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / path)
            found.add(".".join([name, *rel.parts]))
    assert sorted(cfg["packages"]) == sorted(found)


def run(code: str, cwd: str | Path = "/", unset: tuple[str, ...] = ()) -> str:
    env = {k: v for k, v in os.environ.items() if k not in unset}
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          cwd=cwd, env=env).stdout.strip()


def test_planner_imports_without_torch():
    """Planning a stored profile must work on a machine without torch: allocators, workflow, service, store."""
    out = run("import sys, bitplan.planner.plan, bitplan.planner.allocators, bitplan.planner.pins, "
              "bitplan.planner.app.usecases, bitplan.planner.app.cli, "
              "bitplan.planner.app.service, bitplan.db.store; "
              "print(sorted(m for m in ('torch', 'transformers', 'highspy') if m in sys.modules))")
    assert out == "[]"


OURS = ROOT / "kernels"

# What `sys.modules["kernels"]` is after importing transformers' Llama: `absent`, or the folder it came from.
PROBE = ("import sys, transformers.models.llama.modeling_llama; m = sys.modules.get('kernels'); "
         "print(m.__path__[0] if m is not None else 'absent')")


def test_no_top_level_kernels_module():
    """`kernels` is also a Hugging Face package that transformers imports; no module of ours goes by that name."""
    out = run("import bitplan.kernels.reference; " + PROBE)
    assert out == "absent" or Path(out).resolve() != OURS


def test_python_in_repository_root_imports_transformers():
    """A `python -c`, REPL or notebook started in the repository root puts the root first on sys.path:
    `import kernels` must still reach the installed package (or fail as if ours were not there), and
    `bitplan.kernels` must stay ours."""
    out = run(PROBE + "; import bitplan.kernels.reference as r; print(r.__file__)", cwd=ROOT, unset=("PYTHONSAFEPATH",))
    top, ours = out.splitlines()
    assert top == "absent" or Path(top).resolve() != OURS
    assert Path(ours).resolve().parent == OURS
