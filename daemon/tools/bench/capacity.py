"""Mode capacity: how many real-time ASR streams one daemon holds (ASR socket only: no bridge, no TTS).

One sweep point = N streams, each its own AsyncASRClient (its own DEALER), opened at once in one
asyncio loop, sending a 11-19 s Mandarin recording in 60 ms frames on an absolute real-time
schedule, then `finalize`. Per point: admitted / refused (`busy`), final latency after the end of
the stream, partial cadence, daemon CPU seconds per audio second, errors by code.

`--warmup 1,8` first serves those stream counts, in that order, the same way (reported under
`warmup`, not part of the sweep): admission then runs on what it learned from light load, as a
daemon in service would, not on a fresh daemon's prior (issue 23 item 12).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.wire import protocol as P
from daemon.wire.client_async import AsyncASRClient, AsyncASRStream
from daemon.wire.client_base import DaemonError, new_id
from daemon.errors import ErrorCode
from daemon.tools.bench.common import (
    RATE,
    Utterance,
    fmt,
    load_manifest,
    noise_pcm,
    pct,
    proc_sample,
    table,
)
from daemon.tools.bench.stack import Stack

logger = logging.getLogger(__name__)

DEFAULT_STREAMS = "1,4,8,12,16,24,32"
FRAME_S = 0.06                        # each stream sends 60 ms frames...
FRAME_BYTES = int(FRAME_S * RATE) * 2  # ... of 1920 bytes PCM16 16 kHz
CAPACITY_P95_S = 1.0                  # a point holds: every stream admitted, final latency p95 <= this
RECORDINGS = 5                        # stream i sends recording i mod RECORDINGS
RECORDING_MIN_S, RECORDING_MAX_S = 11.0, 19.0
GAPS_S = (0.8, 0.9, 1.0)              # quiet between the short utterances of a made-up recording
TARGETS_S = (12.0, 14.0, 16.0, 18.0)  # the lengths the made-up recordings grow to (at least)
SPARE_SESSIONS = 4                    # session slots beyond the largest N (engine_config adds 4 more)
OPEN_TIMEOUT_S = 30.0
START_DELAY_S = 0.2                   # from the last `opened` to the first frame
IDLE_WAIT_S = 30.0                    # between points: at most this long for the daemon to list 0 sessions
POLL_S = 1.0                          # describe poll period during a point (lag)


# --- recordings (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Recording:
    id: str
    pcm: bytes
    parts: tuple[str, ...]

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / RATE


def build_recordings(utts: Sequence[Utterance], count: int = RECORDINGS) -> list[Recording]:
    """`count` Mandarin recordings of RECORDING_MIN_S..RECORDING_MAX_S: the manifest's long zh file
    (when it is in range), then short zh utterances joined with 0.8-1.0 s of quiet noise, each
    made-up recording starting two utterances further on. Deterministic."""
    zh = [u for u in utts if u.lang == "zh"]
    out = [Recording(u.id, u.pcm, (u.id,)) for u in zh
           if u.kind == "long" and RECORDING_MIN_S <= u.seconds <= RECORDING_MAX_S][:1]
    shorts = [u for u in zh if u.kind == "utt"]
    if not shorts:
        raise SystemExit("s2s-bench capacity: the manifest has no short zh utterances to build recordings from")
    for j in range(count - len(out)):
        out.append(_joined(shorts, j, TARGETS_S[j % len(TARGETS_S)]))
    return out


def _joined(shorts: Sequence[Utterance], j: int, target: float) -> Recording:
    pcm, k = b"", 0
    parts: list[str] = []
    while pcm == b"" or len(pcm) / 2 / RATE < target:
        u = shorts[(2 * j + len(parts)) % len(shorts)]
        gap = noise_pcm(GAPS_S[k % len(GAPS_S)], seed=100 * j + k) if pcm else b""
        if (len(pcm) + len(gap) + len(u.pcm)) / 2 / RATE > RECORDING_MAX_S:
            break
        pcm, k = pcm + gap + u.pcm, k + (1 if gap else 0)
        parts.append(u.id)
    if len(pcm) / 2 / RATE < RECORDING_MIN_S:
        raise SystemExit(f"s2s-bench capacity: cannot join the short zh utterances into {RECORDING_MIN_S:g}-"
                         f"{RECORDING_MAX_S:g} s")
    return Recording("+".join(parts), pcm, tuple(parts))


def cap_recordings(recs: Sequence[Recording], seconds: float) -> list[Recording]:
    """Each recording cut to at most `seconds` (short test runs)."""
    n = int(seconds * RATE) * 2
    return [r if len(r.pcm) <= n else Recording(r.id, r.pcm[:n], r.parts) for r in recs]


def parse_streams(text: str) -> list[int]:
    """`--streams 1,4,8`: sorted distinct positive counts (argparse type)."""
    try:
        out = sorted({int(x) for x in str(text).split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of stream counts: {text!r}") from None
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError(f"stream counts must be >= 1: {text!r}")
    return out


def parse_warmup(text: str) -> list[int]:
    """`--warmup 1,8`: positive stream counts in the order given (argparse type)."""
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of stream counts: {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"warm-up stream counts must be >= 1: {text!r}")
    return out


def stack_sessions(streams: Sequence[int]) -> int:
    """Session slots for a self-started daemon: the largest N plus spares. Only the slots:
    admission by load (`limits.max_asr_lag`) stays the daemon's own."""
    return max(streams) + SPARE_SESSIONS


