"""The package's shape, checked: module and class sizes, no import cycles, one ring walk.

These hold the structure docs/design.md ("Module map") describes: one concern
per module, no class that does everything, the ring's records read in one
place (``ring.iter_records``), and reader-side modules free of etcd and gRPC.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).parent.parent / "shmcache"
MODULES = sorted(PKG.glob("*.py"))
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_and_class_sizes(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines"
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ClassDef):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            assert n <= MAX_CLASS_LINES, f"class {node.name} in {path.name} has {n} lines"


def _all_imports(path: Path) -> set[str]:
    """Package modules ``path`` imports anywhere (also inside functions), except for
    type checking."""
    out: set[str] = set()
    tree = _tree(path)
    checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in checking or not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 1:
            out.update([node.module.split(".")[0]] if node.module else
                       [a.name for a in node.names])
        elif node.module and node.module.startswith("shmcache."):
            out.add(node.module.split(".")[1])
    return {m for m in out if (PKG / f"{m}.py").exists()}


def _module_level_imports(path: Path) -> set[str]:
    """Package modules imported when ``path`` is imported (not inside functions or
    ``if TYPE_CHECKING:``)."""
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If):
                test = node.test
                if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
                    continue
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
            elif isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    out.add(node.module.split(".")[0])
                else:
                    out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("shmcache."):
                out.add(node.module.split(".")[1])

    visit(_tree(path).body)
    return {m for m in out if (PKG / f"{m}.py").exists()}


def test_no_import_cycles() -> None:
    graph = {p.stem: _module_level_imports(p) for p in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)


def test_layering() -> None:
    """config does not pull in the writer (etcd3, grpc); service does not import the CLI;
    the reader side never imports the writer side (counting imports inside functions)."""
    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            todo.extend(_all_imports(PKG / f"{m}.py"))
        return seen

    writer_side = {"writer", "_feed", "_etcd", "_publisher", "_restore", "_segments",
                   "_snapbuild"}
    assert not reach("config") & writer_side, reach("config") & writer_side
    assert "cli" not in reach("service")
    for m in ("reader", "_view", "_watch", "_history", "aio", "subscribe"):
        assert not reach(m) & writer_side, (m, reach(m) & writer_side)


def test_ring_records_are_read_in_one_place() -> None:
    """Only ring.py calls read_record; everything else walks records with iter_records."""
    for path in MODULES:
        if path.name == "ring.py":
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Attribute) and node.attr in ("read_record", "walk") and \
                    isinstance(node.value, ast.Name) and node.value.id == "ring":
                raise AssertionError(f"{path.name}:{node.lineno} calls ring.{node.attr}")
