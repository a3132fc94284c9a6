"""TTS jobs: the `synthesize`/`cancel` handler and one task per request.

- **One worker step per sentence**, streamed or not: a non-streamed request runs the same
  sentence steps and sends their concatenation as sentence 0 at the end, so no single call
  holds the TTS worker for a whole 2,000-character text (cancel, other requests and the
  health check get in between; see daemon/workers.py).
- **A job counts until its task ends** (`limits.max_tts_queue`): `cancel` answers at once and
  frees the request id, but the job is counted until its work has left the worker. A step
  still waiting in the worker's queue is withdrawn; one that is running finishes first.
- **Fair across clients:** a job's worker steps wait in a `FairQueue`, one step on the worker at
  a time, granted to the waiting (peer, owner) served least recently (the bridge is one peer
  for many users and names each in `owner`): seven owners flooding long replies cannot delay
  an eighth owner's sentence by more than the step running. One owner holds at most
  `limits.max_tts_queue_per_owner` requests; more get `busy`, for that owner only.
- **Every request ends in `done`, `cancelled` or `error`.** Audio, `done` and `error` go
  through `Transport.send_wait`: a client at its high-water mark is waited for; one that
  reads nothing for SEND_WAIT_SECONDS gets the job ended with an `error` (`timeout`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

from daemon import protocol as P
from daemon.config import Config
from daemon.engines import TTSEngine
from daemon.errors import ErrorCode, S2SError
from daemon.rules import MAX_ID_CHARS, check_language, check_speed
from daemon.transport import Transport
from daemon.workers import Worker

logger = logging.getLogger(__name__)

# TTS output chunks are at most this long, so cancel and the first byte stay snappy.
TTS_CHUNK_SECONDS = 1.0

Key = Tuple[bytes, str]
Owner = Tuple[bytes, str]  # (peer identity, Synthesize.owner)
# Owners remembered for fairness (the least recently served are forgotten first).
MAX_OWNERS = 4096
# An owner's worker time counts for fairness with this time constant (seconds): a burst long ago
# no longer holds an owner back.
USAGE_DECAY_SECONDS = 30.0


class _Stalled(Exception):
    pass


@dataclass(eq=False)
class TTSJob:
    key: Key
    request: P.Synthesize
    task: Optional["asyncio.Task[None]"] = None
    cancelled: bool = False
    step: Optional["concurrent.futures.Future[Any]"] = None  # the worker call in flight
    started: float = field(default_factory=time.monotonic)
    seq: int = 0
    turn: Optional["asyncio.Future[bool]"] = None  # waiting in the FairQueue

    @property
    def owner(self) -> Owner:
        return (self.key[0], self.request.owner)


class FairQueue:
    """The TTS worker's steps, one at a time, to the waiting owner that has had the least worker
    time lately (seconds of steps, decaying with USAGE_DECAY_SECONDS): an owner new to the queue
    goes next, flooders take turns among themselves. An owner's own steps go in request order.
    `turn()` waits for the grant; `release()` after the step hands the worker on."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_owners: int = MAX_OWNERS):
        self.clock = clock
        self.max_owners = max_owners
        self.busy = False
        self.waiting: Dict[Owner, List[Tuple[int, "asyncio.Future[bool]"]]] = {}
        self.usage: Dict[Owner, Tuple[float, float]] = {}  # (worker seconds, as of), least recent first
        self._granted: Optional[Tuple[Owner, float]] = None

    def __len__(self) -> int:
        return sum(len(w) for w in self.waiting.values())

    def used(self, owner: Owner, now: float) -> float:
        value, at = self.usage.get(owner, (0.0, now))
        return value * math.exp(-(now - at) / USAGE_DECAY_SECONDS)

    async def turn(self, job: TTSJob) -> bool:
        """True once the worker is this job's; False when the job was withdrawn (`withdraw`)."""
        if not self.busy and not self.waiting:
            self._grant(job.owner)
            return True
        fut: "asyncio.Future[bool]" = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(job.owner, []).append((job.seq, fut))
        job.turn = fut
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result():
                self.release()  # granted as we were cancelled: hand it on
            else:
                self._forget(job.owner, fut)
            raise
        finally:
            job.turn = None

    def withdraw(self, job: TTSJob) -> None:
        fut = job.turn
        if fut is not None and not fut.done():
            self._forget(job.owner, fut)
            fut.set_result(False)

    def release(self) -> None:
        now = self.clock()
        if self._granted is not None:
            owner, since = self._granted
            used = self.used(owner, now) + (now - since)
            self.usage.pop(owner, None)
            self.usage[owner] = (used, now)  # re-inserted: most recent last
            while len(self.usage) > self.max_owners:
                del self.usage[next(iter(self.usage))]
            self._granted = None
        self.busy = False
        while self.waiting:
            owner = min(self.waiting, key=lambda o: (self.used(o, now), min(w[0] for w in self.waiting[o])))
            queue = self.waiting[owner]
            queue.sort(key=lambda w: w[0])
            _seq, fut = queue.pop(0)
            if not queue:
                del self.waiting[owner]
            if fut.done():  # pragma: no cover - withdrawn futures are forgotten at once
                continue
            self._grant(owner)
            fut.set_result(True)
            return

    def _grant(self, owner: Owner) -> None:
        self.busy = True
        self._granted = (owner, self.clock())

    def _forget(self, owner: Owner, fut: "asyncio.Future[bool]") -> None:
        queue = self.waiting.get(owner)
        if queue is None:
            return
        queue[:] = [w for w in queue if w[1] is not fut]
        if not queue:
            del self.waiting[owner]


