"""Cross-session batching on the ASR worker: many sessions' feeds in one worker call, their
model requests answered in batches.

An engine session's `feed_steps(pcm)` (daemon/asr/base.py) is its feed written as a generator:
it yields each model request (a VAD block, a streaming-decoder chunk, an utterance to decode)
and takes the answer back. `drive` advances many such generators in lock-step: it collects the
request each one is waiting on, has the pool answer them grouped by kind (one fsmn-vad encoder
forward for every session's block, one padded Paraformer forward for utterances of similar
length, ...), sends each answer back, and repeats until every session's feed has returned its
events. A session's own logic (and the order of its audio) is exactly that of `feed()`.

`FeedBatcher` is the daemon's side: a session task awaits `feed(engine, pcm)`; when the worker
is idle the feed goes at once (a batch of one: no added latency at low load); while a batch
runs, the feeds that arrive wait and go together as the next one. So batches grow with the
load and nothing waits on a timer. Each session's result is delivered as soon as its own
generator finishes, not when the whole batch does.

A pool whose offline decodes are long (`pool.offloads`: a full-size Paraformer on the CPU, about
a second of compute at each utterance end) has them answered on its decode thread instead: the
session asking leaves the worker call there (`drive`'s `park`), the worker goes on with the other
sessions' VAD blocks and streaming chunks, and when the decode is done the session's steps go on
on the decode thread as far as they need no model: a finalize's final goes out from there (it
waited for the worker's current call and then a call of its own, ~0.1-0.2 s at 4 full-size
streams); at their next model request they go back to the worker, which goes on from there
(`steps.asking`). Each call of the decode thread answers every request queued by then,
together. A session's events still come together at the end of its feed, so nothing of one feed
overtakes another, and a session's next feed waits for this one as before. The decode thread is
a `Worker` of its own (kind "decode"), a helper of the ASR worker: its budget is watched with the
worker's, and its run time is the decode thread's load figure (daemon/asr/capacity.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable, Dict, Generator, List, Optional, Set, Tuple

from daemon.asr.base import StreamChunk
from daemon.asr.steps import Done, asking, drive
from daemon.engines import ASREvent, ASRPool, ASRSession
from daemon.serving.workers import BATCH_FEED_PERIODS, Worker, WorkerGone, extend_budget

logger = logging.getLogger(__name__)

_Resume = Tuple[Any, Optional[BaseException]]  # what a session's steps are driven on with
# How long the decode thread waits, while other sessions are being fed, for decodes about to come
# due before it starts one (utterances of streams that end together, seen a feed apart).
DECODE_GATHER_SECONDS = 0.08
STREAMING_SECONDS = 1.0  # a session fed within this long is streaming


class _Item:
    """A session's feed (or finalize): how its steps are made (on the worker, at first drive), the
    steps, what they resume with, its waiter."""

    __slots__ = ("make", "steps", "first", "fut")

    def __init__(self, make: Callable[[], Generator[Any, Any, Any]], fut: "asyncio.Future[List[ASREvent]]"):
        self.make, self.fut = make, fut
        self.steps: Optional[Generator[Any, Any, Any]] = None
        self.first: _Resume = (None, None)


class FeedBatcher:
    """The daemon's feeds to one ASR worker, batched across sessions (see the module docstring)."""

    def __init__(self, worker: Worker, pool: ASRPool, counters: Optional[Dict[str, int]] = None):
        self.worker = worker
        self.pool = pool
        self._pending: List[_Item] = []
        self._running = False
        pool.feeds_waiting = lambda: len(self._pending)  # an engine may skip partials while feeds wait
        # The pool's decode thread (used when pool.offloads a request), watched with the worker.
        self.decoder = Worker(f"{worker.name}-decode", pool.submit_decode, worker.period, worker.clock)
        worker.helpers.append(self.decoder)
        self._queued: List[Tuple[_Item, Any]] = []  # requests for the decode thread
        self._fed_at: Dict[int, float] = {}  # id(engine) -> when it was last fed (see _streaming)
        self._queue_lock = threading.Lock()
        self._gathering: Optional[asyncio.TimerHandle] = None  # a held worker call (pool.gather_wait)
        # describe's counters: worker calls made, session feeds they carried, most in one call
        self.counters = counters if counters is not None else {}
        for k in ("asr_feed_batches", "asr_batched_feeds", "asr_largest_batch", "asr_offloaded_decodes"):
            self.counters.setdefault(k, 0)

    async def feed(self, engine: ASRSession, pcm: Any) -> List[ASREvent]:
        """engine.feed_steps(pcm)'s events, computed in a batch with the other sessions' feeds."""
        self._fed_at[id(engine)] = time.monotonic()
        return await self._steps(lambda: engine.feed_steps(pcm))

    async def finalize(self, engine: ASRSession) -> List[ASREvent]:
        """engine.finalize_events(), as steps (`finalize_steps`) in a batch like a feed: the
        utterance it flushes is decoded where a feed's would be (on the decode thread when the
        pool offloads), so a finalize does not hold the worker, and the other sessions' chunks,
        for a whole decode."""
        return await self._steps(engine.finalize_steps)

    async def _steps(self, make: Callable[[], Generator[Any, Any, Any]]) -> List[ASREvent]:
        loop = asyncio.get_running_loop()
        fut: "asyncio.Future[List[ASREvent]]" = loop.create_future()
        self._pending.append(_Item(make, fut))
        self._start(loop)
        return await fut

    def _start(self, loop: asyncio.AbstractEventLoop, gathered: bool = False) -> None:
        if self._running or not self._pending:
            return
        wait = 0.0 if gathered else self.pool.gather_wait(len(self._pending))
        if wait > 0:  # more sessions' feeds are due: one worker call for all (their chunks together)
            if self._gathering is None:
                self._gathering = loop.call_later(wait, self._gathered, loop)
            return
        if self._gathering is not None:
            self._gathering.cancel()
            self._gathering = None
        batch = [item for item in self._pending if not item.fut.done()]  # a cancelled session: skip
        self._pending = []
        if not batch:
            return
        self._running = True
        c = self.counters
        c["asr_feed_batches"] += 1
        c["asr_batched_feeds"] += len(batch)
        c["asr_largest_batch"] = max(c["asr_largest_batch"], len(batch))

        def settle(i: int, value: Any, error: Optional[BaseException]) -> None:  # on the worker
            loop.call_soon_threadsafe(_settle, batch[i].fut, value, error)

        try:
            cf = self.worker.submit("feed", self._run, loop, batch, settle)
        except Exception as e:  # noqa: BLE001 - the worker is gone: every waiter hears it
            self._running = False
            for item in batch:
                _settle(item.fut, None, e)
            return
        cf.add_done_callback(lambda f: loop.call_soon_threadsafe(self._finished, loop, batch, f))

    def _gathered(self, loop: asyncio.AbstractEventLoop) -> None:
        self._gathering = None
        self._start(loop, gathered=True)

    def _run(self, loop: asyncio.AbstractEventLoop, batch: List[_Item], settle: Done) -> None:
        extend_budget(BATCH_FEED_PERIODS * self.worker.period * (len(batch) - 1))

        def park(round_: List[Tuple[int, Any]]) -> Set[int]:
            mine = [(i, req) for i, req in round_ if self.pool.offloads(req)]
            if mine:
                self._offload(loop, [batch[i] for i, _ in mine], [req for _, req in mine])
            return {i for i, _ in mine}

        steps = []
        for item in batch:
            if item.steps is None:
                item.steps = item.make()
            steps.append(item.steps)
        drive(self.pool.run_requests, steps, settle, [item.first for item in batch], park, _chunk)

    def _offload(self, loop: asyncio.AbstractEventLoop, items: List[_Item], reqs: List[Any]) -> None:
        """On the worker: answer these sessions' requests on the decode thread; each session's
        steps go on when it is answered (`_go_on`). Requests queue for the decode thread, and
        each of its calls takes every one queued by then: decodes that came due while another
        ran (two streams ending together) are answered together, in one padded forward where
        their lengths allow (a full-size pair cost 0.45 s of the decode thread's CPU where each
        alone cost 0.30-0.37)."""
        self.counters["asr_offloaded_decodes"] += len(reqs)
        with self._queue_lock:
            self._queued.extend((item, req) for item, req in zip(items, reqs, strict=True))
        try:
            self.decoder.submit("decode", self._decode, loop)
        except Exception as e:  # noqa: BLE001 - the decode worker is gone: the sessions hear it
            with self._queue_lock:
                taken, self._queued = self._queued, []
            for item, _ in taken:
                loop.call_soon_threadsafe(self._resume, loop, item, e)

    def _streaming(self) -> int:
        """Sessions fed within the last STREAMING_SECONDS (read on the decode thread: a snapshot)."""
        since = time.monotonic() - STREAMING_SECONDS
        recent = [k for k, t in list(self._fed_at.items()) if t >= since]
        if len(self._fed_at) > 4 * len(recent) + 64:  # forget sessions long gone
            self._fed_at = {k: self._fed_at[k] for k in recent if k in self._fed_at}
        return len(recent)

    def _decode(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the decode thread: every queued request answered (none: an earlier call took them);
        each session's feed resumes on the loop as its own answer comes. While other sessions are
        streaming (fed lately), it first waits DECODE_GATHER_SECONDS for their decodes
        that are about to come due: two streams ending together otherwise decoded one after the
        other, the second final a whole decode late."""
        if self._streaming() > 1:
            time.sleep(DECODE_GATHER_SECONDS)
        with self._queue_lock:
            taken, self._queued = self._queued, []
        if not taken:
            return
        extend_budget(BATCH_FEED_PERIODS * self.worker.period * (len(taken) - 1))
        answered: Set[int] = set()
        try:
            for pos, answer in self.pool.run_requests([req for _, req in taken]):
                answered.add(pos)
                self._go_on(loop, taken[pos][0], answer)
        except Exception as e:  # noqa: BLE001 - the batch machinery failed: every waiter hears it
            logger.exception("asr: %d offloaded decodes failed", len(taken))
            for pos, (item, _) in enumerate(taken):
                if pos not in answered:
                    loop.call_soon_threadsafe(self._resume, loop, item, e)

    def _go_on(self, loop: asyncio.AbstractEventLoop, item: _Item, answer: Any) -> None:
        """On the decode thread: the session's steps go on with their answer up to their next
        model request, which goes back to the worker (`asking`); steps that end here settle the
        session's waiter from here. Nobody else drives them meanwhile: the session was parked."""
        assert item.steps is not None
        if item.fut.done():  # the session was cancelled meanwhile: its steps stay where they are
            return
        try:
            req = item.steps.throw(answer) if isinstance(answer, BaseException) else item.steps.send(answer)
        except StopIteration as stop:
            loop.call_soon_threadsafe(_settle, item.fut, stop.value, None)
            return
        except Exception as e:  # noqa: BLE001 - the session's own failure, reported to it
            loop.call_soon_threadsafe(_settle, item.fut, None, e)
            return
        item.steps, item.first = asking(req, item.steps), (None, None)
        loop.call_soon_threadsafe(self._resume_asking, loop, item)

    def _resume_asking(self, loop: asyncio.AbstractEventLoop, item: _Item) -> None:
        """On the loop: steps that went on on the decode thread ask the model again: the worker's next batch."""
        if item.fut.done():  # the session was cancelled meanwhile
            return
        self._pending.append(item)
        self._start(loop)

    def _resume(self, loop: asyncio.AbstractEventLoop, item: _Item, answer: Any) -> None:
        """On the loop: a parked session's request is answered; its feed goes on in the next batch."""
        if item.fut.done():  # the session was cancelled meanwhile
            return
        item.first = (None, answer) if isinstance(answer, BaseException) else (answer, None)
        self._pending.append(item)
        self._start(loop)

    def _finished(self, loop: asyncio.AbstractEventLoop, batch: List[_Item], cf: Any) -> None:
        self._running = False
        error = WorkerGone(self.worker.name) if cf.cancelled() else cf.exception()
        if error is not None:
            for item in batch:
                _settle(item.fut, None, error)
        self._start(loop)


def _chunk(req: Any) -> bool:
    """Streaming chunks are answered after the other requests of a worker call, all together."""
    return isinstance(req, StreamChunk)


def _settle(fut: "asyncio.Future[List[ASREvent]]", value: Any, error: Optional[BaseException]) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)
