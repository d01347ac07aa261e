"""The import graph of the project's own modules, from the source (ast), with every cycle named.

    python scripts/import_graph.py            # edges, one module per line, then the cycles
    python scripts/import_graph.py --dot      # Graphviz: ... | dot -Tsvg > imports.svg

Imports inside functions count (a lazy import is still a dependency); `if TYPE_CHECKING:` blocks do not.
Exit status 1 when there is a cycle.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stem", "benchmarks")
FACES = ("app",)  # top-level modules of the repository that use the library


def module_name(path: Path) -> str:
    """'stem/editing/fatezero.py' -> 'stem.editing.fatezero'; '__init__.py' names its package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` (module `name`) imports, resolved to the longest known module name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from . import x` imports the module x
                resolve(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def graph() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    files += [ROOT / f"{face}.py" for face in FACES if (ROOT / f"{face}.py").exists()]
    names = {module_name(p): p for p in files}
    known = set(names)
    return {name: imports_of(path, name, known) for name, path in sorted(names.items())}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
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

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            connect(v)
    return sorted(found)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dot", action="store_true", help="print Graphviz instead of text")
    args = parser.parse_args(argv)
    edges = graph()
    loops = cycles(edges)
    if args.dot:
        print("digraph imports {\n  rankdir=LR; node [shape=box, fontsize=10];")
        in_loop = {m for loop in loops for m in loop}
        for v, targets in edges.items():
            print(f'  "{v}"' + (" [color=red]" if v in in_loop else "") + ";")
            for w in sorted(targets):
                print(f'  "{v}" -> "{w}";')
        print("}")
    else:
        for v, targets in edges.items():
            print(f"{v} -> {', '.join(sorted(targets)) or '(nothing)'}")
        print(f"\n{len(loops)} cycle(s)" + "".join(f"\n  {' <-> '.join(loop)}" for loop in loops))
    return 1 if loops else 0


if __name__ == "__main__":
    sys.exit(main())
