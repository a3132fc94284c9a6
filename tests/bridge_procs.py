"""Process helpers for the bridge tests: write a config, start the speech daemon and the
bridge as real subprocesses, wait for them, stop them. Not a test module.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
# Engine/device overrides from the developer's shell must not change what a test runs.
_SCRUB = ("ASR_ENGINE", "TTS_ENGINE", "ASR_DEVICE", "TTS_DEVICE", "S2S_CONFIG", "S2S_MODELS", "S2S_TEST_ENGINES",
          "NOTIFY_SOCKET", "RUNTIME_DIRECTORY")


def write_config(path: Path, models_dir: Path, run_dir: Path, *, asr: str = "whisper", tts: str = "piper",
                 bridge: Optional[Dict[str, Any]] = None, agent: Optional[Dict[str, Any]] = None,
                 limits: Optional[Dict[str, Any]] = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    data: Dict[str, Any] = {
        "models_root": str(models_dir),
        "daemon": {"runtime_dir": str(run_dir), "drain_timeout": 1.0},
        "asr": {"engine": asr, "device": "cpu", "language": "zh", "fallback_engine": "none", "ncpu": 1},
        "tts": {"engine": tts, "device": "cpu", "fallback_engine": "none"},
        "bridge": {"host": "127.0.0.1", "port": 0, **(bridge or {})},
        "agent": {"kind": "echo", "timeout": 5.0, **(agent or {})},
        "limits": {"idle_timeout": 120.0, **(limits or {})},
        "logging": {"level": "INFO"},
    }
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(extra or {})
    env["PYTHONUNBUFFERED"] = "1"
    return env


# The same subprocess wrapper s2s-bench uses (log to a file, SIGTERM then kill on stop).
from daemon.tools.bench.stack import Proc, wait_daemon  # noqa: E402


def wait_daemon_ready(proc: Proc, cfg_path: Path, timeout: float) -> Proc:
    """Wait until both of the daemon's sockets answer a ping; RuntimeError with its log if not."""
    from daemon.config import load_config

    cfg = load_config(str(cfg_path), env={})
    wait_daemon(proc, [cfg.daemon.endpoint("asr"), cfg.daemon.endpoint("tts")], timeout, RuntimeError)
    return proc


def start_daemon(cfg_path: Path, log: Path, fake_engines: bool = False, timeout: float = 240.0) -> Proc:
    """Start `python -m daemon --config cfg` and wait until both sockets answer a ping."""
    env = _env({"S2S_TEST_ENGINES": "tests/fake_engines.py"} if fake_engines else None)
    proc = Proc("daemon", [sys.executable, "-m", "daemon", "--config", str(cfg_path)], log, env)
    return wait_daemon_ready(proc, cfg_path, timeout)


def start_bridge(cfg_path: Path, log: Path, agent: Optional[str] = None, timeout: float = 30.0) -> "BridgeProc":
    args = [sys.executable, "-m", "bridge", "--config", str(cfg_path)]
    if agent:
        args += ["--agent", agent]
    proc = BridgeProc("bridge", args, log, _env())
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(r"serving https?://([\d.]+):(\d+)/", proc.text())
        if m:
            proc.port = int(m.group(2))
            return proc
        if not proc.alive() or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"bridge did not start:\n{proc.text()[-3000:]}")
        time.sleep(0.05)


class BridgeProc(Proc):
    port = 0

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"
