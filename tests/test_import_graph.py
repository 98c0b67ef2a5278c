"""The import graph of the project's own modules (``magnet/``, ``sharding/``, ``launch/``), read from
their source with ``ast``: every import counts, also those inside functions, except imports under
``if TYPE_CHECKING:``. It has no cycle, and its layers point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("magnet", "sharding", "launch")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for root in ROOTS for p in (REPO / root).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or _type_checking_only(node, parents):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_is_read():
    graph = import_graph()
    assert "magnet.format.reader" in graph["magnet.data.pipeline"] and "sharding.slide" in graph["sharding.run"]
    assert "magnet.train.loop" in graph["launch.train"]  # an import inside a function counts


def test_no_import_cycle():
    assert _cycles(import_graph()) == []


def test_a_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


# (importer package, package it must never reach, directly or through others)
FORBIDDEN = [
    ("magnet.predict", "magnet.train"),
    ("magnet.evaluate", "magnet.train"),
    ("magnet.registry", "magnet.train"),
    ("sharding", "magnet.data"),
    ("magnet.data", "sharding"),
    ("magnet.format", "magnet.data"),
    ("magnet.format", "sharding"),
    ("magnet.format", "magnet.train"),
    ("magnet.format", "magnet.models"),
]


@pytest.mark.parametrize("importer, forbidden", FORBIDDEN)
def test_layers_point_one_way(importer, forbidden):
    graph = import_graph()
    bad = {(m, w) for m in graph if _under(m, importer) for w in _reach(graph, m) if _under(w, forbidden)}
    assert not bad, f"{importer} reaches {forbidden}: {sorted(bad)[:5]}"


def test_predict_reaches_sharding_through_one_module():
    """``magnet.predict`` imports ``sharding`` only through ``sharding.samples`` (the slide-to-samples iterator
    and the names prediction uses), every import counted, also those inside functions."""
    graph = import_graph()
    direct = {(m, w) for m in graph if _under(m, "magnet.predict") for w in graph[m] if _under(w, "sharding")}
    assert {w for _, w in direct} == {"sharding.samples"}, sorted(direct)
    assert "sharding.samples" in graph["magnet.predict.slide"] and "sharding.samples" in graph["sharding.slide"]
    assert not _reach(graph, "sharding.samples") & {"sharding.slide", "sharding.run"}  # the writer builds on it
