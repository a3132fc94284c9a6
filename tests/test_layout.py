"""The daemon package keeps the shape the README's architecture section describes: no import
circle between its modules, and no module over 500 lines except the engines themselves."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

DAEMON = Path(__file__).resolve().parent.parent / "daemon"
ENGINES = {"asr_funasr", "asr_whisper", "tts_melo", "tts_kokoro", "tts_piper"}
MAX_LINES = 500


def modules() -> Dict[str, Path]:
    out = {}
    for p in DAEMON.rglob("*.py"):
        name = ".".join(p.relative_to(DAEMON.parent).with_suffix("").parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def import_graph() -> Dict[str, Set[str]]:
    mods = modules()
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("daemon"):
                for a in node.names:
                    dep = f"{node.module}.{a.name}"
                    graph[m].add(dep if dep in mods else node.module)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name.startswith("daemon"))
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


def test_no_import_circle_in_the_daemon_package():
    assert cycles(import_graph()) == []
    # the detector itself finds a circle
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_no_module_over_500_lines_but_the_engines():
    long = {m: len(p.read_text().splitlines()) for m, p in modules().items()
            if m.split(".")[-1] not in ENGINES}
    assert {m: n for m, n in long.items() if n > MAX_LINES} == {}
