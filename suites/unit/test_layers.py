"""The layering the README draws, checked on the source: the shared layer (`vlm/`) imports nothing above
it; the reference and the runtime import only the shared layer (never each other, never the drivers);
and no module imports another that imports it back, directly or around a loop. Every import counts,
those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("vlm", "runtime", "reference", "harness")
# package -> the project packages it may import
ALLOWED = {"vlm": {"vlm"}, "runtime": {"runtime", "vlm"}, "reference": {"reference", "vlm"},
           "harness": set(PACKAGES)}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                # the longest project module the import names (a package's __init__ counts as its name)
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps
                  if d.split(".")[0] not in ALLOWED[m.split(".")[0]])


def test_each_layer_imports_only_what_lies_below_it():
    bad = layer_violations(import_graph())
    assert not bad, "layer rule broken:\n" + "\n".join(bad)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            # a package imports its own submodules on import (that is not a cycle); a submodule reaching
            # back to its package's __init__ is, unless the __init__ only re-exports it
            if m.startswith(d + ".") or d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph,expect", [
    ({"a.x": {"a.y"}, "a.y": {"a.x"}}, True),
    ({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}}, True),
    ({"a.x": {"a.y"}, "a.y": set()}, False),
])
def test_the_cycle_check_can_fail(graph, expect):
    assert (_cycle(graph) is not None) is expect


def test_the_layer_check_can_fail():
    """The graph holds the real imports, and a shared module importing the runtime, or the reference
    importing the runtime, is reported."""
    graph = import_graph()
    assert "vlm.arch" in graph["runtime.mapping"] and "runtime.model" in graph["harness.correctness.engine"]
    assert layer_violations({"vlm.capture": {"runtime.model"}, "reference.run": {"runtime.kernels"},
                             "runtime.model": {"harness.output"}}) == [
        "reference.run imports runtime.kernels", "runtime.model imports harness.output",
        "vlm.capture imports runtime.model"]
