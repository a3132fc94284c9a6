"""Start the real daemon (`python -m daemon`) as a subprocess with a fake systemd NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
FAKE_ENGINES = str(ROOT / "tests" / "fake_engines.py")


class NotifyListener:
    """An AF_UNIX datagram socket standing in for systemd; records (time, line) pairs."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.lines: List[tuple] = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            now = time.monotonic()
            for line in data.decode().splitlines():
                self.lines.append((now, line))

    def wait_for(self, prefix: str, timeout: float, after: float = 0.0) -> Optional[float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                if t >= after and line.startswith(prefix):
                    return t
            time.sleep(0.02)
        return None

    def times(self, prefix: str) -> List[float]:
        return [t for t, line in list(self.lines) if line.startswith(prefix)]

    def close(self) -> None:
        self._stop = True
        self.sock.close()


class DaemonProcess:
    def __init__(self, tmp: Path, config: Dict, fake: bool = True, watchdog_usec: int = 1_000_000,
                 env: Optional[Dict[str, str]] = None, strict: bool = False):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        run = self.tmp / "run"
        cfg = {"daemon": {"runtime_dir": str(run), "drain_timeout": 2.0}}
        for k, v in config.items():
            if isinstance(v, dict):
                cfg.setdefault(k, {}).update(v)
            else:
                cfg[k] = v
        self.config_path = self.tmp / "s2s.yaml"
        self.config = cfg
        self.write_config(cfg)
        self.asr = f"ipc://{run}/asr.sock"
        self.tts = f"ipc://{run}/tts.sock"
        self.notify = NotifyListener(self.tmp / "notify.sock")
        e = dict(os.environ)
        for k in ("S2S_TEST_ENGINES", "ASR_ENGINE", "TTS_ENGINE", "ASR_DEVICE", "TTS_DEVICE", "S2S_MODELS"):
            e.pop(k, None)
        e.update(NOTIFY_SOCKET=self.notify.path, WATCHDOG_USEC=str(watchdog_usec), PYTHONUNBUFFERED="1")
        if fake:
            e["S2S_TEST_ENGINES"] = FAKE_ENGINES
        e.update(env or {})
        self.log_path = self.tmp / "daemon.log"
        self._log = open(self.log_path, "wb")
        args = [sys.executable, "-m", "daemon", "--config", str(self.config_path)] + (["--strict"] if strict else [])
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, cwd=ROOT, env=e, stdout=self._log, stderr=subprocess.STDOUT)

    def write_config(self, cfg: Dict) -> None:
        self.config_path.write_text(yaml.safe_dump(cfg))

    def wait_ready(self, timeout: float) -> float:
        t = self.notify.wait_for("READY=1", timeout)
        if t is None:
            self.stop()
            raise AssertionError(f"daemon not READY within {timeout} s; log:\n{self.log()}")
        return t

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()
        self._log.close()
        return self.proc.returncode
