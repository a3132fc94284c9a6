"""s2s-bench scaleout: the real-time ASR streams one daemon holds beside what several daemons hold
with each stream placed by daemon/wire/placement.py, measured in the same run (issue 29).

    s2s-bench scaleout [--daemons 2] [--engines tiny] [--one 8,16,24,32,40]
                       [--all 16,24,32,40,48,56,64,72,80] [--seconds 12] [--settle 32] [--out bench-results]

Starts `--daemons` daemons (each its own process, its ASR worker one thread: on a CPU host one
daemon's recognition is bound to one core), lets each serve `--warmup` stream counts (so every
daemon's admission has measured its own cost before placement compares their room), sweeps `--one` against the first alone, then (after
`--settle` seconds: the first daemon's admission forgets the saturation it reached) `--all` against
all of them: each stream opened as a front end opens it (daemon/wire/placement.first_taker: the
daemon with the most room by each daemon's describe, the next one when it answers busy). A point holds as in `s2s-bench capacity`: every
stream admitted and final latency p95 <= 1 s. Reported: both sweeps (capacity's table) and the
ratio of the largest holding N.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, cast

from daemon.tools.bench.capacity import (CAPACITY_P95_S, FRAME_S, OPEN_TIMEOUT_S, START_DELAY_S, Recording,
                                         StreamRecord, _cpu, _open, _point, _poll_lag, _run_stream, _wait_idle,
                                         _warm_up, build_recordings, cap_recordings, largest_holding,
                                         parse_streams, parse_warmup, print_capacity, stack_sessions,
                                         summarize)
from daemon.tools.bench.common import load_manifest, machine, report_logger
from daemon.tools.bench.stack import Stack, open_stack
from daemon.asr.load import SATURATION_MEMORY_SECONDS
from daemon.errors import S2SError
from daemon.wire.client_async import AsyncASRClient, AsyncASRStream, AsyncTTSClient
from daemon.wire.client_base import DaemonError
from daemon.wire.placement import ClientMember, Placement

logger = logging.getLogger(__name__)

DEFAULT_ONE = "8,16,24,32,40"
DEFAULT_ALL = "16,24,32,40,48,56,64,72,80"
DEFAULT_WARMUP = "8,32"


async def _pool_point(sts: Sequence[Stack], n: int, recs: Sequence[Recording], drain_timeout: float) -> Dict[str, Any]:
    """capacity's point over several daemons: each stream's own client, on the daemon placement chose."""
    members = [ClientMember(f"d{i}", AsyncASRClient(st.asr, timeout=5.0), AsyncTTSClient(st.tts, timeout=5.0))
               for i, st in enumerate(sts)]
    for m in members:
        await m.asr.connect()
        await m.tts.connect()
    placement = Placement(members)
    await placement.start()
    deadline = time.monotonic() + 10.0  # every daemon answered once (a loaded machine's first describe may be slow)
    while not all(r["up"] for r in placement.report()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    records = [StreamRecord(i, recs[i % len(recs)].id) for i in range(n)]
    chosen: List[Any] = [None] * n
    clients: List[AsyncASRClient] = []

    async def place_and_open(rec: StreamRecord) -> Optional[AsyncASRStream]:
        """As a front end opens (daemon/wire/placement.first_taker): the daemon with the most
        room, the next one when it answers busy; each stream its own client."""
        async def attempt(m: Any) -> AsyncASRStream:
            c = AsyncASRClient(m.asr.endpoint, timeout=OPEN_TIMEOUT_S)
            clients.append(c)
            await c.connect()
            s = await c.open(language="zh", timeout=OPEN_TIMEOUT_S)
            chosen[rec.index] = m
            return s

        async def opened(_: Any) -> Optional[AsyncASRStream]:
            try:
                return await placement.first_taker("asr", attempt)
            except DaemonError:
                raise
            except S2SError as e:  # no daemon in placement: counted as capacity counts an open's error
                raise DaemonError(e.message, e.code) from None

        return await _open(cast(AsyncASRClient, _Opener(opened)), rec)
    stop = asyncio.Event()
    lags: List[Dict[str, float]] = [{} for _ in sts]
    pollers = [asyncio.create_task(_poll_lag(st, stop, lag)) for st, lag in zip(sts, lags)]
    pids = [st.daemon_pid for st in sts]
    d0, c0, t_start = [_cpu(p) for p in pids], _cpu(os.getpid()), time.monotonic()
    try:
        streams = await asyncio.gather(*(place_and_open(r) for r in records))
        t0 = time.monotonic() + START_DELAY_S
        await asyncio.gather(*(_run_stream(s, r, recs[r.index % len(recs)].pcm, t0 + r.index * FRAME_S / n,
                                           drain_timeout) for s, r in zip(streams, records) if s is not None))
        wall = time.monotonic() - t_start
        d1, c1 = [_cpu(p) for p in pids], _cpu(os.getpid())
    finally:
        stop.set()
        await asyncio.gather(*pollers)
        await placement.close()
        for c in clients:
            await c.close()
        for m in members:
            await m.asr.close()
            await m.tts.close()
    daemon_cpu: Optional[float] = 0.0
    for a, b in zip(d0, d1):  # every daemon's CPU seconds over the point
        daemon_cpu = None if a is None or b is None or daemon_cpu is None else daemon_cpu + b - a
    lag_max = max((lag.get("max_lag_s", 0.0) for lag in lags), default=None)
    point = summarize(n, records, daemon_cpu, None if c0 is None or c1 is None else c1 - c0, wall, lag_max)
    point["per_daemon"] = [sum(1 for m in chosen if m is member) for member in members]  # admitted there
    point["load_avg"] = [round(os.getloadavg()[0], 2)] * 2
    return point


class _Opener:
    """What capacity's `_open` calls (`open(language=, timeout=)`), opening through placement."""

    def __init__(self, opened: Callable[[Any], Awaitable[Optional[AsyncASRStream]]]):
        self.opened = opened

    async def open(self, **kw: Any) -> Optional[AsyncASRStream]:
        return await self.opened(kw)