# --- one stream's events and one point's summary (pure) ------------------------------------------


@dataclass
class StreamRecord:
    index: int
    recording: str
    admitted: bool = False
    refused_busy: bool = False
    audio_s: float = 0.0          # audio sent
    late_frames: int = 0          # frames sent more than one frame period after their due time
    final_latency_s: float | None = None  # end of stream -> the last final answering finalize
    partial_gaps_s: list[float] = field(default_factory=list)
    partials: int = 0
    finals: int = 0
    drained: bool = False         # the finalize's `closed` arrived in time
    errors: dict[str, int] = field(default_factory=dict)


def read_events(rec: StreamRecord, events: Sequence[tuple[float, P.Message]], t_end: float | None,
                finalize_id: str) -> None:
    """Fill `rec` from (arrival time, daemon.wire.protocol message) pairs; t_end = when the stream ended."""
    last_partial: dict[int, float] = {}
    answer: float | None = None
    for t, m in events:
        if isinstance(m, P.Partial):
            rec.partials += 1
            if m.utterance in last_partial:
                rec.partial_gaps_s.append(t - last_partial[m.utterance])
            last_partial[m.utterance] = t
        elif isinstance(m, P.Final):
            rec.finals += 1
            last_partial.pop(m.utterance, None)
            if finalize_id and m.request_id == finalize_id:
                answer = t
        elif isinstance(m, P.Error):
            rec.errors[m.code] = rec.errors.get(m.code, 0) + 1
        elif isinstance(m, P.Closed) and m.reason == "finalized":
            rec.drained = True
    if answer is not None and t_end is not None:
        rec.final_latency_s = answer - t_end


def _r(v: float | None, digits: int = 3) -> float | None:
    return None if v is None else round(v, digits)


