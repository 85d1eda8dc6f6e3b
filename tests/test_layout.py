"""The house rules of the code layout (#26), checked on the source itself:

- no import circle anywhere in tpp/, study/, analysis/ -- module-level or inside a function, since a lazy
  import closes a circle at run time just the same;
- dependencies point one way between the packages: analysis and study use tpp, tpp uses neither, study
  never imports analysis; analysis takes from study only the names and the folder layout it shares with it;
- no module over 600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tpp", "study", "analysis")
MAX_LINES = 600
# analysis reads the study record (schema, store) and drives a study only through its public API (`study`)
ANALYSIS_MAY_USE = {"study.schema", "study.store", "study"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod and not mod.startswith(t + "."):  # a package's own __init__ is no edge
                    graph[mod].add(t)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_anywhere():
    assert _circles(_graph()) == []


def test_dependencies_point_one_way_between_packages():
    for mod, targets in _graph().items():
        top = mod.split(".")[0]
        for t in targets:
            other = t.split(".")[0]
            if top == "tpp":
                assert other == "tpp", f"{mod} imports {t}: tpp uses neither study nor analysis"
            if top == "study":
                assert other != "analysis", f"{mod} imports {t}: study never imports analysis"
            if top == "analysis" and other == "study":
                assert t in ANALYSIS_MAY_USE, f"{mod} imports {t}; analysis may use only {ANALYSIS_MAY_USE}"


def test_no_module_is_too_long_to_hold_in_your_head():
    long = {str(p.relative_to(ROOT)): n for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
