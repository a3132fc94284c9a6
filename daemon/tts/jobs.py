"""TTS jobs: the `synthesize`/`cancel` handler and one task per request.

- **One worker step per sentence**, streamed or not: a non-streamed request runs the same
  sentence steps and sends their concatenation as sentence 0 at the end, so no single call
  holds the TTS worker for a whole 2,000-character text (cancel, other requests and the
  health check get in between; see daemon/serving/workers.py).
- **A job counts until its task ends** (`limits.max_tts_queue`): `cancel` answers at once and
  frees the request id, but the job is counted until its work has left the worker. A step
  still waiting in the worker's queue is withdrawn; one that is running finishes first.
- **Fair across clients:** a job's worker steps wait in a `FairQueue`, one step on the worker at
  a time, granted to the waiting (peer, owner) served least recently (the bridge is one peer
  for many users and names each in `owner`): seven owners flooding long replies cannot delay
  an eighth owner's sentence by more than the step running. One owner holds at most
  `limits.max_tts_queue_per_owner` requests; more get `busy`, for that owner only.
- **Streamed text** (`synthesize` with stream_text, then `text_chunk`s): the one place text
  becomes sentences for a streamed request. Chunks are cut as they arrive
  (`textsplit.SentenceBuffer`, the first sentence's first clause on its own so the first audio
  leaves sooner), and each complete sentence goes to the engine at once through one generator
  per request (`_chain`): one worker step per engine call, however many sentences. What the
  client chooses is bounded when a chunk arrives, before it costs anything: text in all
  (`limits.max_text_chars`), chunks (`limits.max_text_chunks`), chunks a second
  (`limits.max_text_chunks_per_second`) and time without one (`limits.text_idle_timeout`); a
  refused chunk ends its request with an `error` (the audio already sent stays). `hold` keeps
  all but the first sentence until a chunk with `release` (a speculative reply).
- **A whole text's first clause** (stream=True) is synthesised on its own too, the rest after
  it as before (`textsplit.first_clause`).
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

from daemon.wire import protocol as P
from daemon.tts import textsplit
from daemon.config import Config, LimitsConfig
from daemon.engines import TTSEngine
from daemon.errors import ErrorCode, S2SError, TextError
from daemon.rules import MAX_ID_CHARS, check_language, check_speed
from daemon.serving.transport import Transport
from daemon.tts.stream import TextFeed, _chain
from daemon.serving.workers import Worker

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
    feed: Optional[TextFeed] = None  # a streamed-text request's text
    failure: Optional[S2SError] = None  # why the daemon ended it (sent by its task)

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
        if isinstance(msg, P.TextChunk):
            self._chunk(ident, msg)
            return
        if not isinstance(msg, P.Synthesize):
            raise P.ProtocolError(f"unexpected {msg.TYPE.value}", ErrorCode.UNKNOWN_TYPE)
        lim = self.cfg().limits
        if self.stopping:
            # retry_after: elsewhere now (another daemon), here once it is back (a rolling restart)
            raise S2SError("daemon is shutting down", ErrorCode.SHUTTING_DOWN,
                          retry_after=self.cfg().daemon.drain_timeout)
        if not msg.request_id or len(msg.request_id) > MAX_ID_CHARS:
            raise S2SError(f"synthesize needs a request_id of 1-{MAX_ID_CHARS} characters", ErrorCode.BAD_REQUEST)
        if (ident, msg.request_id) in self.active:
            raise S2SError(f"request {msg.request_id!r} is already running", ErrorCode.BAD_REQUEST)
        if not msg.stream_text and not msg.text.strip():
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
        if msg.stream_text:
            job.feed = TextFeed(first_clause=msg.stream, hold=msg.hold)
            job.feed.tokens = float(lim.max_text_chunks_per_second)
            job.feed.chars = len(msg.text)
            job.feed.parts.append(msg.text)
            job.feed.add(job.feed.buf.push(msg.text))
        self.active[job.key] = job
        self.running.add(job)
        self.per_owner[owner] = self.per_owner.get(owner, 0) + 1
        run = self._run_streamed(job) if job.feed is not None else self._run(job)
        job.task = asyncio.get_running_loop().create_task(run, name=f"tts-{msg.request_id}")

    def _chunk(self, ident: bytes, msg: P.TextChunk) -> None:
        """More text for a streamed request: bounded first (a refused chunk ends the request with
        an error), then cut into sentences, which its task synthesises in order."""
        job = self.active.get((ident, msg.request_id))
        if job is None:
            raise S2SError(f"no active request {msg.request_id!r}", ErrorCode.BAD_REQUEST)
        feed = job.feed
        if feed is None:
            raise S2SError(f"request {msg.request_id!r} is not streamed (synthesize without stream_text)",
                           ErrorCode.BAD_REQUEST)
        lim = self.cfg().limits
        why = self._refuse(feed, msg, lim)
        if why is not None:
            logger.warning("tts %s: streamed text refused: %s", msg.request_id, why.message)
            self.fail(job, why)
            return
        feed.chunks += 1
        feed.chars += len(msg.text)
        feed.parts.append(msg.text)
        feed.last = feed.clock()
        if msg.drop_partial:
            feed.buf.drop_partial()
        sentences = feed.buf.push(msg.text) if not feed.ended else []
        if msg.final:
            sentences += feed.buf.flush()
            feed.ended = True
        if msg.release:
            feed.hold = False
        feed.add(sentences)

    @staticmethod
    def _refuse(feed: TextFeed, msg: P.TextChunk, lim: LimitsConfig) -> Optional[S2SError]:
        """Why a chunk cannot be taken (None: it can): each bound is checked from the sizes alone."""
        if feed.ended and (msg.text or msg.final or msg.drop_partial or not msg.release):
            return S2SError("text_chunk after the final one (only a bare release may follow it)",
                            ErrorCode.BAD_REQUEST)
        now = feed.clock()
        rate = float(lim.max_text_chunks_per_second)
        feed.tokens = min(rate, feed.tokens + (now - feed.refilled) * rate)
        feed.refilled = now
        if feed.tokens < 1.0:
            return S2SError(f"text chunks faster than limits.max_text_chunks_per_second={rate:g}; request ended",
                            ErrorCode.BAD_REQUEST)
        feed.tokens -= 1.0
        if feed.chunks + 1 > lim.max_text_chunks:
            return S2SError(f"more than limits.max_text_chunks={lim.max_text_chunks} chunks; request ended",
                            ErrorCode.BAD_REQUEST)
        if feed.chars + len(msg.text) > lim.max_text_chars:
            return TextError(f"text of {feed.chars + len(msg.text)} characters exceeds limits.max_text_chars="
                             f"{lim.max_text_chars}; request ended", limit=lim.max_text_chars)
        return None

    def fail(self, job: TTSJob, why: S2SError) -> None:
        """End a job with an error, sent at once: before the answers to any chunk sent after it."""
        if job.failure is None and not job.cancelled:
            job.failure = why
            self.transport.send("tts", job.key[0], P.Error.from_exception(why, job.key[1]))
        self.cancel(job)

    def cancel(self, job: TTSJob) -> None:
        job.cancelled = True
        if self.active.get(job.key) is job:
            del self.active[job.key]
        self.fair.withdraw(job)  # waiting for its turn: out of the queue at once
        if job.step is not None:
            job.step.cancel()  # withdrawn if it has not started; a running step finishes
        if job.feed is not None:
            job.feed.wake.set()  # waiting for text: ends now

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
        """A whole text's request: the engine cuts it into sentences (a stream's first clause
        apart, `textsplit.first_clause`), one worker step per engine call."""

        async def body(lang: str, speed: float, rate: int, max_bytes: int) -> Tuple[int, int, int]:
            req = job.request
            seq = sentences = samples = 0
            whole: List[bytes] = []
            head, rest = textsplit.first_clause(req.text) if req.stream else ("", req.text)
            unspeakable: Optional[TextError] = None
            for text in (head, rest):
                if not text or job.cancelled:
                    continue
                base = sentences
                gen = await self._step(job, self.engine.synthesize_stream, text, lang, speed)
                try:
                    while gen is not None and not job.cancelled:
                        item = await self._step(job, next, gen, None)
                        if item is None or job.cancelled:
                            break
                        # a long sentence may come in several chunks
                        sentences = max(sentences, base + int(item[0]) + 1)
                        if not req.stream:
                            whole.append(item[2])
                            continue
                        seq, samples = await self._send_audio(job, (base + int(item[0]), item[1], item[2]), seq,
                                                              samples, max_bytes, rate)
                except TextError as e:
                    if not head:
                        raise
                    unspeakable = e  # the clause or the rest alone: the other may still speak
                finally:
                    self._close(gen)
            if unspeakable is not None and not sentences and not job.cancelled:
                raise unspeakable
            if not req.stream and not job.cancelled:
                seq, samples = await self._send_audio(job, (0, req.text, b"".join(whole)), seq, samples, max_bytes,
                                                      rate)
            return seq, sentences, samples

        await self._serve(job, body)

    async def _run_streamed(self, job: TTSJob) -> None:
        """A streamed-text request: its sentences through one `_chain`, each as soon as the text
        has it; waits for more text (at most limits.text_idle_timeout) when none is ready."""
        feed = job.feed
        assert feed is not None

        async def body(lang: str, speed: float, rate: int, max_bytes: int) -> Tuple[int, int, int]:
            req = job.request
            seq = samples = 0
            whole: List[bytes] = []
            gen = _chain(self.engine, feed, lang, speed)  # a generator: nothing runs until `next`
            try:
                while not job.cancelled:
                    if feed.ready or feed.busy:
                        item = await self._step(job, next, gen, None)
                        feed.busy = item is not None
                        if item is None or job.cancelled:
                            continue
                        if not req.stream:
                            whole.append(item[2])
                        else:
                            seq, samples = await self._send_audio(job, item, seq, samples, max_bytes, rate)
                        feed.last = max(feed.last, feed.clock())  # idle counts from the last audio too
                        continue
                    if feed.finished:
                        break
                    feed.wake.clear()
                    idle = float(self.cfg().limits.text_idle_timeout)
                    left = feed.last + idle - feed.clock()
                    if left <= 0:
                        self.fail(job, S2SError(f"no text for {idle:g} s (limits.text_idle_timeout); request ended",
                                                ErrorCode.TIMEOUT))
                        break
                    try:
                        await asyncio.wait_for(feed.wake.wait(), left)
                    except asyncio.TimeoutError:
                        pass
            finally:
                self._close(gen)
            if not job.cancelled and not feed.spoken:
                raise TextError("nothing speakable in the text: only punctuation, symbols or characters this "
                                "voice cannot pronounce" if feed.chars else "text is empty")
            if not req.stream and not job.cancelled:
                seq, samples = await self._send_audio(job, (0, "".join(feed.parts), b"".join(whole)), seq, samples,
                                                      max_bytes, rate)
            return seq, feed.spoken, samples

        await self._serve(job, body)

    def _close(self, gen: Any) -> None:
        """Close an engine generator on the worker (its cleanup may touch the model)."""
        if gen is not None and hasattr(gen, "close"):
            try:
                self.worker.submit("close", gen.close)
            except S2SError:
                pass

    async def _serve(self, job: TTSJob, body: Callable[[str, float, int, int], Any]) -> None:
        """Run a job's body, then `done`, or the `error` that ended it; always leaves the counts."""
        ident, rid = job.key
        req = job.request
        cfg = self.cfg()
        lang = req.language or cfg.tts.language.lower()
        speed = req.speed if req.speed is not None else cfg.tts.speed
        rate = self.engine.sample_rate
        max_bytes = int(rate * TTS_CHUNK_SECONDS) * 2
        try:
            seq, sentences, samples = await body(lang, speed, rate, max_bytes)
            if not job.cancelled:
                await self._send(job, P.Done(request_id=rid, chunks=seq, sentences=sentences, duration=samples / rate))
                logger.info("tts %s: %d sentences, %.2f s audio in %.2f s%s", rid, sentences, samples / rate,
                            time.monotonic() - job.started, " (streamed text)" if job.feed is not None else "")
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