async def _sweep(sts: Sequence[Stack], counts: Sequence[int], recs: Sequence[Recording],
                 drain_timeout: float) -> Dict[str, Any]:
    points = []
    for n in counts:
        for st in sts:
            await _wait_idle(st)
        logger.info("scaleout: %d daemon(s), N=%d", len(sts), n)
        p = await (_point(sts[0], n, recs, drain_timeout) if len(sts) == 1 else _pool_point(sts, n, recs, drain_timeout))
        logger.info("scaleout: %d daemon(s), N=%d -> %s", len(sts), n, p)
        points.append(p)
    return {"frame_ms": round(FRAME_S * 1000), "p95_limit_s": CAPACITY_P95_S, "warmup": [],
            "recordings": [{"id": r.id, "seconds": round(r.seconds, 2)} for r in recs],
            "points": points, "holds_up_to": largest_holding(points), "daemons": len(sts)}


async def _run(sts: Sequence[Stack], args: argparse.Namespace) -> Dict[str, Any]:
    recs = cap_recordings(build_recordings(load_manifest(Path(args.manifest))), args.seconds)
    warmup: List[Dict[str, Any]] = []
    for st in sts:
        await _warm_up(st, recs[0])
        # Each daemon serves the same light loads first (capacity's --warmup), so each one's admission
        # has measured its cost: placement compares measured room, not one fit against another's prior.
        for n in args.warmup:
            await _wait_idle(st)
            warmup.append({"daemon": st.asr, **await _point(st, n, recs, args.drain_timeout)})
    one = await _sweep(sts[:1], args.one, recs, args.drain_timeout)
    # The first daemon's admission remembers the saturation the one-daemon sweep reached as a
    # ceiling (daemon/asr/load.py): let it pass, or the second sweep starts with one daemon capped.
    logger.info("scaleout: %.0f s for the first daemon's saturation memory", args.settle)
    await asyncio.sleep(args.settle)
    every = await _sweep(sts, args.all, recs, args.drain_timeout)
    a, b = one["holds_up_to"], every["holds_up_to"]
    return {"one": one, "all": every, "ratio": round(b / a, 2) if a and b else None, "warmup": warmup}


def report(r: Dict[str, Any]) -> str:
    n = r["all"]["daemons"]
    one, every = print_capacity(r["one"]), print_capacity(r["all"])
    rows = [f"{p['streams']}: {p['per_daemon']}" for p in r["all"]["points"]]
    return (f"One daemon:\n{one}\n\n{n} daemons, streams placed by daemon/wire/placement.py "
            f"(streams per daemon: {'; '.join(rows)}):\n{every}\n\n"
            f"ratio of the largest holding N ({n} daemons / one): {r['ratio']}")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="s2s-bench scaleout", description=__doc__.split("\n\n")[0])
    p.add_argument("--daemons", type=int, default=2, help="daemons started (default 2)")
    p.add_argument("--engines", default="tiny", help="engines of each daemon, as s2s-bench --engines (default tiny)")
    p.add_argument("--one", type=parse_streams, default=DEFAULT_ONE, help=f"stream counts, one daemon ({DEFAULT_ONE})")
    p.add_argument("--all", type=parse_streams, default=DEFAULT_ALL, help=f"stream counts, all daemons ({DEFAULT_ALL})")
    p.add_argument("--seconds", type=float, default=12.0, help="cap on each recording (11-19 s)")
    p.add_argument("--warmup", type=parse_warmup, default=DEFAULT_WARMUP,
                   help=f"stream counts each daemon serves first, not measured (default {DEFAULT_WARMUP})")
    p.add_argument("--settle", type=float, default=SATURATION_MEMORY_SECONDS + 2,
                   help="seconds between the sweeps: the first daemon's admission forgets the saturation the "
                        f"one-daemon sweep reached (default {SATURATION_MEMORY_SECONDS + 2:g})")
    p.add_argument("--bench-args", default="", help="more s2s-bench options for the daemons, e.g. '--asr-ncpu 1'")
    p.add_argument("--out", default="bench-results", help="directory for scaleout.json")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.daemons < 2:
        p.error("--daemons must be at least 2")
    return args


def main(argv: Optional[List[str]], base_args: Callable[[List[str]], argparse.Namespace]) -> int:
    """`base_args`: s2s-bench's own parser (daemon/tools/bench/cli.parse_args, handed in by its
    dispatch so this module does not import it back)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = base_args(["capacity", "--engines", args.engines, "--seconds", str(args.seconds),
                           *args.bench_args.split()])
    base.one, base.all, base.settle, base.warmup = args.one, args.all, args.settle, args.warmup
    sessions = stack_sessions(args.one + args.all + args.warmup)
    say = report_logger("scaleout")
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        sts = [stack.enter_context(open_stack(base, need_bridge=False, sessions=sessions)) for _ in range(args.daemons)]
        say.info("s2s-bench scaleout: %d x %s", args.daemons, sts[0].label())
        result = asyncio.run(_run(sts, base))
    say.info("%s", report(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scaleout.json"
    path.write_text(json.dumps({"mode": "scaleout", "machine": machine(), "args": vars(args), "result": result,
                                "elapsed_s": round(time.monotonic() - t0, 1)}, indent=1, default=str))
    say.info("wrote %s", path)
    return 0

