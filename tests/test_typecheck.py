"""The engine contract is checked, not just written down: `mypy daemon/` passes
(configuration in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_passes_on_the_daemon_package():
    r = subprocess.run([sys.executable, "-m", "mypy", "daemon/"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
