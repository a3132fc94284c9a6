"""Engine worker calls with a run-time budget: how the daemon judges an engine worker healthy.

Every engine runs its inference on one worker thread (`engine.submit`). The daemon submits
through a `Worker`, which records, on the worker thread, which call is running and since
when. A worker is healthy while the call it is running has been running for less than its
kind's budget — time a call waits in the queue behind other legitimate work does not count
(the old heartbeat, queued behind a long synthesis, got healthy daemons killed). A worker with
queued work that starts nothing for a budget is stuck too; an idle worker gets a no-op
heartbeat so a dead thread is noticed. A worker whose executor refuses work is dead.

Budgets are multiples of the watchdog period (half of WATCHDOG_USEC; 5 s without one), so a
tight test watchdog and a 10 s production one scale alike. Engine code that knows a step will
be long (reloading models on the CPU after a CUDA error) calls `extend_budget(seconds)` from
the worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from daemon.errors import ErrorCode, S2SError

logger = logging.getLogger(__name__)

# Budget of one call of each kind, in watchdog periods. Every call the daemon makes is
# bounded: ASR feeds at most limits.max_chunk_seconds of audio, TTS one sentence per call.
BUDGET_PERIODS: Dict[str, float] = {
    "heartbeat": 1.5, "open": 3.0, "feed": 3.0, "finalize": 3.0, "reset": 1.5, "close": 1.5,
    "sentence": 3.0, "stream": 3.0, "other": 3.0, "decode": 3.0,
}

# A batch of several sessions' feeds (daemon/asr/batch.py) is one call: each feed after the
# first adds this many watchdog periods to its budget (a batch is bounded by its size).
BATCH_FEED_PERIODS = 0.5

_local = threading.local()


@dataclass
class _Call:
    kind: str
    started: float
    extra: float = 0.0


def extend_budget(seconds: float) -> None:
    """From engine code on a worker thread: the current call may take `seconds` longer."""
    call = getattr(_local, "call", None)
    if isinstance(call, _Call):
        call.extra += seconds


class WorkerGone(S2SError):
    def __init__(self, name: str):
        super().__init__(f"the {name} engine worker is gone", ErrorCode.UNAVAILABLE)


class Worker:
    """One engine's worker thread, seen through the calls the daemon submits to it."""

    def __init__(self, name: str, submit: Callable[..., "concurrent.futures.Future[Any]"],
                 period: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.name = name
        self._submit = submit
        self.period = period
        self.clock = clock
        self.current: Optional[_Call] = None
        self.queued = 0
        self.progress_at = clock()  # last time a call started or finished
        self._busy_s = 0.0          # run time of finished calls
        self.dead: Optional[str] = None
        # Workers that take part of this one's work (the ASR decode worker, daemon/asr/batch.py):
        # their problems are this worker's, their run time is in its load figure.
        self.helpers: List["Worker"] = []
        self._heartbeat: Optional["concurrent.futures.Future[Any]"] = None
        self._lock = threading.Lock()

    def budget(self, kind: str) -> float:
        return BUDGET_PERIODS.get(kind, BUDGET_PERIODS["other"]) * self.period

    def _run(self, kind: str, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        call = _Call(kind, self.clock())
        with self._lock:
            self.queued -= 1
            self.current = call
            self.progress_at = call.started
        _local.call = call
        try:
            return fn(*args, **kwargs)
        finally:
            _local.call = None
            now = self.clock()
            with self._lock:
                self.current = None
                self.progress_at = now
                self._busy_s += now - call.started

    @property
    def own_busy_s(self) -> float:
        """This thread's run time so far, the running call's included."""
        with self._lock:
            return self._busy_s + (self.clock() - self.current.started if self.current is not None else 0.0)

    @property
    def busy_s(self) -> float:
        """Run time so far, this worker's and its helpers' (work moved to a helper thread is still
        this engine's work; admission reads each thread's `own_busy_s` apart, daemon/asr/capacity.py),
        the running call's included: a full-size decode of 0.5-1.3 s counted only when it ended put
        all of it in the 2 s window it ended in (read as saturated, and left out of the fit) and
        none in the one before, so the fit saw only the quiet windows and admitted 5 streams where 3 held."""
        return self.own_busy_s + sum(h.busy_s for h in self.helpers)

    def submit(self, kind: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> "concurrent.futures.Future[Any]":
        if self.dead:
            raise WorkerGone(self.name)
        with self._lock:
            if not self.queued and self.current is None:
                self.progress_at = self.clock()  # idle until now: the wait starts here
            self.queued += 1
        try:
            fut = self._submit(self._run, kind, fn, args, kwargs)
        except RuntimeError as e:  # the executor was shut down under us
            with self._lock:
                self.queued -= 1
            self.dead = str(e) or "executor shut down"
            logger.critical("%s engine worker refuses work: %s", self.name, self.dead)
            raise WorkerGone(self.name) from None
        fut.add_done_callback(self._forget_cancelled)
        return fut

    def _forget_cancelled(self, fut: "concurrent.futures.Future[Any]") -> None:
        if fut.cancelled():  # never ran: it no longer waits in the queue
            with self._lock:
                self.queued -= 1

    async def call(self, kind: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.wrap_future(self.submit(kind, fn, *args, **kwargs))

    def kick(self) -> None:
        """A no-op heartbeat when the worker is idle, so a dead thread shows as stuck."""
        if self.dead or (self._heartbeat is not None and not self._heartbeat.done()):
            return
        if self.current is None and not self.queued:
            try:
                self._heartbeat = self.submit("heartbeat", _noop)
            except WorkerGone:
                pass

    def problem(self, now: Optional[float] = None) -> Optional[str]:
        """Why this worker is not healthy now, or None."""
        if self.dead:
            return f"{self.name} worker gone ({self.dead})"
        now = self.clock() if now is None else now
        for h in self.helpers:
            p = h.problem(now)
            if p:
                return p
        with self._lock:
            call, queued, progress = self.current, self.queued, self.progress_at
        if call is not None:
            ran = now - call.started
            if ran > self.budget(call.kind) + call.extra:
                return f"{self.name} worker: {call.kind} call running for {ran:.1f} s (budget {self.budget(call.kind):.1f} s)"
            return None
        if queued and now - progress > self.budget("heartbeat"):
            return f"{self.name} worker: {queued} call(s) queued and none started for {now - progress:.1f} s"
        return None


def _noop() -> None:
    return None
