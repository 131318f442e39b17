"""DESIGN §1's one-way dependencies, read from the source: networks import no training, data or CLI code, the
generation path imports no engine, handler or CLI, and the model-zoo exporter (which the CLI calls) no CLI, engine or
handler code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "prod9_components"


def _imports(folder: str) -> dict[str, set[str]]:
    """``{file name: the prod9_components subpackages it imports}`` for every module of ``folder``."""
    found = {}
    for path in sorted((PACKAGE / folder).glob("*.py")):
        modules = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            modules |= {n.split(".")[1] for n in names if n.startswith("prod9_components.")}
        found[path.name] = modules
    return found


@pytest.mark.parametrize("folder, allowed", [
    ("networks", {"networks", "limits", "atomic"}),
    ("generation", {"generation", "data", "inference", "networks", "outputs", "sampling"}),
    ("zoo", {"zoo", "config_literals", "atomic", "data", "networks"}),
])
def test_imports_point_one_way(folder, allowed):
    bad = {name: sorted(modules - allowed) for name, modules in _imports(folder).items() if modules - allowed}
    assert not bad, f"{folder}/ imports outside {sorted(allowed)}: {bad}"
