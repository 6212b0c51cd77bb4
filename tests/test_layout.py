"""The package's shape: no module imports another in a circle (local imports count too), and the floors
only point down (ops never import nn, models, train or bench)."""

import ast
from pathlib import Path

import fastvl

PACKAGE = Path(fastvl.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """{module: fastvl modules it imports anywhere (module level or inside functions)}."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "kernels" not in p.relative_to(PACKAGE).parts}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name and not name.startswith(m + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_in_a_circle():
    graph = {name: {m for m in deps if m != "fastvl"} for name, deps in _imports().items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_ops_and_dispatch_import_nothing_above_them():
    above = ("fastvl.nn", "fastvl.models", "fastvl.train", "fastvl.bench", "fastvl.data", "fastvl.convert",
             "fastvl.cli", "fastvl.profiling")
    for name, deps in _imports().items():
        if name.startswith(("fastvl.ops", "fastvl.reference", "fastvl.dispatch")):
            assert not [d for d in deps if d.startswith(above)], f"{name} imports {deps}"
