"""Soak: repeated browser sessions (open websocket, start, stream speech, final, agent reply
with synthesised audio, stop, close) and direct daemon clients (open, stream, finalize; a
synthesis), then the daemon and the bridge are back to zero sessions and their threads, file
descriptors and RSS (/proc/PID/status VmRSS and Threads, /proc/PID/fd) are within 5 % of what
they were after a warm-up.

CI size: 100 cycles on the FAKE engines (the session bookkeeping of daemon and bridge is what
leaks, if anything does). S2S_SLOW=1 adds 150 cycles (S2S_SOAK_CYCLES) on the real Whisper + Piper engines.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any, Dict

import pytest

from bridge_procs import start_bridge, start_daemon, write_config
from daemon.wire import protocol as P
from daemon.wire.client import ASRClient, TTSClient
from procstats import growth, settled
from helpers.ws import WSClient, http_get, read_pcm, silence

WARMUP = 10


async def _page_cycle(url: str, asr: str, speech: bytes, i: int) -> None:
    c = await WSClient.open(url)
    await c.send_json({"type": "start", "language": "zh"})
    await c.wait_event("ready", 1, 20)
    await c.stream(silence(0.2) + speech + silence(1.0))
    try:
        await c.wait(lambda: any(f["text"] for f in c.of("final")), 30, "final")
    except AssertionError as e:
        with ASRClient(asr) as a:  # where did it stop: the daemon's view of the session
            raise AssertionError(f"cycle {i}: {e}; daemon sessions: {a.describe()['sessions']}") from None
    await c.wait_event("agent_done", 1, 30)
    await c.wait_event("tts_end", 1, 30)
    await c.send_json({"type": "stop"})
    await c.close()


def _daemon_cycle(asr: str, tts: str, speech: bytes) -> None:
    with ASRClient(asr, timeout=30) as a:
        st = a.open(language="zh")
        for off in range(0, len(speech), 6400):
            st.send(speech[off:off + 6400])
        evs = st.finalize(timeout=60)
        assert isinstance(evs[-1], P.Closed)
    with TTSClient(tts, timeout=30) as t:
        pcm, _ = t.speak("Okay. 好的。")
        assert pcm


def _quiet(asr: str, bridge_port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    with ASRClient(asr) as a:
        while True:
            info = a.describe()
            q = info["queues"]
            h = json.loads(http_get(bridge_port, "/healthz")[2])
            # daemon sessions, the engine's own session table, TTS requests, browser connections
            if q["asr_sessions"] == 0 and info["asr"]["sessions"] == 0 and q["tts_requests"] == 0 \
                    and h["connections"] == 0:
                return
            assert time.monotonic() < deadline, (q, info["asr"]["sessions"], h["connections"])
            time.sleep(0.2)


def soak(tmp: Path, models_dir: Path, fixtures_dir: Path, cycles: int, fake: bool) -> Dict[str, Any]:
    cfg = write_config(tmp / "s2s.yaml", models_dir, tmp / "run", asr="whisper", tts="piper",
                       agent={"kind": "echo"})
    daemon = start_daemon(cfg, tmp / "daemon.log", fake_engines=fake, timeout=240)
    bridge = start_bridge(cfg, tmp / "bridge.log")
    asr, tts = f"ipc://{tmp}/run/asr.sock", f"ipc://{tmp}/run/tts.sock"
    speech = read_pcm(fixtures_dir / "zh" / "01.wav")
    procs = {"daemon": daemon.p.pid, "bridge": bridge.p.pid}
    try:
        def cycle(i: int) -> None:
            asyncio.run(asyncio.wait_for(_page_cycle(bridge.ws, asr, speech, i), 120))
            _daemon_cycle(asr, tts, speech)

        for i in range(WARMUP):
            cycle(i)
        _quiet(asr, bridge.port)
        before = {k: settled(pid) for k, pid in procs.items()}
        t0 = time.monotonic()
        for i in range(cycles):
            cycle(WARMUP + i)
        took = time.monotonic() - t0
        _quiet(asr, bridge.port)
        after = {k: settled(pid) for k, pid in procs.items()}
    finally:
        rc_b = bridge.stop()
        rc_d = daemon.stop()
    assert rc_b == 0 and rc_d == 0, (bridge.text()[-2000:], daemon.text()[-2000:])
    assert "Traceback" not in bridge.text() and "Traceback" not in daemon.text()
    return {"before": before, "after": after, "took": took}


def _check(res: Dict[str, Any], cycles: int) -> None:
    for name in ("daemon", "bridge"):
        b, a = res["before"][name], res["after"][name]
        g = growth(b, a)
        print(f"soak {cycles} cycles in {res['took']:.1f} s: {name} {b} -> {a} ({g['rss_kb']:+.1%} RSS)")
        assert a["threads"] <= b["threads"], (name, b, a)
        assert a["fds"] <= b["fds"], (name, b, a)
        assert g["rss_kb"] <= 0.05, (name, b, a)


def test_soak_sessions_threads_fds_rss(tmp_path, models_dir, fixtures_dir):
    res = soak(tmp_path, models_dir, fixtures_dir, cycles=100, fake=True)
    _check(res, 100)


@pytest.mark.slow
def test_soak_long_real_engines(tmp_path, models_dir, fixtures_dir):
    cycles = int(os.environ.get("S2S_SOAK_CYCLES", "150"))
    res = soak(tmp_path, models_dir, fixtures_dir, cycles=cycles, fake=False)
    _check(res, cycles)
