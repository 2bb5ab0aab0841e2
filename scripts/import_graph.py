"""Print moefold's import graph between its top-level parts, as docs/architecture.md shows it.

    python scripts/import_graph.py

A part is a subpackage (`model`, `parallel`, ...) or a top-level module (`config`, `cli`, ...).
Each line names a part and the parts it imports; an import made inside a function (loaded only
when that function runs) is listed after `lazily:`. tests/unit/test_imports.py fails when the
graph in docs/architecture.md differs from this script's output, so the picture cannot go stale.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moefold"


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    return relative.parts[0]


def _module_name(path: Path) -> list[str]:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_parts(path: Path) -> tuple[set[str], set[str]]:
    """(parts imported at module level, parts imported only inside functions) by one file."""
    tree = ast.parse(path.read_text())
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package[:-1]
    eager: set[str] = set()
    lazy: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package[: len(package) - child.level + 1]
                    base = ".".join([*parent, *([child.module] if child.module else [])])
                names = [base] if base != "moefold" else [f"moefold.{a.name}" for a in child.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "moefold" and len(parts) > 1:
                    (lazy if inside else eager).add(parts[1])
            visit(child, inside)

    visit(tree, False)
    return eager, lazy


def import_graph() -> dict[str, tuple[set[str], set[str]]]:
    graph: dict[str, tuple[set[str], set[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py") and path.parent == PACKAGE:
            continue
        part = part_of(path)
        eager, lazy = graph.setdefault(part, (set(), set()))
        file_eager, file_lazy = imported_parts(path)
        eager |= file_eager - {part}
        lazy |= file_lazy - {part}
    for eager, lazy in graph.values():
        lazy -= eager
    return graph


def render(graph: dict[str, tuple[set[str], set[str]]]) -> str:
    width = max(len(part) for part in graph)
    lines = []
    for part in sorted(graph, key=lambda p: (len(_closure(graph, p)), p)):
        eager, lazy = graph[part]
        text = ", ".join(sorted(eager)) if eager else "(nothing from moefold)"
        if lazy:
            text += "; lazily: " + ", ".join(sorted(lazy))
        lines.append(f"{part:<{width}} -> {text}")
    return "\n".join(lines) + "\n"


def _closure(graph: dict[str, tuple[set[str], set[str]]], part: str) -> set[str]:
    """Every part `part` reaches through module-level imports (orders the printout root-first)."""
    seen: set[str] = set()
    stack = [part]
    while stack:
        for dep in graph.get(stack.pop(), (set(), set()))[0]:
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    return seen


if __name__ == "__main__":
    print(render(import_graph()), end="")
