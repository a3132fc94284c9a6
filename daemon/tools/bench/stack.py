"""The stack a benchmark runs against: a daemon (and bridge) started here, or attached to."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple


from daemon.tools.bench.common import ENGINES, ROOT, SCRUB_ENV

logger = logging.getLogger(__name__)


# --- the stack: a daemon (and bridge) started here, or attached to -----------------------------


def default_models() -> Path:
    env = os.environ.get("S2S_MODELS")
    if env:
        return Path(env)
    local = ROOT / ".models"
    return local if local.is_dir() else Path("/var/lib/s2s/models")


def engine_config(engines: str, models: Path, run_dir: Path, device: str = "cpu", sessions: int = 32,
                  config_file: Optional[Path] = None, agent: str = "echo", agent_url: str = "",
                  tts_engine: str = "", tts_threads: int = 0, whisper_beam: int = 0,
                  asr_ncpu: int = 0) -> Dict[str, Any]:
    """The YAML dict a self-started stack runs on (bridge on a free port, echo agent by default)."""
    import yaml

    if engines == "config":
        if config_file is None:
            raise SystemExit("s2s-bench: --engines config needs --config FILE")
        data = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
    else:
        data = {"models_root": str(models)}
        if engines == "bundled":
            data["asr"] = {"engine": "whisper", "whisper": {"model": "whisper-base", "vad": "fsmn-vad"}}
            data["tts"] = {"engine": "piper", "piper": {"voice": "piper/en_US-joe-medium.onnx"}}
        elif engines in ("tiny", "full"):
            d = engines
            data["asr"] = {"engine": "funasr", "funasr": {
                "paraformer": f"{d}/paraformer", "vad": "fsmn-vad", "punc": f"{d}/ct-punc",
                "streaming": f"{d}/paraformer-streaming"}}
            data["tts"] = {"engine": "melo", "melo": {"model": f"{d}/melo-zh", "hf_home": f"{d}/hf",
                                                      "nltk_data": f"{d}/nltk_data"}}
        else:
            raise SystemExit(f"s2s-bench: unknown --engines {engines!r} (one of {', '.join(ENGINES)})")
        if whisper_beam and engines == "bundled":
            data["asr"]["whisper"]["beam_size"] = whisper_beam
        if tts_engine and engines == "bundled":
            data["tts"] = {"engine": tts_engine, "piper": {"voice": "piper/en_US-joe-medium.onnx"},
                           "kokoro": {"model": "kokoro", "threads": tts_threads}}
        for k in ("asr", "tts"):
            data[k].update(device=device, fallback_engine="none")
        if asr_ncpu:
            data["asr"]["ncpu"] = asr_ncpu
        data["limits"] = {"max_sessions": max(32, sessions + 4), "idle_timeout": 120.0}
        data["logging"] = {"level": "INFO"}
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    data.setdefault("daemon", {})
    data["daemon"] = dict(data["daemon"], runtime_dir=str(run_dir), drain_timeout=2.0)
    bridge = dict(data.get("bridge") or {})
    bridge.update(host="127.0.0.1", port=0, max_connections=max(int(bridge.get("max_connections", 16)), sessions + 4))
    data["bridge"] = bridge
    ag = dict(data.get("agent") or {})
    ag["kind"] = agent
    if agent_url:
        ag["url"] = agent_url
    data["agent"] = ag
    if engines != "config":
        lim = dict(data.get("limits") or {})
        lim["max_sessions"] = max(int(lim.get("max_sessions", 32)), sessions + 4)
        data["limits"] = lim
    return data


class Proc:
    def __init__(self, name: str, args: List[str], log: Path, env: Dict[str, str]):
        self.name = name
        self.log = log
        self._fh = open(log, "wb")
        self.p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._fh, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.p.pid

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self._fh.close()
        return self.p.returncode


@dataclass
class Stack:
    """Endpoints (and pids when known) of the daemon and the bridge under test."""

    asr: str
    tts: str
    bridge: str = ""                 # ws://host:port/ws
    daemon_pid: Optional[int] = None
    bridge_pid: Optional[int] = None
    cfg: Any = None                  # daemon.config.Config when known (in-process comparisons)
    engines: str = "attached"
    info: Dict[str, Any] = field(default_factory=dict)
    procs: List[Proc] = field(default_factory=list)
    tmp: Optional[Path] = None
    startup_s: Dict[str, float] = field(default_factory=dict)

    def describe(self, timeout: float = 10.0) -> Dict[str, Any]:
        from daemon.wire.client import ASRClient

        with ASRClient(self.asr, timeout=timeout) as c:
            return c.describe()

    @property
    def bridge_proc(self) -> Optional[Proc]:
        return next((p for p in self.procs if p.name == "bridge"), None)

    def summary(self) -> Dict[str, Any]:
        a, t = self.info.get("asr", {}), self.info.get("tts", {})
        return {"engines": self.engines, "asr": {k: a.get(k) for k in ("engine", "device", "dtype", "model", "models")
                                                 if k in a},
                "tts": {k: t.get(k) for k in ("engine", "device", "model_dir", "voice", "sample_rate") if k in t},
                "fallbacks": self.info.get("fallbacks", []), "endpoints": {"asr": self.asr, "tts": self.tts,
                                                                          "bridge": self.bridge},
                "startup_s": self.startup_s}

    def label(self) -> str:
        a, t = self.info.get("asr", {}), self.info.get("tts", {})
        return (f"asr={a.get('engine', '?')}@{a.get('device', '?')} "
                f"tts={t.get('engine', '?')}@{t.get('device', '?')}; engines={self.engines}")


def _env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_daemon(proc: Proc, endpoints: Sequence[str], timeout: float, error: Any = SystemExit) -> None:
    """Wait until each endpoint answers a ping; `error` (with the daemon's log) if it exits or the
    time runs out. The one readiness wait for a daemon started as a process (s2s-bench, tests)."""
    from daemon.wire.client import Client, DaemonError

    deadline = time.monotonic() + timeout
    for ep in endpoints:
        while True:
            if not proc.alive():
                raise error(f"daemon exited with {proc.p.returncode}:\n{proc.text()[-3000:]}")
            if time.monotonic() > deadline:
                proc.stop()
                raise error(f"daemon not ready after {timeout:g} s:\n{proc.text()[-3000:]}")
            try:
                with Client(ep, timeout=1.0) as c:
                    c.ping(1.0)
                break
            except DaemonError:
                time.sleep(0.3)


def _wait_bridge(proc: Proc, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(r"serving http://([\d.]+):(\d+)/", proc.text())
        if m:
            return int(m.group(2))
        if not proc.alive() or time.monotonic() > deadline:
            raise SystemExit(f"s2s-bench: bridge did not start:\n{proc.text()[-3000:]}")
        time.sleep(0.05)


@contextlib.contextmanager
def open_stack(args: argparse.Namespace, need_bridge: bool, sessions: int = 32) -> Iterator[Stack]:
    """Attach to --asr/--tts/--bridge, or start `python -m daemon` (+ `python -m bridge`)."""
    from daemon.config import load_config

    if args.asr or args.tts or args.bridge:
        if not (args.asr and args.tts):
            raise SystemExit("s2s-bench: attaching needs both --asr and --tts endpoints")
        if need_bridge and not args.bridge:
            raise SystemExit(f"s2s-bench: {args.mode} needs --bridge ws://HOST:PORT/ws when attaching")
        cfg = load_config(str(args.config), env={}) if args.config else None
        st = Stack(args.asr, args.tts, args.bridge or "", cfg=cfg, bridge_pid=args.bridge_pid)
        st.info = st.describe()
        st.daemon_pid = int(st.info.get("daemon", {}).get("pid") or 0) or None
        yield st
        return
    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="s2s-bench-"))
    procs: List[Proc] = []
    fixed = None
    agent, agent_url = args.agent, args.agent_url
    try:
        if agent == "fixed":
            from daemon.tools.bench_agent import FixedLatencyAgent

            fixed = FixedLatencyAgent(ttft=args.agent_ttft).__enter__()
            agent, agent_url = "openai", fixed.url
        engines = args.engines or ("config" if args.config else "bundled")
        data = engine_config(engines, Path(args.models), tmp / "run", args.device, sessions,
                             Path(args.config) if args.config else None, agent, agent_url,
                             args.tts_engine, args.tts_threads, args.whisper_beam, args.asr_ncpu)
        cfg_path = tmp / "s2s.yaml"
        cfg_path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        cfg = load_config(str(cfg_path), env={})
        eps = (cfg.daemon.endpoint("asr"), cfg.daemon.endpoint("tts"))
        t0 = time.monotonic()
        d = Proc("daemon", [sys.executable, "-m", "daemon", "--config", str(cfg_path)], tmp / "daemon.log", _env())
        procs.append(d)
        wait_daemon(d, eps, args.start_timeout)
        st = Stack(eps[0], eps[1], cfg=cfg, engines=engines, daemon_pid=d.pid, procs=procs, tmp=tmp)
        st.startup_s["daemon"] = round(time.monotonic() - t0, 2)
        if need_bridge:
            t0 = time.monotonic()
            b = Proc("bridge", [sys.executable, "-m", "bridge", "--config", str(cfg_path), "--agent", agent],
                     tmp / "bridge.log", _env())
            procs.append(b)
            port = _wait_bridge(b, 60.0)
            st.bridge, st.bridge_pid = f"ws://127.0.0.1:{port}/ws", b.pid
            st.startup_s["bridge"] = round(time.monotonic() - t0, 2)
        st.info = st.describe()
        yield st
    finally:
        for p in reversed(procs):
            rc = p.stop()
            if rc not in (0, None, -signal.SIGTERM):
                logger.warning("%s exited with %s; log: %s", p.name, rc, p.log)
        if fixed is not None:
            fixed.__exit__(None, None, None)
        if args.keep_logs:
            logger.warning("logs kept in %s", tmp)  # asked for with --keep-logs: shown at any log level
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def stack_language(st: Stack) -> str:
    """The language replies can be spoken in: Piper's bundled voice is English-only."""
    return "en" if st.info.get("tts", {}).get("engine") == "piper" else "zh"


def in_process_engines(st: Stack, asr: bool = True, tts: bool = True) -> Tuple[Any, Any]:
    """The daemon's engines, built the same way (daemon.serving.factory) in this process."""
    if st.cfg is None:
        return None, None
    from daemon.serving.factory import build_asr, build_tts

    a = build_asr(st.cfg)[0] if asr else None
    t = build_tts(st.cfg)[0] if tts else None
    return a, t


