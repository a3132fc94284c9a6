"""The engine contract is checked, not just written down: `mypy` passes over daemon/ and bridge/,
the bodies of untyped functions included (configuration in pyproject.toml)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from daemon.engines import ASRPool, ASRSession, TTSEngine

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_passes_on_the_daemon_and_bridge_packages():
    r = subprocess.run([sys.executable, "-m", "mypy", "--check-untyped-defs", "daemon/", "bridge/"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]


def test_every_engine_keeps_the_contract_the_daemon_calls():
    """The real engines and the FAKE ones (tests/fake_engines.py) against daemon/engines.py's
    Protocols (tests/helpers/engine_contract.py, type-checked)."""
    env = dict(os.environ, MYPYPATH=str(ROOT / "tests"))
    r = subprocess.run([sys.executable, "-m", "mypy", "tests/helpers/engine_contract.py"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]


def test_no_contract_member_is_reached_by_getattr():
    """The daemon calls what daemon/engines.py declares: no contract member, and nothing on a pool
    or an engine, is probed by name."""
    members = set()
    for proto in (ASRPool, ASRSession, TTSEngine):
        members |= {n for n in vars(proto) if not n.startswith("_")} | set(proto.__annotations__)
    assert {"feed_steps", "run_requests", "set_early_silence", "set_sentence_end", "judge"} <= members
    probe = re.compile(r"""\b(?:getattr|hasattr|setattr)\(\s*([^,()]+?)\s*,\s*["'](\w+)["']""")
    engine = re.compile(r"(self\.)?(pool|engine|asr_engine|tts_engine)")
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in sorted((ROOT / "daemon").rglob("*.py"))
             for m in probe.finditer(p.read_text(encoding="utf-8"))
             if m.group(2) in members or engine.fullmatch(m.group(1))]
    assert not found, found
