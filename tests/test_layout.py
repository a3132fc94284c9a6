"""The daemon and bridge packages keep the shape the README's architecture section describes:
folders by concern, each saying what lives there; at most 12 modules at the daemon's top level;
no import circle; the daemon never imports the bridge; no module over 500 lines, engines included."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (ROOT / "daemon", ROOT / "bridge")
DAEMON = PACKAGES[0]
MAX_LINES = 500
MAX_TOP_LEVEL = 12


def modules() -> Dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in pkg.rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def import_graph() -> Dict[str, Set[str]]:
    mods = modules()
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("daemon", "bridge"):
                for a in node.names:
                    dep = f"{node.module}.{a.name}"
                    graph[m].add(dep if dep in mods else node.module)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name.split(".")[0] in ("daemon", "bridge"))
    return {m: {d for d in deps if d in mods and d != m} for m, deps in graph.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_the_daemon_and_bridge_packages():
    assert cycles(import_graph()) == []
    # the detector itself finds a circle
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_no_module_over_500_lines_engines_included():
    lines = {m: len(p.read_text().splitlines()) for m, p in modules().items()}
    assert {m: n for m, n in lines.items() if n > MAX_LINES} == {}


def test_the_daemon_never_imports_the_bridge():
    graph = import_graph()
    assert {m: sorted(d for d in deps if d.startswith("bridge"))
            for m, deps in graph.items() if m.startswith("daemon") and any(d.startswith("bridge") for d in deps)} == {}


def test_folders_by_concern_each_say_what_they_hold():
    top = sorted(p.name for p in DAEMON.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, top
    for pkg in PACKAGES:
        for init in [pkg / "__init__.py", *pkg.glob("*/__init__.py")]:
            doc = ast.get_docstring(ast.parse(init.read_text()))
            assert doc and len(doc) > 40, f"{init.relative_to(ROOT)} says nothing of what lives there"
