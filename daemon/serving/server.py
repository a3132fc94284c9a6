"""The speech daemon's serving side: wiring of the parts on one asyncio loop.

    transport.py     ROUTER sockets: bind, receive + decode (yields, per-peer budgets), send
    asr/sessions.py  ASR sessions: the handler and one task per session
    asr/capacity.py  admission and lag accounting (pure, injected clock)
    tts/jobs.py      TTS requests: one task per request, one worker step per sentence
    workers.py       engine worker calls with a run-time budget per kind
    health.py        watchdog, STATUS, describe
    reload.py        SIGHUP: what changed, what needs a restart

`Daemon.serve()`: bind -> READY=1 -> serve until SIGTERM/SIGINT -> drain within
daemon.drain_timeout -> exit 0. Every loop it starts is supervised: if a receive loop or the
watchdog loop ends, or an engine worker is gone, the daemon stops pinging the watchdog and
`serve()` returns 1, so systemd restarts it. The loop never runs inference: every engine
call goes through a `Worker` (one thread per engine).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Dict, List, Optional

from daemon.wire import protocol as P
from daemon.serving import reload as reloading
from daemon.asr.sessions import ASRSessions
from daemon.config import Config
from daemon.engines import ASRPool, Fallback, TTSEngine
from daemon.serving.health import Health, engine_info
from daemon.serving.notify import Notifier
from daemon.serving.transport import BindError, Transport, short
from daemon.tts.jobs import TTSJobs
from daemon.serving.workers import Worker

logger = logging.getLogger(__name__)


class Daemon:
    def __init__(self, cfg: Config, asr: ASRPool, tts: TTSEngine, fallbacks: List[Fallback],
                 notifier: Optional[Notifier] = None, reload_pending: bool = False):
        self.cfg = cfg
        self.asr_engine, self.tts_engine = asr, tts
        self.notifier = notifier or Notifier()
        self.counters: Dict[str, int] = {"peer_gone": 0, "busy": 0}
        self.stopping = False
        self.fatal: Optional[str] = None
        self.reload_pending = reload_pending
        self.workers = [Worker("asr", asr.submit), Worker("tts", tts.submit)]
        self.transport = Transport(cfg.daemon.hwm, cfg.daemon.socket_mode_bits, self.counters, self._peer_gone,
                                   cfg.cluster)
        config = lambda: self.cfg  # noqa: E731 - the parts read the live config per request
        self.asr = ASRSessions(asr, self.workers[0], self.transport, config, self.counters,
                               lambda: engine_info("asr", asr))
        self.tts = TTSJobs(tts, self.workers[1], self.transport, config)
        self.health = Health(config, self.notifier, asr, tts, self.workers, self.asr, self.tts, fallbacks,
                             self.counters, self.fail)
        self.tasks: Dict[str, "asyncio.Task[None]"] = {}
        self._stop: Optional[asyncio.Event] = None
        self._sigints = 0

    # --- requests ---------------------------------------------------------------------------

    def _common(self, which: str, ident: bytes, msg: P.Message) -> bool:
        if isinstance(msg, P.Ping):
            self.transport.send(which, ident, P.Pong(request_id=msg.request_id, time=time.time()))
        elif isinstance(msg, P.Describe):
            self.transport.send(which, ident, P.Info(request_id=msg.request_id, info=self.describe()))
        else:
            return False
        return True

    def _handle_asr(self, ident: bytes, msg: P.Message) -> None:
        if not self._common("asr", ident, msg):
            self.asr.handle(ident, msg)

    def _handle_tts(self, ident: bytes, msg: P.Message) -> None:
        if not self._common("tts", ident, msg):
            self.tts.handle(ident, msg)

    def _peer_gone(self, ident: bytes) -> None:
        sessions, jobs = self.asr.peer_gone(ident), self.tts.peer_gone(ident)
        if sessions or jobs:
            self.counters["peer_gone"] += 1
            logger.info("peer %s vanished: freeing %d session(s), cancelling %d TTS request(s)", short(ident),
                        sessions, jobs)

    def describe(self) -> Dict[str, object]:
        return self.health.describe()

    # --- lifecycle --------------------------------------------------------------------------

    def request_stop(self, why: str) -> None:
        if self._stop is not None and not self._stop.is_set():
            logger.info("%s: shutting down (drain up to %.1f s)", why, self.cfg.daemon.drain_timeout)
            self._stop.set()

    def fail(self, why: str) -> None:
        """Something the daemon cannot serve without is gone: stop pinging, exit non-zero."""
        if self.fatal is None:
            self.fatal = why
            logger.critical("%s: exiting so that systemd restarts the daemon", why)
            self.health.failed(why)
            self.health.stopping = True
        self.request_stop("fatal")

    def _on_sigint(self) -> None:
        self._sigints += 1
        if self._sigints > 1:
            logger.warning("second SIGINT: exiting now")
            logging.shutdown()
            os._exit(130)
        self.request_stop("SIGINT (again to force)")

    def reload(self) -> None:
        if self.stopping:
            logger.info("SIGHUP while stopping: ignored")
            return
        cfg, line = reloading.reload(self.cfg)
        if cfg is not None:
            self.cfg = cfg
            logger.info("SIGHUP: %s", line)
        else:
            logger.error("SIGHUP: %s", line)
        self.health.report(line)

    def _supervise(self, task: "asyncio.Task[None]") -> None:
        if self.stopping:
            return
        exc = None if task.cancelled() else task.exception()
        self.fail(f"loop {task.get_name()} ended" + (f": {type(exc).__name__}: {exc}" if exc else ""))

    def _in_flight(self) -> int:
        return self.asr.in_flight() + len(self.tts)

    async def _drain_and_close(self) -> None:
        self.stopping = self.asr.stopping = self.tts.stopping = self.health.stopping = True
        timeout = 0.0 if self.fatal else self.cfg.daemon.drain_timeout
        self.notifier.stopping(f"stopping: draining {self._in_flight()} request(s), up to {timeout:g} s")
        deadline = time.monotonic() + timeout
        while self._in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self._in_flight()
        if left:
            logger.warning("drain timeout: cancelling %d in-flight request(s)", left)
        self.asr.shutdown()
        self.tts.shutdown()
        for t in self.tasks.values():
            t.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.transport.bind("asr", self.cfg.daemon.endpoint("asr"))
            self.transport.bind("tts", self.cfg.daemon.endpoint("tts"))
        except BindError as e:  # one line naming the endpoint and why; exit 1 at once
            logger.error("%s", e.message)
            self.notifier.status(f"failed: {e.message}")
            self.transport.close()
            return 1
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loops = {"asr-recv": self.transport.receive("asr", P.ASR_REQUESTS, self._handle_asr),
                 "tts-recv": self.transport.receive("tts", P.TTS_REQUESTS, self._handle_tts),
                 "housekeeping": self.health.housekeeping(), "watchdog": self.health.run()}
        for name, coro in loops.items():
            self.tasks[name] = loop.create_task(coro, name=name)
            self.tasks[name].add_done_callback(self._supervise)
        self.health.ready()
        if self.reload_pending:
            logger.info("SIGHUP arrived while loading: re-reading the config now")
            self.reload()
        await self._stop.wait()
        await self._drain_and_close()
        # Sockets closed and their files removed while SIGTERM is still ours: a supervisor's
        # SIGTERM arriving right after SIGINT (start-s2s.sh on Ctrl-C) must not kill the daemon
        # between the two and leave stale socket files behind.
        self.transport.close()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a late reload must not kill a stopping daemon
        return 1 if self.fatal else 0
