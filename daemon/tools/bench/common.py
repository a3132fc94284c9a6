"""Shared by every mode: constants, statistics and output, /proc sampling, audio and manifests."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np


logger = logging.getLogger(__name__)


ROOT = Path(__file__).resolve().parents[3]
DEFAULT_MANIFEST = ROOT / "tests" / "fixtures" / "manifest.jsonl"
RATE = 16000
CHUNK_BYTES = 3200          # 100 ms of 16 kHz PCM16: the unit the IPC figure is per
WS_FRAME_S = 0.04           # the page's worklet sends 40 ms frames
MODES = ("ipc", "asr", "tts", "e2e", "load", "soak", "capacity", "acceptance")
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
    return _pct(values, q)


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def stats_ms(seconds: Sequence[float]) -> Dict[str, Any]:
    """n, p50, p95, p99, mean, min, max in milliseconds of a list of durations in seconds."""
    ms = [s * 1000.0 for s in seconds]
    if not ms:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "mean": None, "min": None, "max": None}
    return {"n": len(ms), "p50": round(_pct(ms, 50), 3), "p95": round(_pct(ms, 95), 3), "p99": round(_pct(ms, 99), 3),
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


def report_logger(bench: str) -> logging.Logger:
    """A bench's results go to stdout through logging, whatever level the run's log is at."""
    out = logging.getLogger(f"s2s-bench.{bench}.report")
    if not out.handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("%(message)s"))
        out.addHandler(h)
        out.setLevel(logging.INFO)
        out.propagate = False
    return out
