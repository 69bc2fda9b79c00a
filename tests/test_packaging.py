"""The install layout DESIGN.md asks for: one `bitplan.<folder>` namespace, nothing top-level."""

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


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          cwd="/").stdout.strip()


def test_planner_imports_without_torch():
    """Planning a stored profile must work on a machine without torch: allocators, workflow, service, store."""
    out = run("import sys, bitplan.planner.plan, bitplan.planner.allocators, bitplan.planner.pins, "
              "bitplan.planner.workflow, bitplan.planner.cli, "
              "bitplan.planner.service, bitplan.db.store; "
              "print(sorted(m for m in ('torch', 'transformers', 'highspy') if m in sys.modules))")
    assert out == "[]"


def test_no_top_level_kernels_module():
    """`kernels` is also a Hugging Face package that transformers probes for; ours lives under bitplan."""
    out = run("import sys, bitplan.kernels.reference, transformers.models.llama.modeling_llama; "
              "m = sys.modules.get('kernels'); print(getattr(m, '__file__', None) or 'absent')")
    assert out == "absent" or str(ROOT) not in out
