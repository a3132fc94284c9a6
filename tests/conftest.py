"""Test harness: offline guard for the whole suite, shared model and fixture paths.

Every test process, and every Python subprocess it starts, runs with the offline guard
(tests/offline/sitecustomize.py): a connection or lookup to a non-loopback address fails
and is logged; the session fails at the end if anything tried.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FIXTURES = TESTS / "fixtures"
OFFLINE_DIR = TESTS / "offline"

# Install the guard in this process and make every child inherit it.
os.environ["S2S_OFFLINE_GUARD"] = "1"
os.environ.setdefault("S2S_OFFLINE_LOG", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"s2s-offline-{os.getpid()}.log"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(OFFLINE_DIR), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
# Libraries that would otherwise phone home.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["MODELSCOPE_OFFLINE"] = "1"
# Property tests: the same examples on every run by default (a red CI must mean a change broke
# something, not that a new random example turned up). HYPOTHESIS_PROFILE=explore searches anew;
# what it finds becomes a named regression test.
from hypothesis import settings as _hsettings  # noqa: E402

_hsettings.register_profile("ci", derandomize=True, print_blob=True)
_hsettings.register_profile("explore", derandomize=False, print_blob=True)
_hsettings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Load the guard by path: a `sitecustomize` from the Python installation may already own that name.
_spec = importlib.util.spec_from_file_location("s2s_offline_guard", OFFLINE_DIR / "sitecustomize.py")
_guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_guard)  # type: ignore[union-attr]


def pytest_sessionfinish(session, exitstatus):
    log = Path(os.environ["S2S_OFFLINE_LOG"])
    if log.exists() and log.read_text().strip():
        sys.stderr.write("\n=== OFFLINE GUARD: network attempts during the test run ===\n")
        sys.stderr.write(log.read_text())
        session.exitstatus = 1


def pytest_collection_modifyitems(config, items):
    if os.environ.get("S2S_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test; run with S2S_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def manifest() -> list:
    return [json.loads(line) for line in (FIXTURES / "manifest.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """Bundled real models + tiny generated ones, built once (scripts/test.sh prebuilds them
    into .models/ and passes S2S_TEST_MODELS)."""
    pre = os.environ.get("S2S_TEST_MODELS")
    root = Path(pre) if pre else tmp_path_factory.mktemp("models")
    manifest_file = root / "s2s-models.json"
    if not manifest_file.exists():
        for cmd in ("bundled", "tiny"):
            subprocess.run([sys.executable, "-m", "daemon.models.cli", cmd, "--out", str(root)],
                           check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return root


@pytest.fixture(scope="module")
def tiny_funasr_pool(models_dir):
    """The tiny random FunASR models with the real fsmn-vad, loaded once per test module."""
    from daemon.asr.funasr_engine import FunASRPool
    from helpers.funasr_tiny import make_config

    p = FunASRPool(make_config(models_dir))
    p.load()
    yield p
    p.shutdown()