def summarize(n: int, records: Sequence[StreamRecord], daemon_cpu_s: float | None,
              client_cpu_s: float | None, wall_s: float, max_lag_s: float | None = None) -> dict[str, Any]:
    """One sweep point's figures from its streams and CPU seconds (daemon, bench client) over
    `wall_s` of streaming (open -> last stream closed)."""
    adm = [r for r in records if r.admitted]
    lat = [r.final_latency_s for r in adm if r.final_latency_s is not None]
    gaps = [g for r in adm for g in r.partial_gaps_s]
    audio = sum(r.audio_s for r in adm)
    errors: dict[str, int] = {}
    for r in records:
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
    wall = max(wall_s, 1e-6)
    p95 = pct(lat, 95)
    undrained = sum(1 for r in adm if not r.drained or r.final_latency_s is None)
    return {"streams": n, "admitted": len(adm), "refused_busy": sum(1 for r in records if r.refused_busy),
            "audio_s": round(audio, 2), "wall_s": round(wall_s, 2),
            "final_latency_s": {"p50": _r(pct(lat, 50)), "p95": _r(p95), "max": _r(max(lat) if lat else None)},
            "partial_cadence_s": {"n": len(gaps), "p50": _r(pct(gaps, 50)), "p95": _r(pct(gaps, 95))},
            "cpu_s_per_audio_s": _r(daemon_cpu_s / audio if daemon_cpu_s is not None and audio else None, 4),
            "daemon_cpu_percent": _r(None if daemon_cpu_s is None else 100.0 * daemon_cpu_s / wall, 1),
            "client_cpu_percent": _r(None if client_cpu_s is None else 100.0 * client_cpu_s / wall, 1),
            "daemon_max_lag_s": _r(max_lag_s, 2), "undrained": undrained,
            "late_frames": sum(r.late_frames for r in adm), "finals": sum(r.finals for r in adm),
            "partials": sum(r.partials for r in adm), "errors": errors,
            "holds": bool(adm) and len(adm) == n and undrained == 0 and p95 is not None and p95 <= CAPACITY_P95_S}


def largest_holding(points: Sequence[dict[str, Any]]) -> int | None:
    """The largest N whose point holds (every stream admitted, final latency p95 <= CAPACITY_P95_S)."""
    ok = [p["streams"] for p in points if p.get("holds")]
    return max(ok) if ok else None


# --- the run -----------------------------------------------------------------------------------------


def _cpu(pid: int | None) -> float | None:
    s = proc_sample(pid) if pid else None
    return s["cpu_s"] if s else None


async def _send_realtime(stream: AsyncASRStream, pcm: bytes, t0: float, rec: StreamRecord, reader: asyncio.Task) -> None:
    """Frame k at t0 + k * FRAME_S (absolute, no drift); stops early if the session closed."""
    for k, off in enumerate(range(0, len(pcm), FRAME_BYTES)):
        if reader.done():
            return
        late = time.monotonic() - (t0 + k * FRAME_S)
        if late < 0:
            await asyncio.sleep(-late)
        elif late > FRAME_S:
            rec.late_frames += 1
        await stream.send(pcm[off:off + FRAME_BYTES])
        rec.audio_s += len(pcm[off:off + FRAME_BYTES]) / 2 / RATE


async def _read(stream: AsyncASRStream, events: list[tuple[float, P.Message]]) -> None:
    async for m in stream.events():
        events.append((time.monotonic(), m))


async def _run_stream(stream: AsyncASRStream, rec: StreamRecord, pcm: bytes, t0: float,
                      drain_timeout: float) -> None:
    events: list[tuple[float, P.Message]] = []
    reader = asyncio.create_task(_read(stream, events))
    t_end: float | None = None
    rid = new_id()
    try:
        await _send_realtime(stream, pcm, t0, rec, reader)
        t_end = time.monotonic()
        # The protocol's finalize, sent here: the reader task timestamps its answer as it arrives.
        await stream.client.send(P.Finalize(session_id=stream.session_id, request_id=rid))
        await asyncio.wait_for(asyncio.shield(reader), drain_timeout)
    except DaemonError as e:
        rec.errors[f"send/{e.code.value}"] = rec.errors.get(f"send/{e.code.value}", 0) + 1
    except TimeoutError:
        logger.warning("stream %d: no answer to finalize within %g s", rec.index, drain_timeout)
    finally:
        if not reader.done():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            try:
                await stream.close(timeout=5.0)
            except DaemonError:
                pass
    read_events(rec, events, t_end, rid)


