"""The project's shape: no import circles, a core that imports no method, stages that never import each other,
and files a reader can take in (docs/ARCHITECTURE.md draws the map these tests keep true).

The import graph is built with :mod:`ast` from the source itself, counting every import: at module level,
inside functions (deferred imports still tie two modules together) and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("atomicio", "timebudget", "synth", "distill", "pipelines", "zoo", "shards", "realdata")
MAX_LINES = 400
LONG_FILE_REASON = "over 400 lines"  # a longer file says why in its module docstring, in these words


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _source_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            files[_module_name(path)] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (``from pkg import submodule`` counts as the submodule)."""
    files = _source_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in files else source
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import a.b.c` of a project module, or an attribute path
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_relative_deferred_and_type_checking_imports():
    graph = import_graph()
    assert "synth.core.protocol" in graph["synth.core.inversion"]  # relative, module level
    assert "synth.core.updates" in graph["synth.core.protocol"]
    assert "synth.core.augment" in graph["synth.methods.fast"]  # `from synth.core import augment`
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert _cycles(import_graph()) == []


def test_the_inversion_core_imports_no_method_plugin_or_command():
    outside = ("synth.methods", "synth.plugins", "synth.commands", "synth.dataset", "synth.runner", "synth.presets",
               "synth.fanout", "synth.resume")
    for module, edges in import_graph().items():
        if module.startswith("synth.core"):
            bad = sorted(e for e in edges if e.startswith(outside))
            assert not bad, f"{module} imports {bad}"


def test_the_two_stages_never_import_each_other():
    for module, edges in import_graph().items():
        for mine, theirs in (("synth", "distill"), ("distill", "synth")):
            if module.split(".")[0] == mine:
                bad = sorted(e for e in edges if e.split(".")[0] == theirs)
                assert not bad, f"{module} imports {bad}"


def test_a_method_family_keeps_its_helpers_in_its_own_folder():
    graph = import_graph()
    for family in ("synth.methods.kgen", "synth.methods.diffdfkd", "synth.plugins.condensed"):
        for module, edges in graph.items():
            if not module.startswith(family) and not module.startswith("tests"):
                users = sorted(e for e in edges if e.startswith(family + "."))
                assert not users or module.startswith("synth.commands"), f"{module} reaches into {users}"


def test_synth_top_level_stays_small():
    modules = [p for p in (ROOT / "synth").glob("*.py")]
    assert len(modules) <= 12, sorted(p.name for p in modules)


def test_no_file_is_over_400_lines_without_saying_why():
    long = []
    for path in [*_source_files().values(), *sorted((ROOT / "tests").glob("*.py"))]:
        lines = path.read_text().count("\n")
        if lines > MAX_LINES and LONG_FILE_REASON not in (ast.get_docstring(ast.parse(path.read_text())) or ""):
            long.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert not long, f"over {MAX_LINES} lines without a reason in the docstring: {long}"
