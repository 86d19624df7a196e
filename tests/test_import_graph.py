"""The import graph of the project's own modules (issue 19): no cycle among module-level imports, and nothing
under `basel_edge/` imports `eval` at module level (the core must not depend on the harness)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("basel_edge", "exporters", "runtimes", "eval")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _module_level_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `name` imports when it is imported (function bodies excluded)."""
    found = set()
    for statement in ast.parse(path.read_text()).body:
        nodes = list(ast.walk(statement)) if isinstance(statement, (ast.If, ast.Try, ast.With)) else [statement]
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - (path.name != "__init__.py") - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _module_level_imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_graph_is_read_from_the_sources():
    graph = _graph()
    assert "basel_edge.errors" in graph["basel_edge.compress.basel"]
    assert "basel_edge.families.base" in graph["basel_edge.families.llama"]


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_core_does_not_import_the_harness_at_module_level():
    offenders = {m: sorted(d for d in deps if d == "eval" or d.startswith("eval."))
                 for m, deps in _graph().items() if m.startswith("basel_edge")}
    assert not {m: d for m, d in offenders.items() if d}
