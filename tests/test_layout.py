"""The code's layout, read from the source with ``ast`` (nothing is imported): the audit's stages in
``refusal_eval/pipeline/`` import one another without a circle, the report schema is data that imports neither
its writers nor its kinds, and no function of the pipeline is longer than a screen.

Every import statement counts: at module level, inside functions and under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "refusal_eval"
PIPELINE = PACKAGE / "pipeline"
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def imports_of(name: str) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (``from a import b`` counts as importing
    the module ``a.b`` where that is one, else ``a``)."""
    path = MODULES[name]
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y / from . import y
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def _cycles(nodes: set[str]) -> list[list[str]]:
    """Every import circle among ``nodes`` (as one representative path per strongly connected component)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v] & nodes:
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
                found.append(sorted(component))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return found


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in GRAPH[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_the_graph_sees_imports_inside_functions_and_under_type_checking():
    # the report schema imports the stats module inside a method only (Rate.wilson)
    assert "refusal_eval.stats" in GRAPH["refusal_eval.report.schema"]
    assert GRAPH["refusal_eval.pipeline.scores"] >= {"refusal_eval.pipeline.inputs", "refusal_eval.pipeline.behaviour"}
    assert "refusal_eval.pipeline.audit" in GRAPH["refusal_eval.cli"]  # imported inside a function


def test_no_import_circle_among_the_pipeline_stages():
    pipeline = {name for name in MODULES if name.startswith("refusal_eval.pipeline.")}
    assert {"refusal_eval.pipeline.inputs", "refusal_eval.pipeline.audit", "refusal_eval.pipeline.controls"} <= pipeline
    assert _cycles(pipeline) == []


def test_no_import_circle_through_the_pipeline():
    """Nor through a module outside it (the ``refusal_eval.audit`` re-exports sit above
    the pipeline: no stage may import them)."""
    through = [c for c in _cycles(set(MODULES)) if any(m.startswith("refusal_eval.pipeline") for m in c)]
    assert through == []
    for name in MODULES:
        if name.startswith("refusal_eval.pipeline"):
            assert not GRAPH[name] & {"refusal_eval.audit"}, name


@pytest.mark.parametrize("other", ["refusal_eval.report.writers", "refusal_eval.report.kinds"])
def test_the_report_schema_imports_neither_its_writers_nor_its_kinds(other):
    assert other not in GRAPH["refusal_eval.report.schema"]
    assert other not in _reachable("refusal_eval.report.schema")


def test_no_import_circle_among_the_report_modules():
    assert _cycles({name for name in MODULES if name.startswith("refusal_eval.report.")}) == []


def _functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            yield node.name, node.end_lineno - start + 1


def test_no_pipeline_function_is_longer_than_a_screen():
    lengths = {f"{path.name}:{name}": n for path in sorted(PIPELINE.glob("*.py")) for name, n in _functions(path)}
    assert lengths, "no functions found in refusal_eval/pipeline"
    too_long = {k: n for k, n in lengths.items() if n > MAX_FUNCTION_LINES}
    assert too_long == {}, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"
