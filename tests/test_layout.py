"""The house rules that a test can check: lower floors never import upper ones."""
from __future__ import annotations

import ast
from pathlib import Path

import renorm

SOURCE = Path(renorm.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """renorm module -> the renorm modules it imports anywhere (top level or inside functions)."""
    modules = {}
    for path in SOURCE.rglob("*.py"):
        name = ".".join(("renorm", *path.relative_to(SOURCE).with_suffix("").parts)).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("renorm"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            # the package itself (renorm/__init__: the public facade, and __version__) is not a floor
            graph[name] |= {t for t in targets if t in modules and t not in (name, "renorm")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    """data <-> photos and export <-> models were cycles: the shared pieces moved down to
    renorm.images and renorm.checkpoint."""
    graph = import_graph()
    assert "renorm.data" not in graph["renorm.photos"]
    assert "renorm.models" not in graph["renorm.export"]
    assert cycles(graph) == []
