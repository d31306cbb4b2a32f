"""The package's structure: data flows one way, so no module of lmrc imports, even inside a function, a module
that imports it back (directly or through others)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lmrc"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the lmrc modules it imports anywhere in its body (function-level imports included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != name and t.startswith("lmrc"):
                    deps.add(t)
        graph[name] = {d for d in deps if not name.startswith(d + ".") and d != "lmrc"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle_in_lmrc():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_downstream_layers_are_not_imported_upstream():
    """The scorer never imports a model; the data layer never imports the stages or the pipeline."""
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith(("lmrc.data", "lmrc.eval")):
            assert not {d for d in deps if d.startswith(("lmrc.stage1", "lmrc.stage2", "lmrc.pipeline"))}, (
                name
            )
        if name.startswith(("lmrc.stage1", "lmrc.stage2")):
            assert not {d for d in deps if d.startswith("lmrc.pipeline")}, name
        if name.startswith("lmrc.stage1"):
            assert not {d for d in deps if d.startswith("lmrc.stage2")}, name