async def _open(client: AsyncASRClient, rec: StreamRecord) -> AsyncASRStream | None:
    try:
        stream = await client.open(language="zh", timeout=OPEN_TIMEOUT_S)
    except DaemonError as e:
        if e.code == ErrorCode.BUSY:
            rec.refused_busy = True
            logger.info("stream %d refused: busy (retry_after %s)", rec.index, e.retry_after)
        else:
            rec.errors[f"open/{e.code.value}"] = rec.errors.get(f"open/{e.code.value}", 0) + 1
        return None
    rec.admitted = True
    return stream


async def _poll_lag(st: Stack, stop: asyncio.Event, out: dict[str, float]) -> None:
    c = AsyncASRClient(st.asr, timeout=5.0)
    try:
        while not stop.is_set():
            try:
                q = (await c.describe()).get("queues", {})
                out["max_lag_s"] = max(out.get("max_lag_s", 0.0), float(q.get("asr_max_lag", 0.0)))
                # What admission measured and learned (the last poll's fit; the busiest window).
                # Each thread's (the worker, the decode thread) busiest window, and their mean.
                for name in ("worker", "decode"):
                    x = float(q.get(f"asr_{name}_load", 0.0))
                    out[f"{name}_load_max"] = max(out.get(f"{name}_load_max", 0.0), x)
                    out[f"{name}_load_sum"] = out.get(f"{name}_load_sum", 0.0) + x
                    out[f"{name}_load_polls"] = out.get(f"{name}_load_polls", 0.0) + 1
                for key in ("asr_stream_cost", "asr_fixed_load", "asr_stream_capacity"):
                    if key in q:
                        out[key] = q[key]
            except DaemonError:
                pass
            try:
                await asyncio.wait_for(stop.wait(), POLL_S)
            except TimeoutError:
                pass
    finally:
        await c.close()


async def _point(st: Stack, n: int, recs: Sequence[Recording], drain_timeout: float) -> dict[str, Any]:
    clients = [AsyncASRClient(st.asr, timeout=OPEN_TIMEOUT_S) for _ in range(n)]
    for c in clients:
        await c.connect()
    records = [StreamRecord(i, recs[i % len(recs)].id) for i in range(n)]
    stop = asyncio.Event()
    lag: dict[str, float] = {}
    poller = asyncio.create_task(_poll_lag(st, stop, lag))
    d0, c0, t_start, la0 = _cpu(st.daemon_pid), _cpu(os.getpid()), time.monotonic(), os.getloadavg()[0]
    try:
        streams = await asyncio.gather(*(_open(c, r) for c, r in zip(clients, records)))
        t0 = time.monotonic() + START_DELAY_S
        # Staggered within one frame period, as a room of microphones would be.
        await asyncio.gather(*(_run_stream(s, r, recs[r.index % len(recs)].pcm, t0 + r.index * FRAME_S / n,
                                           drain_timeout) for s, r in zip(streams, records) if s is not None))
        wall = time.monotonic() - t_start
        d1, c1 = _cpu(st.daemon_pid), _cpu(os.getpid())
    finally:
        stop.set()
        await poller
        for c in clients:
            await c.close()
    point = summarize(n, records, None if d0 is None or d1 is None else d1 - d0,
                      None if c0 is None or c1 is None else c1 - c0, wall, lag.get("max_lag_s"))
    for name in ("worker", "decode"):
        if f"{name}_load_polls" in lag:
            lag[f"{name}_load_mean"] = round(lag.pop(f"{name}_load_sum") / lag.pop(f"{name}_load_polls"), 3)
    point["admission"] = {k: v for k, v in lag.items() if k != "max_lag_s"}
    # The machine's 1-minute load average at the point's start and end (`uptime`): on a shared
    # machine CPU-s per audio-s is the figure contention disturbs least, latencies the most.
    point["load_avg"] = [round(la0, 2), round(os.getloadavg()[0], 2)]
    return point


async def _wait_idle(st: Stack) -> int:
    """Wait (at most IDLE_WAIT_S) until the daemon lists no ASR session; the number left."""
    c = AsyncASRClient(st.asr, timeout=5.0)
    left = -1
    try:
        deadline = time.monotonic() + IDLE_WAIT_S
        while True:
            try:
                left = len((await c.describe()).get("sessions", []))
            except DaemonError:
                left = -1
            if left == 0 or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.2)
    finally:
        await c.close()