class TTSJobs:
    def __init__(self, engine: TTSEngine, worker: Worker, transport: Transport, cfg: Callable[[], Config]):
        self.engine = engine
        self.worker = worker
        self.transport = transport
        self.cfg = cfg
        self.active: Dict[Key, TTSJob] = {}  # cancel finds jobs here (not cancelled yet)
        self.running: Set[TTSJob] = set()    # counted against limits.max_tts_queue until the task ends
        self.fair = FairQueue()
        self.per_owner: Dict[Owner, int] = {}  # running jobs per owner (limits.max_tts_queue_per_owner)
        self._seq = 0
        self.stopping = False

    def __len__(self) -> int:
        return len(self.running)

    def handle(self, ident: bytes, msg: P.Message) -> None:
        if isinstance(msg, P.Cancel):
            job = self.active.get((ident, msg.request_id))
            if job is None:
                raise S2SError(f"no active request {msg.request_id!r}", ErrorCode.BAD_REQUEST)
            self.cancel(job)
            self.transport.send("tts", ident, P.Cancelled(request_id=msg.request_id))
            return
        if not isinstance(msg, P.Synthesize):
            raise P.ProtocolError(f"unexpected {msg.TYPE.value}", ErrorCode.UNKNOWN_TYPE)
        lim = self.cfg().limits
        if self.stopping:
            raise S2SError("daemon is shutting down", ErrorCode.SHUTTING_DOWN)
        if not msg.request_id or len(msg.request_id) > MAX_ID_CHARS:
            raise S2SError(f"synthesize needs a request_id of 1-{MAX_ID_CHARS} characters", ErrorCode.BAD_REQUEST)
        if (ident, msg.request_id) in self.active:
            raise S2SError(f"request {msg.request_id!r} is already running", ErrorCode.BAD_REQUEST)
        if not msg.text.strip():
            raise S2SError("text is empty", ErrorCode.BAD_TEXT)
        if len(msg.text) > lim.max_text_chars:
            raise S2SError(f"text of {len(msg.text)} characters exceeds limits.max_text_chars={lim.max_text_chars}",
                           ErrorCode.BAD_TEXT)
        if msg.language is not None:
            check_language(msg.language)
        if msg.speed is not None:
            check_speed(msg.speed)
        if len(self.running) >= lim.max_tts_queue:
            raise S2SError(f"{len(self.running)} TTS requests queued (limits.max_tts_queue); retry later",
                           ErrorCode.BUSY, retry_after=1.0)
        owner = (ident, msg.owner)
        if self.per_owner.get(owner, 0) >= lim.max_tts_queue_per_owner:
            raise S2SError(f"{self.per_owner[owner]} TTS requests of this client queued "
                           f"(limits.max_tts_queue_per_owner); retry later", ErrorCode.BUSY, retry_after=1.0)
        self._seq += 1
        job = TTSJob((ident, msg.request_id), msg, seq=self._seq)
        self.active[job.key] = job
        self.running.add(job)
        self.per_owner[owner] = self.per_owner.get(owner, 0) + 1
        job.task = asyncio.get_running_loop().create_task(self._run(job), name=f"tts-{msg.request_id}")

    def cancel(self, job: TTSJob) -> None:
        job.cancelled = True
        if self.active.get(job.key) is job:
            del self.active[job.key]
        self.fair.withdraw(job)  # waiting for its turn: out of the queue at once
        if job.step is not None:
            job.step.cancel()  # withdrawn if it has not started; a running step finishes

    def peer_gone(self, ident: bytes) -> int:
        jobs = [j for j in self.active.values() if j.key[0] == ident]
        for j in jobs:
            self.cancel(j)
        return len(jobs)

    def shutdown(self) -> None:
        for job in list(self.active.values()):
            self.transport.send("tts", job.key[0], P.Error(code=ErrorCode.SHUTTING_DOWN.value,
                                                           message="daemon is shutting down", request_id=job.key[1]))
            self.cancel(job)
        for job in list(self.running):
            if job.task:
                job.task.cancel()

    async def _step(self, job: TTSJob, fn: Callable[..., Any], *args: Any) -> Any:
        if job.cancelled or not await self.fair.turn(job):
            return None
        try:
            if job.cancelled:
                return None
            fut = job.step = self.worker.submit("sentence", fn, *args)
            try:
                return await asyncio.wrap_future(fut)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if job.cancelled and fut.cancelled() and not (task and task.cancelling()):
                    return None  # our own cancel withdrew the step
                raise
            finally:
                job.step = None
        finally:
            self.fair.release()

    async def _send(self, job: TTSJob, msg: P.Message) -> None:
        if not await self.transport.send_wait("tts", job.key[0], msg):
            raise _Stalled()

    async def _run(self, job: TTSJob) -> None:
        ident, rid = job.key
        req = job.request
        cfg = self.cfg()
        lang = req.language or cfg.tts.language.lower()
        speed = req.speed if req.speed is not None else cfg.tts.speed
        rate = int(getattr(self.engine, "sample_rate", cfg.tts.sample_rate))
        max_bytes = int(rate * TTS_CHUNK_SECONDS) * 2
        seq = sentences = samples = 0
        gen: Optional[Iterator[Tuple[int, str, bytes]]] = None
        try:
            gen = await self._step(job, self.engine.synthesize_stream, req.text, lang, speed)
            whole: List[bytes] = []
            while gen is not None and not job.cancelled:
                item = await self._step(job, next, gen, None)
                if item is None or job.cancelled:
                    break
                sentences = max(sentences, int(item[0]) + 1)  # a long sentence may come in several chunks
                if not req.stream:
                    whole.append(item[2])
                    continue
                seq, samples = await self._send_audio(job, item, seq, samples, max_bytes, rate)
            if not req.stream and not job.cancelled:
                seq, samples = await self._send_audio(job, (0, req.text, b"".join(whole)), seq, samples, max_bytes,
                                                      rate)
            if not job.cancelled:
                await self._send(job, P.Done(request_id=rid, chunks=seq, sentences=sentences, duration=samples / rate))
                logger.info("tts %s: %d sentences, %.2f s audio in %.2f s", rid, sentences, samples / rate,
                            time.monotonic() - job.started)
        except asyncio.CancelledError:
            raise
        except _Stalled:
            logger.warning("tts %s: the client read nothing for a while; request ended", rid)
            self.transport.send("tts", ident, P.Error(code=ErrorCode.TIMEOUT.value, request_id=rid,
                                                      message="client did not read the audio in time; request ended"))
        except S2SError as e:
            await self.transport.send_wait("tts", ident, P.Error.from_exception(e, rid), timeout=2.0)
        except Exception:
            logger.exception("tts %s: synthesis failed", rid)
            await self.transport.send_wait("tts", ident, P.Error(
                code=ErrorCode.ENGINE_ERROR.value, message="synthesis failed (see daemon log)", request_id=rid),
                timeout=2.0)
        finally:
            if self.active.get(job.key) is job:
                del self.active[job.key]
            if job in self.running:
                self.running.discard(job)
                left = self.per_owner.get(job.owner, 1) - 1
                if left > 0:
                    self.per_owner[job.owner] = left
                else:
                    self.per_owner.pop(job.owner, None)
            if gen is not None and hasattr(gen, "close"):
                try:
                    self.worker.submit("close", gen.close)
                except S2SError:
                    pass

    async def _send_audio(self, job: TTSJob, item: Tuple[int, str, bytes], seq: int, samples: int, max_bytes: int,
                          rate: int) -> Tuple[int, int]:
        idx, text, pcm = item
        for off in range(0, max(len(pcm), 1), max_bytes):
            if job.cancelled:
                break
            piece = pcm[off:off + max_bytes]
            await self._send(job, P.SynthAudio(request_id=job.key[1], seq=seq, sentence=int(idx), text=text,
                                               sample_rate=rate, pcm=piece))
            seq += 1
            samples += len(piece) // 2
        return seq, samples

