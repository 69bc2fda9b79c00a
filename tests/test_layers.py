"""The layering contract (docs/layout.md), read from the source: every import, also one inside a function.

db < kernels < profiler < executor < planner: a folder imports the folders below it, never one above.
The planning core (planner/ outside planner/app/) imports `db` and itself only, and no model-side
library at all, so that planning a stored profile needs neither torch nor a model.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["db", "kernels", "profiler", "executor", "planner"]
MODEL_SIDE = {"torch", "transformers", "triton", "safetensors", "gguf", "accelerate"}


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement in the file; relative ones resolved."""
    package = ".".join(("bitplan",) + path.relative_to(root).parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.append((node.lineno, base))
    return found


def violations(path: Path, root: Path = ROOT) -> list[str]:
    """What `path` imports against the contract, one line each."""
    rel = path.relative_to(root)
    layer = rel.parts[0]
    core = layer == "planner" and rel.parts[1] != "app"
    bad = []
    for line, name in imports(path, root):
        parts = name.split(".")
        if parts[0] == "bitplan" and len(parts) > 1 and parts[1] in LAYERS:
            target = parts[1]
            if LAYERS.index(target) > LAYERS.index(layer):
                bad.append(f"{rel}:{line} imports {name}: {layer} is below {target}")
            elif core and target != "db" and not (target == "planner" and parts[2:3] != ["app"]):
                bad.append(f"{rel}:{line} imports {name}: the planning core imports db and itself only")
        elif core and parts[0] in MODEL_SIDE:
            bad.append(f"{rel}:{line} imports {name}: the planning core runs without model-side libraries")
    return bad


def sources() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


def test_every_layer_has_sources():
    # a renamed folder would otherwise make the contract vacuous
    assert {p.relative_to(ROOT).parts[0] for p in sources()} == set(LAYERS)
    assert (ROOT / "planner" / "app" / "cli.py").is_file()


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_one_way(layer):
    bad = [v for p in sources() if p.relative_to(ROOT).parts[0] == layer for v in violations(p)]
    assert not bad, "imports against the layering (docs/layout.md):\n" + "\n".join(bad)


def test_contract_catches_a_wrong_way_import(tmp_path):
    """The checker itself: an upward import, one hidden in a function, and torch in the core are caught."""
    (tmp_path / "profiler").mkdir()
    (tmp_path / "planner").mkdir()
    up = tmp_path / "profiler" / "x.py"
    up.write_text("def f():\n    from bitplan.executor.apply import apply_plan\n")
    core = tmp_path / "planner" / "y.py"
    core.write_text("import torch\nfrom bitplan.profiler import model\nfrom bitplan.planner.problem import A\n")
    assert violations(up, tmp_path) == ["profiler/x.py:2 imports bitplan.executor.apply: profiler is below executor"]
    assert [v.split()[0] for v in violations(core, tmp_path)] == ["planner/y.py:1", "planner/y.py:2"]
