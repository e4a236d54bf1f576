"""The import graph of llmgw: no cycles among its modules, and the library never imports its command line.

Every module under llmgw/ is parsed (AST, nothing is imported). An edge A -> B means that importing A runs B:
a module-level `import`/`from ... import` (also inside a module-level `if`/`try`, but not under
`if TYPE_CHECKING:`), with relative imports resolved, `from pkg import name` resolved to the submodule pkg.name
when there is one, and the packages B lives in counted too (importing a.b.c runs a/__init__ and a/b/__init__),
except those A lives in itself (they are already being imported when A is).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llmgw"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "_proto" not in p.parts}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


# Where a late import may hide: run at call time, not at import time.
_BODIES_WHEN_NESTED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.For, ast.AsyncFor, ast.While)


def _statements(body: list[ast.stmt], *, nested: bool):
    """Import statements of a body: module level only, or (nested=True) also inside functions and classes."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _statements(node.body, nested=nested)
            yield from _statements(node.orelse, nested=nested)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _statements(block, nested=nested)
        elif isinstance(node, (ast.With, ast.AsyncWith)) or (nested and isinstance(node, _BODIES_WHEN_NESTED)):
            yield from _statements(node.body, nested=nested)


def imported_modules(name: str, path: Path, known: set[str], *, nested: bool = False) -> set[str]:
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    targets: set[str] = set()
    for node in _statements(tree.body, nested=nested):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        for alias in node.names:
            candidate = f"{prefix}.{alias.name}"
            targets.add(candidate if candidate in known else prefix)
    own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1 + is_package)}
    edges: set[str] = set()
    for target in targets:
        if not (target == "llmgw" or target.startswith("llmgw.")):
            continue
        while target not in known and "." in target:  # `import llmgw.x.y.attr`-like spellings
            target = target.rsplit(".", 1)[0]
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            dependency = ".".join(parts[:i])
            if dependency in known and dependency != name and dependency not in own_packages:
                edges.add(dependency)
    return edges


def import_graph(*, nested: bool = False) -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known, nested=nested) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted; sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_the_graph_walker_finds_what_it_should(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    # Real modules: edges we know are there.
    graph = import_graph()
    assert "llmgw.topology" in graph["llmgw.gossip.node"]
    assert "llmgw.gossip" in graph["llmgw.replica.server"]  # a package counts as what runs its __init__
    assert "llmgw.gossip" not in graph["llmgw.gossip.node"]  # but not the package a module lives in
    assert len(graph) > 40


def test_no_import_cycles_among_llmgw_modules():
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles (module-level imports): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_import_cycles_even_through_late_imports():
    """Imports inside functions only postpone a cycle to the first call; none are hidden that way either."""
    cycles = find_cycles(import_graph(nested=True))
    assert cycles == [], "import cycles (counting late imports): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_library_never_imports_the_command_line():
    """llmgw.cli parses flags and calls the library (llmgw.replica.app, llmgw.gateway.app, llmgw.cluster);
    the other direction -- even a late import inside a function -- would make the CLI part of the library."""
    offenders = {name: sorted(t for t in targets if t == "llmgw.cli" or t.startswith("llmgw.cli."))
                 for name, targets in import_graph(nested=True).items()
                 if not (name == "llmgw.__main__" or name == "llmgw.cli" or name.startswith("llmgw.cli."))}
    assert {k: v for k, v in offenders.items() if v} == {}
