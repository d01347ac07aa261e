"""The package's imports form a tree: no module imports one that (directly or not) imports it back.

Read from the source with `ast`, function-level (lazy) imports included, so a circle cannot hide
behind an import inside a function.
"""

import ast
from pathlib import Path

STEM = Path(__file__).resolve().parents[1] / "stem"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(STEM.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """stem module -> the stem modules it imports."""
    paths = {module_name(p): p for p in STEM.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                deps |= {f"{target}.{a.name}" if f"{target}.{a.name}" in paths else target for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in paths and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_graph_reader_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_stem_imports_form_a_tree():
    graph = import_graph()
    assert "stem.cli.options" in graph["stem.cli.invert"] and "stem.settings" in graph["stem.engine"]  # it reads
    assert cycles(graph) == []


def test_the_core_does_not_import_its_faces():
    graph = import_graph()
    faces = {name for name in graph if name.startswith("stem.cli")}  # `python -m stem` (stem.__main__) runs it
    for name, deps in graph.items():
        if name not in faces | {"stem.__main__"}:
            assert not deps & faces, f"{name} imports the command line: {sorted(deps & faces)}"
