"""Imports inside ``medfed/data/`` run one way: no module imports another inside a function (the
mark of a circle worked around), and the module-level imports between them form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import medfed.data

DATA = Path(medfed.data.__file__).parent


def _data_imports(node: ast.AST) -> list[str]:
    """The ``medfed.data`` modules an import statement names (``__init__`` for the package itself)."""
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        if node.module == "medfed.data":
            names = [alias.name for alias in node.names]
            return [name if (DATA / f"{name}.py").is_file() else "__init__" for name in names]
        if node.module.startswith("medfed.data."):
            return [node.module.split(".")[2]]
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[2] for alias in node.names if alias.name.startswith("medfed.data.")]
    return []


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """The data modules ``path`` imports at module level, and those it imports inside a function."""
    tree = ast.parse(path.read_text())
    top = {name for node in tree.body for name in _data_imports(node)}
    nested = [
        f"{path.name}:{inner.lineno} imports medfed.data.{name}"
        for outer in ast.walk(tree)
        if isinstance(outer, ast.FunctionDef | ast.AsyncFunctionDef)
        for inner in ast.walk(outer)
        for name in _data_imports(inner)
    ]
    return top, nested


def test_no_data_module_imports_another_inside_a_function() -> None:
    nested = [line for path in sorted(DATA.glob("*.py")) for line in _imports(path)[1]]
    assert nested == []


def test_data_modules_import_each_other_without_a_cycle() -> None:
    graph = {path.stem: _imports(path)[0] for path in DATA.glob("*.py") if path.stem != "__init__"}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())
    assert "__init__" not in set().union(*graph.values()), "a data module imports the medfed.data package"
