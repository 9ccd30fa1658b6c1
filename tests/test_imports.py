"""The project's import graph has no cycles (CONTRIBUTING.md, "Layout").

Every ``import`` statement of every module counts, also those inside functions (a lazy import hides a
cycle from Python, not from the reader). Modules are found through the ``[tool.setuptools.package-dir]``
table of pyproject.toml, so a new folder or subpackage is covered without editing this test.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the installed packages."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules: dict[str, Path] = {}
    for package, folder in dirs.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """All import statements, at any depth, except those under ``if TYPE_CHECKING:`` (never executed)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported project module: line of the first such import}."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` imports mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # ``import a.b.c`` of a non-module attribute
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(graph):
            if v not in index:
                strongconnect(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def describe(component: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> str:
    """One line per import edge inside the component: ``a (file:line) -> b``."""
    members = set(component)
    lines = [f"cycle among {', '.join(component)}:"]
    for a in component:
        for b, line in sorted(graph[a].items()):
            if b in members:
                path = modules[a]
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                lines.append(f"    {a} ({where}:{line}) -> {b}")
    return "\n".join(lines)


def test_the_graph_sees_lazy_relative_and_package_imports(tmp_path):
    """The graph builder itself: imports inside functions, relative imports and ``from pkg import mod``."""
    mods = {"p": tmp_path / "p" / "__init__.py", "p.a": tmp_path / "p" / "a.py", "p.b": tmp_path / "p" / "b.py",
            "p.c": tmp_path / "p" / "c.py"}
    mods["p"].parent.mkdir()
    mods["p"].write_text("")
    mods["p.a"].write_text("from .b import f\n")
    mods["p.b"].write_text("import os\n\ndef f():\n    from p import c\n    return c\n")
    mods["p.c"].write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
                           "def g():\n    import p.a as a\n    return a\n")
    graph = import_graph(mods)
    assert graph == {"p": {}, "p.a": {"p.b": 1}, "p.b": {"p.c": 4}, "p.c": {"p.a": 5}}
    assert cycles(graph) == [["p.a", "p.b", "p.c"]]
    assert describe(["p.a", "p.b", "p.c"], graph, mods).splitlines()[1:] == [
        f"    p.a ({mods['p.a']}:1) -> p.b", f"    p.b ({mods['p.b']}:4) -> p.c", f"    p.c ({mods['p.c']}:5) -> p.a"]
    graph["p.c"] = {}
    assert cycles(graph) == []


def test_no_import_cycles():
    modules = project_modules()
    assert {"negdpo.cli", "negdpo.core.models.presets", "negdpo.generator.lora_io",
            "negdpo.segmentation.evaluate"} <= set(modules)
    graph = import_graph(modules)
    found = cycles(graph)
    assert not found, "import cycles (break them; see CONTRIBUTING.md, Layout):\n" + "\n".join(
        describe(c, graph, modules) for c in found)
