"""Health: the engine workers' state, the systemd watchdog and STATUS, and `describe`.

The watchdog loop runs every watchdog period (half of WATCHDOG_USEC; 5 s without one). It
sends WATCHDOG=1 only while every engine worker is healthy by run time (daemon/serving/workers.py)
and every supervised loop is alive. A dead worker is fatal: `on_fatal` stops the daemon with
a non-zero exit so systemd restarts it; a stuck one only withholds the pings (systemd's
WatchdogSec decides), and is reported in STATUS and `describe`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Union

import daemon
from daemon.wire import protocol as P
from daemon.asr.capacity import Capacity
from daemon.asr.sessions import ASRSessions
from daemon.config import Config
from daemon.engines import ASRPool, Capabilities, EngineInfo, Fallback, TTSEngine, merge_fallbacks
from daemon.asr import turn_judge
from daemon.serving.notify import Notifier
from daemon.tts.jobs import TTSJobs
from daemon.serving.workers import Worker

logger = logging.getLogger(__name__)

DEFAULT_PERIOD = 5.0


def engine_info(kind: str, engine: Union[ASRPool, TTSEngine]) -> EngineInfo:
    try:
        info = engine.info()
        assert isinstance(info, EngineInfo)
        return info
    except Exception as e:  # info must never break describe: report the failure in the same schema
        logger.exception("%s engine info failed", kind)
        return EngineInfo(kind=kind, engine=engine.name, device="?", requested_device="?",
                          dtype="?", sample_rate=0, capabilities=Capabilities(), loaded=False,
                          notes=(f"info failed: {type(e).__name__}: {e}",))


class Health:
    def __init__(self, cfg: Callable[[], Config], notifier: Notifier, asr_engine: ASRPool, tts_engine: TTSEngine,
                 workers: List[Worker], asr: ASRSessions, tts: TTSJobs, fallbacks: List[Fallback],
                 counters: Dict[str, int], on_fatal: Callable[[str], None]):
        self.cfg = cfg
        self.notifier = notifier
        self.asr_engine, self.tts_engine = asr_engine, tts_engine
        self.workers = workers
        self.asr, self.tts = asr, tts
        self.fallbacks = list(fallbacks)
        self.counters = counters
        self.on_fatal = on_fatal
        self.interval = notifier.watchdog_interval()
        self.period = self.interval or DEFAULT_PERIOD
        for w in workers:
            w.period = self.period
        self.healthy = True
        self.problems: List[str] = []
        self.stopping = False
        self.started = time.time()
        self._last_status = ""

    # --- reporting ---------------------------------------------------------------------------

    def _asr_info(self) -> EngineInfo:
        # Sessions and their cap are the daemon's (limits.max_sessions, reloadable); pools keep none.
        return dataclasses.replace(engine_info("asr", self.asr_engine), sessions=len(self.asr.sessions),
                                   max_sessions=self.cfg().limits.max_sessions)

    def all_fallbacks(self, asr: EngineInfo, tts: EngineInfo) -> List[Fallback]:
        return merge_fallbacks(self.fallbacks, asr.fallbacks, tts.fallbacks)

    def describe(self) -> Dict[str, Any]:
        cfg = self.cfg()
        now = time.monotonic()
        sessions = self.asr.sessions.values()
        worst, queued = Capacity.lag((s.backlog for s in sessions), now)
        asr, tts = self._asr_info(), engine_info("tts", self.tts_engine)
        cap = self.asr.capacity
        counters = dict(self.counters, busy_open_lag=cap.busy_open_lag, busy_open_load=cap.busy_open_load,
                        audio_shed=cap.audio_shed)
        counters.update(turn_judge.counters(self.asr_engine))
        live = cap.streaming(s.backlog for s in sessions)
        fit = cap.load.fit()
        return {
            "daemon": {"version": daemon.__version__, "protocol": P.PROTOCOL_VERSION, "pid": os.getpid(),
                       "uptime": round(time.time() - self.started, 3), "config": cfg.source,
                       "stopping": self.stopping, "healthy": self.healthy,
                       "endpoints": {"asr": cfg.daemon.endpoint("asr"), "tts": cfg.daemon.endpoint("tts")}},
            "asr": asr.to_dict(),
            "tts": tts.to_dict(),
            "capabilities": {"partials": asr.capabilities.partials, "hotwords": asr.capabilities.hotwords,
                             "streaming_tts": tts.capabilities.streaming},
            # Every fallback taken (startup engine choice, device moves), each once: Fallback records.
            "fallbacks": [f.to_dict() for f in self.all_fallbacks(asr, tts)],
            "sessions": self.asr.describe_rows(now),
            "queues": {"asr_sessions": len(self.asr.sessions),
                       "asr_queued_chunks": sum(s.queue.qsize() for s in sessions),
                       "asr_max_lag": round(worst, 3), "asr_queued_seconds": round(queued, 2),
                       "asr_worker_load": round(cap.load.load, 3),
                       "asr_decode_load": round(cap.decode.load, 3),
                       "asr_streams": len(live), "asr_stream_cost": round(fit.per_stream, 4),
                       "asr_fixed_load": round(fit.fixed, 3),
                       "asr_stream_capacity": cap.stream_capacity(cfg.limits.max_asr_load),
                       "asr_at_capacity": worst > cfg.limits.max_asr_lag,
                       "tts_requests": len(self.tts), "tts_owners": len(self.tts.per_owner),
                       "tts_steps_waiting": len(self.tts.fair)},
            "turn_judge": turn_judge.describe(self.asr_engine),
            "limits": dataclasses.asdict(cfg.limits),
            "counters": counters,
        }

    def status_line(self) -> str:
        a, t = self._asr_info(), engine_info("tts", self.tts_engine)
        line = (f"serving: asr={a.engine}@{a.device} tts={t.engine}@{t.device}, "
                f"{len(self.asr.sessions)} session(s), {len(self.tts)} TTS request(s)")
        fallbacks = self.all_fallbacks(a, t)
        if fallbacks:
            line += f"; fallback: {'; '.join(f.line() for f in fallbacks)}"
        if not self.healthy:
            line += f"; UNHEALTHY: {'; '.join(self.problems)}"
        return line

    # --- the loop ----------------------------------------------------------------------------

    def check(self) -> bool:
        """Judge the workers now; True when healthy. A dead worker calls on_fatal."""
        problems = [p for p in (w.problem() for w in self.workers) if p]
        for w in self.workers:
            if w.dead:
                self.on_fatal(f"{w.name} engine worker is gone: {w.dead}")
        healthy = not problems
        if healthy != self.healthy:
            if problems:
                logger.error("engine worker(s) unhealthy: %s; withholding WATCHDOG=1", "; ".join(problems))
            else:
                logger.info("engine workers healthy again")
        self.healthy, self.problems = healthy, problems
        return healthy

    def ready(self) -> None:
        self._last_status = self.status_line()
        self.notifier.ready(self._last_status)
        if self.interval:
            self.notifier.watchdog()
        logger.info("ready: %s", self._last_status)

    async def run(self) -> None:
        for w in self.workers:
            w.kick()
        while True:
            await asyncio.sleep(self.period)
            if self.check() and self.interval and not self.stopping:
                self.notifier.watchdog()
            line = self.status_line()
            if line != self._last_status:
                self._last_status = line
                self.notifier.status(line)
            for w in self.workers:
                w.kick()

    async def housekeeping(self) -> None:
        """Idle sessions and the load figure, about every second."""
        while True:
            await asyncio.sleep(min(1.0, self.cfg().limits.idle_timeout / 4))
            self.asr.capacity.tick(s.backlog for s in self.asr.sessions.values())
            self.asr.gc_idle()

    def report(self, text: str) -> None:
        self.notifier.status(text)

    def failed(self, why: Optional[str]) -> None:
        self.healthy = False
        if why:
            self.problems = [why]
            self.notifier.status(f"failed: {why}")