async def _warm_up(st: Stack, utt: Recording) -> None:
    """One recording sent as fast as it goes, finalized: first-use allocations, not counted."""
    c = AsyncASRClient(st.asr, timeout=120.0)
    try:
        s = await c.open(language="zh")
        for off in range(0, len(utt.pcm), FRAME_BYTES * 16):
            await s.send(utt.pcm[off:off + FRAME_BYTES * 16])
        await s.finalize()
    finally:
        await c.close()


async def _capacity(st: Stack, args: argparse.Namespace) -> dict[str, Any]:
    recs = cap_recordings(build_recordings(load_manifest(Path(args.manifest))), args.seconds)
    await _warm_up(st, recs[0])
    warmup = []
    for n in getattr(args, "warmup", None) or []:
        await _wait_idle(st)
        logger.info("capacity: warm-up N=%d", n)
        w = await _point(st, n, recs, args.drain_timeout)
        logger.info("capacity: warm-up N=%d -> %s", n, w)
        warmup.append(w)
    points = []
    for n in args.streams:
        left = await _wait_idle(st)
        if left:
            logger.warning("capacity: the daemon still lists %s session(s) before N=%d", left, n)
        logger.info("capacity: N=%d", n)
        p = await _point(st, n, recs, args.drain_timeout)
        p["sessions_before"] = left
        logger.info("capacity: N=%d -> %s", n, p)
        points.append(p)
    return {"frame_ms": round(FRAME_S * 1000), "p95_limit_s": CAPACITY_P95_S,
            "recordings": [{"id": r.id, "seconds": round(r.seconds, 2)} for r in recs],
            "warmup": warmup, "points": points, "holds_up_to": largest_holding(points)}


def run_capacity(st: Stack, args: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(_capacity(st, args))


def print_capacity(r: dict[str, Any]) -> str:
    rows = []
    for p in r["points"]:
        lat, cad = p["final_latency_s"], p["partial_cadence_s"]
        rows.append([p["streams"], p["admitted"], p["refused_busy"], fmt(lat["p50"], digits=2),
                     fmt(lat["p95"], digits=2), fmt(cad["p50"], digits=2), fmt(cad["p95"], digits=2),
                     fmt(p["cpu_s_per_audio_s"], digits=3), fmt(p["daemon_cpu_percent"]),
                     fmt(p["client_cpu_percent"]), fmt(p["daemon_max_lag_s"], digits=1), p["late_frames"],
                     _load_avg(p), _problems(p)])
    secs = ", ".join(f"{x['seconds']:g}" for x in r["recordings"])
    warm = [w["streams"] for w in r.get("warmup") or []]
    after = f"; after a warm-up of {' then '.join(map(str, warm))} stream(s)" if warm else ""
    t = table(f"Capacity: real-time ASR streams straight at the daemon ({r['frame_ms']} ms frames; recordings "
              f"{secs} s{after})",
              ["N", "admitted", "busy", "final p50 s", "final p95 s", "partial gap p50 s", "p95 s",
               "CPU-s/audio-s", "daemon CPU %", "client CPU %", "max lag s", "late frames", "load avg", "errors"], rows)
    n = r["holds_up_to"]
    verdict = f"holds up to N = {n}" if n is not None else "holds at no N in the sweep"
    return f"{t}\n{verdict} (every stream admitted, final latency p95 <= {r['p95_limit_s']:g} s)"


def _load_avg(p: dict[str, Any]) -> str:
    la = p.get("load_avg")
    return f"{la[0]:.1f}-{la[1]:.1f}" if la else "-"


def _problems(p: dict[str, Any]) -> str:
    """Error events by code, and streams whose finalize went unanswered."""
    out = [f"{k} {v}" for k, v in sorted(p["errors"].items())]
    if p["undrained"]:
        out.append(f"no final answer {p['undrained']}")
    return ", ".join(out) or "none"
