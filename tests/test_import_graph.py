"""The import graph of the project's own modules (issue 19): one import root (`basel_edge`; the exporters/,
runtimes/ and eval/ folders install as its subpackages), no cycle among module-level imports, and the core never
imports the harness (`basel_edge.eval`) at module level."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# folder -> the package it installs as (pyproject's package-dir)
PACKAGES = {"basel_edge": "basel_edge", "exporters": "basel_edge.exporters", "runtimes": "basel_edge.runtimes",
            "eval": "basel_edge.eval"}
HARNESS = "basel_edge.eval"
OUTSIDE_CORE = ("basel_edge.eval", "basel_edge.exporters", "basel_edge.runtimes")


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _every_import(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file (function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


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
    assert "basel_edge.exporters" in graph["basel_edge.exporters.onnx"]  # a folder installed under the root


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_core_does_not_import_the_harness_at_module_level():
    offenders = {m: sorted(d for d in deps if d == HARNESS or d.startswith(HARNESS + "."))
                 for m, deps in _graph().items() if not m.startswith(OUTSIDE_CORE)}
    assert not {m: d for m, d in offenders.items() if d}


def test_one_import_root():
    """Nothing imports exporters, runtimes or eval as top-level packages: installed, they live under basel_edge
    (a top-level `eval` would be whatever other distribution owns that name)."""
    old_roots = {folder for folder in PACKAGES if folder != "basel_edge"}
    files = [p for folder in (*PACKAGES, "tests") for p in (ROOT / folder).rglob("*.py")]
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _every_import(p) if m.split(".")[0] in old_roots)
                 for p in files}
    assert not {f: m for f, m in offenders.items() if m}


def test_the_demo_calls_library_functions_not_the_cli():
    """The demo builds typed jobs (basel_edge.jobs, exporters.ExportJob, ValidateConfig) instead of argv for
    `basel_edge.cli.main`, anywhere in the file (function bodies included)."""
    modules = _modules()
    tree = ast.parse(modules["basel_edge.eval.demo"].read_text())
    imports = _every_import(modules["basel_edge.eval.demo"]) | {
        f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names}
    assert not any(m == "basel_edge.cli" or m.startswith("basel_edge.cli.") for m in imports)
    assert {"basel_edge.jobs", "basel_edge.exporters", "basel_edge.eval.harness"} <= imports
