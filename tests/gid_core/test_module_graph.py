"""The shape of the gid_core package: no import cycle, not even through imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import gid_core

PACKAGE = Path(gid_core.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """The gid_core modules ``path`` imports anywhere (top level, functions, TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gid_core."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("gid_core."))
    return found - {path.stem}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> imported modules) as a path, or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for dep in sorted(graph.get(module, ())):
            if cycle := visit(dep, path + [module]):
                return cycle
        done.add(module)
        return None

    return next((c for m in sorted(graph) if (c := visit(m, []))), None)


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_gid_core_has_no_import_cycle():
    graph = {p.stem: imported_modules(p) for p in PACKAGE.glob("*.py")}
    assert {"trainer", "hooks", "engine", "jobdir"} <= set(graph)
    assert find_cycle(graph) is None, find_cycle(graph)
    assert "hooks" not in graph["trainer"]  # hooks depend on the trainer, not the other way round
