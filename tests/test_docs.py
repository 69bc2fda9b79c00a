"""The Python in README.md and docs/ names what exists: every block compiles, every bitplan import resolves."""

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(page, block) for page in PAGES
          for block in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)]


def test_the_docs_have_python_examples():
    assert len(BLOCKS) >= 2 and any(p.name == "README.md" for p, _ in BLOCKS)


@pytest.mark.parametrize("page,block", BLOCKS, ids=[f"{p.name}-{i}" for i, (p, _) in enumerate(BLOCKS)])
def test_example_imports_resolve(page, block):
    tree = ast.parse(block, filename=str(page))  # a syntax error fails here
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bitplan."):
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert not missing, f"{page.name}: {node.module} has no {missing}"
