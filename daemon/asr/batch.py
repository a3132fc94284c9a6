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
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Dict, List, Optional, Tuple

from daemon.asr.steps import Done, drive
from daemon.engines import ASREvent, ASRPool, ASRSession
from daemon.serving.workers import BATCH_FEED_PERIODS, Worker, WorkerGone, extend_budget

logger = logging.getLogger(__name__)

_Item = Tuple[ASRSession, Any, "asyncio.Future[List[ASREvent]]"]  # a session's feed: engine, audio, its waiter

class FeedBatcher:
    """The daemon's feeds to one ASR worker, batched across sessions (see the module docstring)."""

    def __init__(self, worker: Worker, pool: ASRPool, counters: Optional[Dict[str, int]] = None):
        self.worker = worker
        self.pool = pool
        self._pending: List[_Item] = []
        self._running = False
        pool.feeds_waiting = lambda: len(self._pending)  # an engine may skip partials while feeds wait
        # describe's counters: worker calls made, session feeds they carried, most in one call
        self.counters = counters if counters is not None else {}
        for k in ("asr_feed_batches", "asr_batched_feeds", "asr_largest_batch"):
            self.counters.setdefault(k, 0)

    async def feed(self, engine: ASRSession, pcm: Any) -> List[ASREvent]:
        """engine.feed_steps(pcm)'s events, computed in a batch with the other sessions' feeds."""
        loop = asyncio.get_running_loop()
        fut: "asyncio.Future[List[ASREvent]]" = loop.create_future()
        self._pending.append((engine, pcm, fut))
        self._start(loop)
        return await fut

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._running or not self._pending:
            return
        batch = [item for item in self._pending if not item[2].done()]  # a cancelled session: skip
        self._pending = []
        if not batch:
            return
        self._running = True
        c = self.counters
        c["asr_feed_batches"] += 1
        c["asr_batched_feeds"] += len(batch)
        c["asr_largest_batch"] = max(c["asr_largest_batch"], len(batch))

        def settle(i: int, value: Any, error: Optional[BaseException]) -> None:  # on the worker
            loop.call_soon_threadsafe(_settle, batch[i][2], value, error)

        try:
            cf = self.worker.submit("feed", self._run, batch, settle)
        except Exception as e:  # noqa: BLE001 - the worker is gone: every waiter hears it
            self._running = False
            for _, _, fut in batch:
                _settle(fut, None, e)
            return
        cf.add_done_callback(lambda f: loop.call_soon_threadsafe(self._finished, loop, batch, f))

    def _run(self, batch: List[_Item], settle: Done) -> None:
        extend_budget(BATCH_FEED_PERIODS * self.worker.period * (len(batch) - 1))
        drive(self.pool.run_requests, [engine.feed_steps(pcm) for engine, pcm, _ in batch], settle)

    def _finished(self, loop: asyncio.AbstractEventLoop, batch: List[_Item], cf: Any) -> None:
        self._running = False
        error = WorkerGone(self.worker.name) if cf.cancelled() else cf.exception()
        if error is not None:
            for _, _, fut in batch:
                _settle(fut, None, error)
        self._start(loop)


def _settle(fut: "asyncio.Future[List[ASREvent]]", value: Any, error: Optional[BaseException]) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)
