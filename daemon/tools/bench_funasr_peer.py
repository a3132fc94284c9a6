"""FunASR's own Python websocket server beside `s2s-bench capacity`: the same recordings, the same
real-time 60 ms frames, the same measure (end of stream -> its last final).

The peer is `runtime/python/websocket/funasr_wss_server.py` of a FunASR checkout (issue 30 names
it). Its current version loads hub model names and a speaker model; the one this measures is the
last with models by path, commit 0d6e6a2fb ("Fix: Spelling causes hotwords to not take effect"):

    git -C FunASR show 0d6e6a2fb:runtime/python/websocket/funasr_wss_server.py > /tmp/funasr_wss_server.py
    python -m daemon.tools.bench_funasr_peer --server /tmp/funasr_wss_server.py \\
        --models /tmp/cap-models --streams 1,2,4 --ncpu 2

It runs in this venv's python and funasr; its handler takes (websocket, path), the websockets
< 13 signature, so it is started with `serve` adapted to call it with path None, inside the
file's own event loop (nothing else of the file is changed). Per point: a fresh server; N
clients in `2pass` mode (chunk_size 5,10,5, chunk_interval 10: 60 ms frames), each sends its
recording on an absolute real-time schedule, then `{"is_speaking": false}`; final latency =
that message -> the last `2pass-offline` answer (the server sends one per utterance, the last
after the end); partial cadence = gaps between
`2pass-online` messages; the server's CPU seconds per audio second. A stream whose last answer
does not come within --drain-timeout counts as not held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from daemon.tools.bench.capacity import (CAPACITY_P95_S, FRAME_BYTES, FRAME_S, build_recordings, cap_recordings,
                                         parse_streams)
from daemon.tools.bench.common import (DEFAULT_MANIFEST, RATE, load_manifest, pct, proc_sample, report_logger,
                                       table)
from daemon.tools.bench.stack import Proc, _env
from daemon.tools.bench_wyoming import free_port, wait_port

# Runs the peer file as its own __main__ with websockets.serve adapted to its 2-argument handler.
# (websockets >= 14 builds its server inside a running loop: the file's run_until_complete runs it.)
SHIM = ("import runpy, sys, websockets\n"
        "serve = websockets.serve\n"
        "async def adapted(handler, *a, **kw):\n"
        "    return await serve(lambda ws: handler(ws, None), *a, **kw)\n"
        "websockets.serve = adapted\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def server_argv(server: Path, models: Path, port: int, ncpu: int) -> List[str]:
    full = models / "full"
    return [sys.executable, "-c", SHIM, str(server), "--host", "127.0.0.1", "--port", str(port), "--certfile", "",
            "--device", "cpu", "--ngpu", "0", "--ncpu", str(ncpu),
            "--asr_model", str(full / "paraformer"), "--asr_model_online", str(full / "paraformer-streaming"),
            "--vad_model", str(models / "fsmn-vad"), "--punc_model", str(full / "ct-punc")]


def latency_of(events: List[tuple], t_end: Optional[float]) -> Optional[float]:
    """(arrival time, message dict) pairs -> end of stream -> the last 2pass-offline answer after it."""
    if t_end is None:
        return None
    after = [t for t, m in events if m.get("mode") == "2pass-offline" and t >= t_end]
    return after[-1] - t_end if after else None


def partial_gaps(events: List[tuple]) -> List[float]:
    times = [t for t, m in events if m.get("mode") == "2pass-online"]
    return [b - a for a, b in zip(times, times[1:]) if b - a < 5.0]  # not across a pause between utterances


async def _stream(port: int, pcm: bytes, t0: float, drain: float, index: int) -> Dict[str, Any]:
    import websockets
    from websockets.typing import Subprotocol

    events: List[tuple] = []
    t_end: Optional[float] = None
    async with websockets.connect(f"ws://127.0.0.1:{port}", subprotocols=[Subprotocol("binary")],
                                  max_size=None) as ws:
        await ws.send(json.dumps({"mode": "2pass", "chunk_size": [5, 10, 5], "chunk_interval": 10,
                                  "encoder_chunk_look_back": 4, "decoder_chunk_look_back": 1,
                                  "wav_name": f"s{index}", "is_speaking": True}))

        async def read() -> None:
            async for msg in ws:
                events.append((time.monotonic(), json.loads(msg)))

        reader = asyncio.create_task(read())
        for k, off in enumerate(range(0, len(pcm), FRAME_BYTES)):
            wait = t0 + k * FRAME_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await ws.send(pcm[off:off + FRAME_BYTES])
        t_end = time.monotonic()
        await ws.send(json.dumps({"is_speaking": False}))
        deadline = t_end + drain
        while time.monotonic() < deadline and latency_of(events, t_end) is None:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a later answer for the same end, if any
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return {"latency": latency_of(events, t_end), "gaps": partial_gaps(events), "audio_s": len(pcm) / 2 / RATE}


def _cpu_s(pid: int) -> float:
    sample = proc_sample(pid)
    if sample is None:
        raise SystemExit(f"funasr_wss_server (pid {pid}) is gone")
    return sample["cpu_s"]


def run_point(args: argparse.Namespace, n: int, recs: List[Any]) -> Dict[str, Any]:
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="funasr-peer-")) / "server.log"
    proc = Proc("funasr_wss_server", server_argv(Path(args.server), Path(args.models), port, args.ncpu), log, _env())
    try:
        wait_port(port, proc, args.start_timeout)
        cpu0 = _cpu_s(proc.pid)

        async def all_streams() -> List[Dict[str, Any]]:
            t0 = time.monotonic() + 0.2
            return await asyncio.gather(*[_stream(port, recs[i % len(recs)].pcm, t0, args.drain_timeout, i)
                                          for i in range(n)])

        out = asyncio.run(all_streams())
        cpu = _cpu_s(proc.pid) - cpu0
    finally:
        proc.stop()
    lat = [o["latency"] for o in out if o["latency"] is not None]
    gaps = [g for o in out for g in o["gaps"]]
    audio = sum(o["audio_s"] for o in out)
    p95 = pct(lat, 95) if lat else None
    return {"streams": n, "answered": len(lat), "final_p50_s": pct(lat, 50) if lat else None, "final_p95_s": p95,
            "final_max_s": max(lat) if lat else None, "partial_gap_p95_s": pct(gaps, 95) if gaps else None,
            "cpu_s_per_audio_s": cpu / audio if audio else None,
            "holds": len(lat) == n and p95 is not None and p95 <= CAPACITY_P95_S}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", required=True, help="funasr_wss_server.py (FunASR commit 0d6e6a2fb)")
    ap.add_argument("--models", required=True, help="directory with fsmn-vad/ and full/ (s2s-models synth --size full)")
    ap.add_argument("--streams", type=parse_streams, default=parse_streams("1,2,4"))
    ap.add_argument("--ncpu", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=30.0, help="each recording cut to at most this")
    ap.add_argument("--drain-timeout", type=float, default=60.0)
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--json", help="write the points here")
    args = ap.parse_args(argv)
    recs = cap_recordings(build_recordings(load_manifest(DEFAULT_MANIFEST)), args.seconds)
    points = [run_point(args, n, recs) for n in args.streams]

    def f(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.2f}"

    rows = [[p["streams"], p["answered"], f(p["final_p50_s"]), f(p["final_p95_s"]), f(p["final_max_s"]),
             f(p["partial_gap_p95_s"]), f(p["cpu_s_per_audio_s"]), p["holds"]] for p in points]
    report_logger("funasr-peer").info("%s", table(
        "FunASR's funasr_wss_server.py (2pass), the capacity recordings in real time",
        ["streams", "answered", "final p50 s", "final p95 s", "max s", "partial gap p95 s", "CPU-s/audio-s", "holds"],
        rows))
    if args.json:
        Path(args.json).write_text(json.dumps(points, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
