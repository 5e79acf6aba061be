"""The package's shape: no import cycle between ccld's modules, counting imports inside functions."""

import ast
from pathlib import Path

import ccld

PACKAGE_ROOT = Path(ccld.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = ["ccld", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def ccld_imports(path: Path, modules: set[str]) -> set[str]:
    """The ccld modules a file imports anywhere in it (module level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import sampling` names a module, not a value
                child = f"{target}.{alias.name}"
                found.add(child if child in modules else target)
    return {m for m in found if m in modules and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                result.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return result


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE_ROOT.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): ccld_imports(f, modules) for f in files}


def test_no_import_cycles_between_ccld_modules():
    graph = import_graph()
    # the graph is really read
    assert graph["ccld.apps.cli"] and "ccld.apps.options" in graph["ccld.apps.web.server"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_imports_the_version_back_from_the_package():
    graph = import_graph()
    importers = [m for m, targets in graph.items() if "ccld" in targets]
    assert importers == [], f"{importers} import from ccld/__init__; use ccld._version"
