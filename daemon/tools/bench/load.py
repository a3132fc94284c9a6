"""Modes load (concurrent real-time sessions) and soak (sequential sessions, growth)."""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional


from daemon.tools.bench.common import RATE, WS_FRAME_S, fmt, load_manifest, noise_pcm, proc_sample, proc_usage, stats_ms, table
from daemon.tools.bench.stack import Stack, stack_language
from daemon.tools.bench.e2e import WS, stream_realtime

logger = logging.getLogger(__name__)


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
    from daemon.wire.client import AsyncASRClient, DaemonError

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
        info: Dict[str, Any] = {"frames": 0, "finals": 0, "partials": 0, "ok": False}
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
        row: Dict[str, Any] = {"session": i}
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


