"""The project's import graph: no circle (counting imports made only for type checking), and
the emulator's layers as the architecture says — the oracles judge observations and never
drive the machine, the observers and the machine know nothing of the Executor."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("kernel_emu", "fuzz", "corpus", "workers", "dashboard", "fuzzfarm")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Project modules `module` imports at its top level (type-checking blocks included;
    imports inside functions are deferred on purpose and cannot make a load-time circle)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)

    visit(tree.body)
    return {name for name in found if name in known and name != module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


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


def test_the_import_graph_has_no_circle() -> None:
    graph = _graph()
    assert len(graph) > 40
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_a_circle_would_be_found() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_emulators_layers() -> None:
    graph = _graph()
    executor = "kernel_emu.executor"
    # nothing the Executor is made of knows it
    for part in ("kernel_emu.machine", "kernel_emu.firmware", "kernel_emu.tracing",
                 "kernel_emu.dirtypages", "kernel_emu.observations", "kernel_emu.snapshot",
                 "kernel_emu.watchdog", "kernel_emu.cycles", "kernel_emu.oracles",
                 "kernel_emu.userspace", "kernel_emu.allocations", "kernel_emu.result",
                 "kernel_emu.causes"):
        assert executor not in _reaches(graph, part), part
    # the oracles judge what was observed: they start, stop and restore nothing
    for driver in ("kernel_emu.snapshot", "kernel_emu.watchdog", "kernel_emu.cycles",
                   "kernel_emu.firmware", "kernel_emu.tracing"):
        assert driver not in _reaches(graph, "kernel_emu.oracles"), driver
    # the Result is the contract every other package reads: it depends on nothing
    assert _reaches(graph, "kernel_emu.result") == set()


def test_only_benchmarks_read_the_canaries() -> None:
    """Planted bugs' canaries are ground truth: the fuzzing job records them for a benchmark
    that asks (JobConfig.canaries) and the bugs benchmark reads them; no oracle, no part of the
    emulator and no farm module imports them."""
    graph = _graph()
    readers = {m for m, deps in graph.items() if "kernel_emu.canaries" in deps}
    assert readers == {"fuzz.harness", "fuzzfarm.bench_bugs", "fuzzfarm.bench_race"}
    for judge in ("kernel_emu.oracles", "kernel_emu.causes", "kernel_emu.executor",
                  "kernel_emu.allocations",
                  "kernel_emu.heapwalk", "kernel_emu.userspace", "fuzz.mutator",
                  "fuzz.feedback", "fuzz.minimize"):
        assert "kernel_emu.canaries" not in _reaches(graph, judge), judge
    assert not [m for m in readers if m.startswith(("workers.", "dashboard."))]
