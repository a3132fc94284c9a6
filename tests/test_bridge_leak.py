"""Regression test for the bridge's per-connection memory creep (BENCHMARKS.md, soak).

Cause: a browser that hangs up while its turn is connecting the daemon TTS client (the first
`ping` of a fresh `AsyncTTSClient`) cancelled that ping; the client was neither closed nor
stored on the session, so `_release()` could not close it either. Its reader and monitor
tasks are referenced by the event loop forever, and with them the client, two ZeroMQ
sockets, their file descriptors and libzmq's buffers: ~100 KB of C heap and 4 fds per
orphan. (A Final read by the ASR pump while `_release()` cancelled the turns could likewise
start a turn that connected a client after the release.)

The test hangs up 400 real websocket sessions through the real bridge subprocess (echo agent,
daemon on the FAKE engines: this is about the bridge's bookkeeping, not about speech) at
delays sweeping the window in which the turn connects its TTS client, and asserts that the
bridge's file descriptors return to their baseline (structural: every orphaned client holds
four) and that its RSS grows by less than a bound well under one orphan per ten sessions.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import time
from pathlib import Path

from websockets.asyncio.client import connect

from bridge_procs import start_bridge, start_daemon, write_config
from daemon.wire.client import ASRClient
from procstats import settled
from helpers.ws import http_get

SESSIONS = 400
WARMUP = 30
# Seconds between sending the text and hanging up: sweeps the turn's client-connect window.
DELAYS = tuple(i * 0.00025 for i in range(33))  # 0 .. 8 ms
# After the fix well under 1 KB per session (allocator noise); one orphan costs ~100 KB.
RSS_BOUND_KB = 4 * SESSIONS


def _tone(seconds: float) -> bytes:
    n = int(16000 * seconds)
    return b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / 16000))) for i in range(n))


async def _hangup_during_turn(url: str, delay: float) -> None:
    """Typed text starts a turn at once; hang up while it connects its TTS client."""
    ws = await connect(url, proxy=None, compression=None, open_timeout=10)
    try:
        await ws.recv()  # hello
        await ws.send(json.dumps({"type": "text", "text": "你好。今天天气很好。"}, ensure_ascii=False))
        if delay:
            await asyncio.sleep(delay)
    finally:
        await ws.close()


async def _spoken_session(url: str, speech: bytes) -> None:
    """start, speech, stop; hang up at the first final (the turn is just starting)."""
    ws = await connect(url, proxy=None, compression=None, open_timeout=10)
    try:
        await ws.recv()
        await ws.send(json.dumps({"type": "start", "language": "zh"}))
        while True:
            m = await asyncio.wait_for(ws.recv(), 20)
            if isinstance(m, str) and json.loads(m)["type"] == "ready":
                break
        for off in range(0, len(speech), 16000):
            await ws.send(speech[off:off + 16000])
        await ws.send(json.dumps({"type": "stop"}))
        while True:
            m = await asyncio.wait_for(ws.recv(), 20)
            if isinstance(m, str) and json.loads(m)["type"] == "final":
                break
    finally:
        await ws.close()


async def _run(url: str, n: int, speech: bytes, offset: int = 0) -> None:
    for i in range(n):
        if i % 10 == 9:
            await _spoken_session(url, speech)
        else:
            await _hangup_during_turn(url, DELAYS[(i + offset) % len(DELAYS)])


def _quiet(asr: str, port: int, timeout: float = 15.0) -> None:
    """Bridge and daemon back to zero connections, sessions and TTS requests."""
    deadline = time.monotonic() + timeout
    with ASRClient(asr) as a:
        while True:
            q = a.describe()["queues"]
            h = json.loads(http_get(port, "/healthz")[2])
            if q["asr_sessions"] == 0 and q["tts_requests"] == 0 and h["connections"] == 0:
                return
            assert time.monotonic() < deadline, (q, h["connections"])
            time.sleep(0.2)


def test_hangups_during_turns_leave_no_daemon_clients(tmp_path: Path, models_dir: Path):
    cfg = write_config(tmp_path / "s2s.yaml", models_dir, tmp_path / "run", asr="whisper", tts="piper",
                       agent={"kind": "echo"})
    daemon = start_daemon(cfg, tmp_path / "daemon.log", fake_engines=True, timeout=120)
    bridge = start_bridge(cfg, tmp_path / "bridge.log")
    asr = f"ipc://{tmp_path}/run/asr.sock"
    speech = _tone(1.0) + b"\0\0" * 12000
    try:
        asyncio.run(_run(bridge.ws, WARMUP, speech))
        _quiet(asr, bridge.port)
        time.sleep(0.5)
        before = settled(bridge.p.pid)
        t0 = time.monotonic()
        asyncio.run(_run(bridge.ws, SESSIONS, speech, offset=3))
        took = time.monotonic() - t0
        _quiet(asr, bridge.port)
        time.sleep(0.5)
        after = settled(bridge.p.pid)
    finally:
        rc_b = bridge.stop()
        rc_d = daemon.stop()
    grew = after["rss_kb"] - before["rss_kb"]
    print(f"{SESSIONS} sessions in {took:.1f} s: bridge {before} -> {after} ({grew:+d} KB RSS)")
    # Every orphaned daemon client keeps its sockets' descriptors: none may be left.
    assert after["fds"] <= before["fds"], (before, after)
    assert after["threads"] <= before["threads"], (before, after)
    assert grew <= RSS_BOUND_KB, (before, after)
    assert rc_b == 0 and rc_d == 0, (bridge.text()[-2000:], daemon.text()[-2000:])
    assert "Traceback" not in bridge.text(), bridge.text()[-3000:]
