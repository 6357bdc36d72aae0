"""The package's shape, checked: layers, no import cycles, module and class sizes, one ring walk.

These hold the structure docs/design.md ("Package map") describes. The packages
are layers, each importing only the ones below it:

    shmcache (the public face: __init__, __main__)      imports anything
    cli/                                                 format, ipc, reader, writer, proxy, etcdapi
    proxy/                                               format, ipc, reader, etcdapi
    reader/          writer/ (writer/etcd/)              format, ipc (writer: etcdapi); never each other
    etcdapi/                                             nothing of the package's (etcd's protos)
    ipc/                                                 format
    format/                                              nothing of the package's
    errors, types, _args, _defaults, _units              (shared by every layer) each other only

Every import counts, also those inside functions and under ``if TYPE_CHECKING:``:
a lower module that needs to call up takes a protocol or a callable it defines
itself. The reader side (format, ipc, reader) imports no etcd, gRPC or protobuf.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).parent.parent / "shmcache"
MODULES = sorted(PKG.rglob("*.py"))
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400
MAX_TOP_LEVEL_MODULES = 8
SHARED = {"errors", "types", "_args", "_defaults", "_units"}
LAYERS = {  # layer -> the layers it may import (itself included)
    "shared": {"shared"},
    "format": {"shared", "format"},
    "ipc": {"shared", "format", "ipc"},
    "reader": {"shared", "format", "ipc", "reader"},
    "etcdapi": {"etcdapi"},
    "writer": {"shared", "format", "ipc", "etcdapi", "writer"},
    "proxy": {"shared", "format", "ipc", "reader", "etcdapi", "proxy"},
    "cli": {"shared", "format", "ipc", "reader", "writer", "etcdapi", "proxy", "cli", "face"},
    "face": {"shared", "format", "ipc", "reader", "writer", "etcdapi", "proxy", "cli", "face"},
}
ETCD = ("etcd3", "grpc", "google.protobuf")


def _name(path: Path) -> str:
    """The dotted module name of ``path`` (a package's ``__init__`` is the package)."""
    parts = ("shmcache",) + path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


NAMES = {_name(p): p for p in MODULES}


def _layer(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "face"
    if len(parts) == 2 and parts[1] in SHARED:
        return "shared"
    return parts[1]


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(package modules, other top-level names) that ``path`` imports anywhere: at module
    level, inside functions and under ``if TYPE_CHECKING:`` alike."""
    here = _name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    ours: set[str] = set()
    others: set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            for a in node.names:
                (ours if a.name.startswith("shmcache") else others).add(a.name)
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[:len(package) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
            if not module.startswith("shmcache"):
                others.add(module)
                continue
        for a in node.names:  # ``from . import x``: x is a module when there is one
            sub = f"{module}.{a.name}"
            ours.add(sub if sub in NAMES else module)
    # The package a module sits in is imported with it: only explicit imports count.
    return {m for m in ours if m in NAMES and m != "shmcache" or m == "shmcache"
            and _layer(_name(path)) in ("cli", "face")}, others


GRAPH = {name: _imports(path)[0] for name, path in NAMES.items()}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_module_and_class_sizes(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines"
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ClassDef):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            assert n <= MAX_CLASS_LINES, f"class {node.name} in {path.name} has {n} lines"


def test_the_top_level_is_the_public_face() -> None:
    """shmcache/ itself holds the public face and the few modules every layer shares;
    everything else lives in a layer's package."""
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    assert {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()} <= {
        "format", "ipc", "reader", "writer", "cli", "etcdapi", "proxy"}
    assert {n for n in NAMES if _layer(n) not in LAYERS} == set()


def test_layers_import_only_the_layers_below() -> None:
    bad = sorted(f"{m} -> {n}" for m, deps in GRAPH.items() for n in deps
                 if _layer(n) not in LAYERS[_layer(m)])
    assert not bad, "imports across layers:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            dfs(m)


def test_the_reader_side_imports_no_etcd() -> None:
    """Readers live inside users' applications: format, ipc and reader never import etcd3,
    grpc or protobuf (docs/design.md, "Reader dependencies")."""
    for name, path in NAMES.items():
        if _layer(name) in ("shared", "format", "ipc", "reader"):
            others = _imports(path)[1]
            assert not {o for o in others if o.startswith(ETCD)}, (name, others)


def test_config_and_service_stay_light() -> None:
    """config does not pull in the writer (etcd3, grpc) and service does not import the
    command line (counting imports inside functions)."""
    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(GRAPH[m])
        return seen

    assert not {m for m in reach("shmcache.cli.config") if _layer(m) == "writer"}
    assert "shmcache.cli.commands" not in reach("shmcache.cli.service")


def test_ring_records_are_read_in_one_place() -> None:
    """Only format/ring.py calls read_record; everything else walks records with iter_records."""
    for path in MODULES:
        if path == PKG / "format" / "ring.py":
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Attribute) and node.attr in ("read_record", "walk") and \
                    isinstance(node.value, ast.Name) and node.value.id == "ring":
                raise AssertionError(f"{path.name}:{node.lineno} calls ring.{node.attr}")


# The stores into an object handed to a function that are deliberate (at most 3): module,
# the target as written -> why it is not the object's own method doing it.
STATE_STORE_EXCEPTIONS = {
    # A property of Writer: the store runs Writer's own setter, which hands the callback
    # to its feed (the service sets it before run()).
    ("cli/service.py", "writer.list_progress"): "Writer.list_progress is a property",
}
assert len(STATE_STORE_EXCEPTIONS) <= 3


def _params(fn: ast.AST) -> set[str]:
    assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    a = fn.args
    names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
    names |= {x.arg for x in (a.vararg, a.kwarg) if x is not None}
    return names - {"self", "cls"}


def _private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def _stores(path: Path) -> list[tuple[int, str]]:
    """``x.attr = / += / del`` (and ``setattr(x, ...)``) where ``x`` is a parameter of the
    function (or of a function around it) other than self/cls, and ``obj._private = ...``
    on anything but self/cls."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, params: set[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            params = params | _params(node)
        targets: list[ast.expr] = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("setattr", "delattr") and node.args and \
                isinstance(node.args[0], ast.Name) and node.args[0].id in params:
            found.append((node.lineno, ast.unparse(node.args[0]) + ".<setattr>"))
        for target in targets:
            for t in ast.walk(target):
                if not isinstance(t, ast.Attribute) or isinstance(t.ctx, ast.Load):
                    continue
                own = isinstance(t.value, ast.Name) and t.value.id in ("self", "cls")
                if isinstance(t.value, ast.Name) and t.value.id in params or \
                        _private(t.attr) and not own:
                    found.append((node.lineno, ast.unparse(t)))
        for child in ast.iter_child_nodes(node):
            visit(child, params)

    visit(_tree(path), set())
    return found


def test_objects_change_their_own_state() -> None:
    """No function assigns attributes of an object handed to it, nor anything's private
    attributes but its own: an object's state changes through its own methods (docs/
    design.md, "Package map"), so reading a class tells everything that changes it.
    The few deliberate exceptions are listed, with why, in STATE_STORE_EXCEPTIONS."""
    seen: set[tuple[str, str]] = set()
    bad = []
    for path in MODULES:
        rel = str(path.relative_to(PKG))
        for line, target in _stores(path):
            if (rel, target) in STATE_STORE_EXCEPTIONS:
                seen.add((rel, target))
            else:
                bad.append(f"{rel}:{line}: {target}")
    assert not bad, "stores into another object's state:\n" + "\n".join(bad)
    assert seen == set(STATE_STORE_EXCEPTIONS), "exceptions no longer needed: " + str(
        set(STATE_STORE_EXCEPTIONS) - seen)


def test_the_state_store_check_finds_what_it_should() -> None:
    """The check above sees parameters of enclosing functions, augmented and annotated
    assignments, tuple targets, deletions, setattr and privates on any object."""
    src = (
        "def f(p, q, self):\n"
        "    p.a = 1\n"
        "    q.b += 1\n"
        "    x: int; p.c: int = 2\n"
        "    (p.d, y) = (1, 2)\n"
        "    del q.e\n"
        "    setattr(p, 'f', 1)\n"
        "    other._g = 1\n"
        "    self.h = 1\n"
        "    self._i = 1\n"
        "    local = 1\n"
        "    local.__name__ = 'x'\n"
        "    def inner(r):\n"
        "        p.j = r\n"
        "        r.k = 1\n"
    )
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".py") as f:
        f.write(src)
        f.flush()
        got = [t for _, t in _stores(Path(f.name))]
    assert got == ["p.a", "q.b", "p.c", "p.d", "q.e", "p.<setattr>", "other._g", "p.j", "r.k"]


DESIGN = (PKG.parent / "docs" / "design.md").read_text()
PACKAGES = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").exists())


def _map_section() -> str:
    start = DESIGN.index("\n## Package map\n")
    return DESIGN[start:DESIGN.index("\n## ", start + 1)]


def _documented_packages() -> dict[str, set[str]]:
    """package -> the modules its table in design.md's package map names."""
    import re
    text = _map_section()
    heads = list(re.finditer(r"^\*\*`(\w+)/`: [^*]+\.\*\*", text, re.M))
    out: dict[str, set[str]] = {}
    for i, m in enumerate(heads):
        body = text[m.end():heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        names: set[str] = set()
        for row in body.splitlines():
            if row.startswith("| `"):
                names |= set(re.findall(r"`([\w/.]+)`", row.split("|")[1]))
        assert m[1] not in out, f"two sections for {m[1]}/"
        out[m[1]] = names - {"__init__"}
    return out


def test_the_package_map_names_every_package_and_module() -> None:
    """docs/design.md's package map is the tree: a section with a sentence for every
    package, a row for every module (subpackages' as ``etcd/connection``, C sources
    with their suffix), nothing that is gone, and the layer lines match LAYERS."""
    import re
    documented = _documented_packages()
    assert sorted(documented) == PACKAGES
    for pkg in PACKAGES:
        root = PKG / pkg
        modules = {str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.py")
                   if p.name != "__init__.py"}
        modules |= {str(p.relative_to(root)) for p in root.rglob("*.c")}
        assert documented[pkg] == modules, (
            f"{pkg}/: missing from the map {sorted(modules - documented[pkg])}, "
            f"in the map but not in the tree {sorted(documented[pkg] - modules)}")
    block = _map_section().split("```")[1]
    top = {n for line in block.splitlines() if line.startswith("shmcache/")
           for n in re.findall(r"\b_?\w+\b", line.split("  ")[0].removeprefix("shmcache/"))}
    assert top == {p.stem for p in PKG.glob("*.py")}
    lines = {m[1]: m[2] for m in re.finditer(r"^(\w+)/ +-> (.*)$", block, re.M)}
    assert sorted(lines) == PACKAGES
    for pkg, deps in lines.items():
        named = set() if deps.startswith("nothing") else set(deps.split(", "))
        assert named == LAYERS[pkg] - {"shared", "face", pkg}, pkg
