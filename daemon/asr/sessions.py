"""ASR sessions: the `open`/`audio`/`finalize`/`reset`/`close` handler and one task per session.

Each session has its own command queue and task, so its audio is processed in order while
sessions interleave on the ASR worker. Audio messages queued behind each other go to the
engine as one chunk (up to limits.max_chunk_seconds); reset/finalize/close keep their place.
Admission (session cap, lag, backlog, queued commands) is `asr_capacity.Capacity`.

Every failure answers: an `open` the engine cannot serve gets an `error` carrying its
request_id, whatever the exception; a session that fails gets `error` + `closed`. The slot is
released before anything is sent, so a failing send can never leak it. Finals, acks and
`closed` go through `Transport.send_wait` (retried while the client is at its high-water mark);
only partials, which the next partial or final supersedes, may be dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from daemon.wire import protocol as P
from daemon.asr.batch import FeedBatcher
from daemon.asr.capacity import Backlog, Capacity, FairShare
from daemon.config import Config
from daemon.engines import ASREvent, ASRPool, ASRSession, EngineInfo
from daemon.errors import AudioError, ErrorCode, S2SError
from daemon.rules import MAX_ID_CHARS, check_language, clean_hotwords
from daemon.serving.transport import Transport, short
from daemon.serving.workers import Worker

logger = logging.getLogger(__name__)

Command = Tuple[str, Any]  # ("audio", P.Audio) | ("finalize", P.Finalize) | ("reset", P.Reset) | ("close", ...)


class _Stalled(Exception):
    """The client did not read a final (or ack) for SEND_WAIT_SECONDS."""


@dataclass
class Session:
    session_id: str
    owner: bytes
    sample_rate: int
    language: Optional[str]
    hotwords: Optional[Tuple[str, ...]]
    partials: bool
    request_id: str
    backlog: Backlog
    queue: "asyncio.Queue[Command]" = field(default_factory=asyncio.Queue)
    engine: Optional[ASRSession] = None
    task: Optional["asyncio.Task[None]"] = None
    resampler: Any = None
    busy: bool = False  # a command is on the worker right now
    closing: bool = False
    opened_at: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    stash: Optional[Command] = None  # a command taken off the queue while merging audio
    tentative: bool = False  # the client asked for tentative/resume events

    def has_work(self) -> bool:
        return self.busy or self.stash is not None or not self.queue.empty()

    @property
    def queued(self) -> int:
        return self.queue.qsize() + (self.stash is not None)

    def put(self, cmd: Command) -> None:
        self.queue.put_nowait(cmd)

    def forget(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
        self.backlog.forget()
        self.stash = None


class ASRSessions:
    def __init__(self, pool: ASRPool, worker: Worker, transport: Transport, cfg: Callable[[], Config],
                 counters: Dict[str, int], info: Callable[[], EngineInfo], clock: Callable[[], float] = time.monotonic):
        self.pool = pool
        self.worker = worker
        self.transport = transport
        self.cfg = cfg
        self.counters = counters
        self.info = info
        self.clock = clock
        # Each thread's own load: the worker's, and the decode thread's (a helper, daemon/asr/batch.py);
        # the curves were measured at load (full-size FunASR).
        self.capacity = Capacity(lambda: cfg().limits, clock, lambda: worker.own_busy_s, lambda: pool.cost_curve,
                                 lambda: sum(h.own_busy_s for h in worker.helpers), lambda: pool.decode_cost_curve)
        self.fair = FairShare(clock)
        self.batcher = FeedBatcher(worker, pool, counters)
        self.sessions: Dict[str, Session] = {}
        self.stopping = False
        for k in ("idle_closed", "asr_audio_messages", "asr_feeds", "peer_gone", "busy_open_share"):
            counters.setdefault(k, 0)

    # --- requests (on the event loop; never blocking) ----------------------------------------

    def _owned(self, ident: bytes, session_id: str, active: bool = True) -> Session:
        """The client's open session; `active`: the message counts as activity (idle timer)."""
        s = self.sessions.get(session_id)
        if s is None or s.closing:
            raise S2SError(f"session {session_id!r} is not open", ErrorCode.NO_SESSION)
        if s.owner != ident:
            raise S2SError(f"session {session_id!r} belongs to another client", ErrorCode.NOT_OWNER)
        if active:
            s.last_active = self.clock()
        return s

    def handle(self, ident: bytes, msg: P.Message) -> None:
        if isinstance(msg, P.Audio):
            # Empty audio is no activity: it must not keep a session from idling out.
            s = self._owned(ident, msg.session_id, active=len(msg.pcm) >= 2)
            self.capacity.admit_audio(s.backlog, len(msg.pcm), s.queued)
            self.counters["asr_audio_messages"] += 1
            s.put(("audio", msg))
        elif isinstance(msg, P.Open):
            self._open(ident, msg)
        elif isinstance(msg, P.Close):
            self.close(self._owned(ident, msg.session_id), "closed", request_id=msg.request_id)
        elif isinstance(msg, (P.Finalize, P.Reset)):
            s = self._owned(ident, msg.session_id)
            self.capacity.admit_command(s.backlog, s.queued)
            if isinstance(msg, P.Finalize):
                s.closing = True  # further audio for it is refused; the queue is drained first
                s.put(("finalize", msg))
            else:
                s.put(("reset", msg))
        else:
            raise P.ProtocolError(f"unexpected {msg.TYPE.value}", ErrorCode.UNKNOWN_TYPE)

    def _open(self, ident: bytes, msg: P.Open) -> None:
        if self.stopping:
            # retry_after: elsewhere now (another daemon), here once it is back (a rolling restart)
            raise S2SError("daemon is shutting down", ErrorCode.SHUTTING_DOWN,
                          retry_after=self.cfg().daemon.drain_timeout)
        if not msg.session_id or len(msg.session_id) > MAX_ID_CHARS:
            raise S2SError(f"session_id must be 1-{MAX_ID_CHARS} characters", ErrorCode.BAD_REQUEST)
        if msg.session_id in self.sessions:
            raise S2SError(f"session {msg.session_id!r} is already open", ErrorCode.SESSION_EXISTS)
        if msg.language is not None:
            check_language(msg.language)
        if not 8000 <= msg.sample_rate <= 48000:
            raise AudioError(f"sample_rate {msg.sample_rate} outside 8000-48000")
        # Here, not on the worker: the rule bounds its own cost before it looks at a word.
        hotwords = None if msg.hotwords is None else tuple(clean_hotwords(msg.hotwords))
        self._admit(ident, msg.session_id)
        s = Session(msg.session_id, ident, msg.sample_rate, msg.language, hotwords, msg.partials, msg.request_id,
                    Backlog(msg.session_id, msg.sample_rate, opened=self.clock()))
        if msg.sample_rate != P.ASR_SAMPLE_RATE:
            import soxr

            s.resampler = soxr.ResampleStream(msg.sample_rate, P.ASR_SAMPLE_RATE, 1, dtype="float32")
        s.tentative = msg.tentative
        self.sessions[s.session_id] = s
        s.task = asyncio.get_running_loop().create_task(self._run(s), name=f"asr-{s.session_id}")
        logger.info("session %s: open from %s (lang=%s, rate=%d, partials=%s)", s.session_id, short(ident),
                    msg.language, msg.sample_rate, msg.partials)

    def _admit(self, ident: bytes, session_id: str) -> None:
        """The fair share between peers, then the capacity rules; a peer refused `busy` is
        remembered as waiting (daemon/asr/capacity.py)."""
        held: Dict[bytes, int] = {}
        for s in self.sessions.values():
            held[s.owner] = held.get(s.owner, 0) + 1
        try:
            try:
                self.fair.check(ident, held, self.cfg().limits.max_sessions, session_id)
            except S2SError:
                self.counters["busy_open_share"] += 1
                raise
            self.capacity.admit_open(len(self.sessions), (s.backlog for s in self.sessions.values()), session_id)
        except S2SError as e:
            if e.code == ErrorCode.BUSY:
                self.fair.refused_open(ident, e.extra.get("retry_after"))
            raise
        self.fair.admitted(ident)

    def close(self, s: Session, reason: str, request_id: str = "", notify: bool = True) -> None:
        """Drop queued audio and end the session after the command on the worker (if any)."""
        s.closing = True
        s.forget()
        if s.task is None or s.task.done():
            return
        s.put(("close", (reason, request_id, notify)))
        if s.engine is None and not s.busy:
            s.task.cancel()  # it may not have started: its finally would never release the slot
            self._release(s)
            if notify:
                self.transport.send("asr", s.owner, P.Closed(session_id=s.session_id, request_id=request_id,
                                                             reason=reason))

    def peer_gone(self, ident: bytes) -> int:
        self.fair.forget(ident)
        owned = [s for s in self.sessions.values() if s.owner == ident and not s.closing]
        for s in owned:
            self.close(s, "peer_gone", notify=False)
        return len(owned)

    def gc_idle(self) -> None:
        timeout = self.cfg().limits.idle_timeout
        now = self.clock()
        for s in list(self.sessions.values()):
            if not s.closing and not s.has_work() and now - s.last_active > timeout:
                logger.info("session %s: idle for %.0f s, closing", s.session_id, now - s.last_active)
                self.counters["idle_closed"] += 1
                self.close(s, "idle")

    def in_flight(self) -> int:
        return sum(1 for s in self.sessions.values() if s.has_work())

    def shutdown(self) -> None:
        for s in list(self.sessions.values()):
            self.transport.send("asr", s.owner, P.Closed(session_id=s.session_id, reason="shutdown"))
            s.closing = True
            if s.task:
                s.task.cancel()

    def describe_rows(self, now: float) -> List[Dict[str, Any]]:
        return [{"session_id": s.session_id, "language": s.language, "sample_rate": s.sample_rate,
                 "age": round(now - s.opened_at, 2), "idle": round(now - s.last_active, 2),
                 "backlog_seconds": round(s.backlog.seconds, 2), "lag": round(s.backlog.lag(now), 3),
                 "shedding": s.backlog.shedding,
                 "shed_seconds": round(s.backlog.shed_samples / s.sample_rate, 2),
                 "queued": s.queue.qsize(), "busy": s.busy} for s in self.sessions.values()]

    # --- the session task --------------------------------------------------------------------

    def _engine_open(self, s: Session) -> ASRSession:
        """On the worker: the session's engine, with this moment's reloadable settings. The one
        place a session's hotwords are decided (protocol.Open): its own (() = none), else the live
        asr.hotwords where the engine can use them; the engine is always given the list."""
        cfg = self.cfg()
        if s.hotwords is not None:
            words = list(s.hotwords)
        else:
            words = list(cfg.asr.hotwords) if self.info().capabilities.hotwords else []
        return self._speculate(s, self.pool.open(
            s.session_id, language=s.language or cfg.asr.language, hotwords=words, partials=s.partials,
            partial_interval=cfg.asr.partial_interval, max_utterance_seconds=cfg.limits.max_utterance_seconds))

    def _speculate(self, s: Session, engine: ASRSession) -> ASRSession:
        """Tentative decodes after turn.early_silence, for a session that asked for them."""
        turn = self.cfg().turn
        early = turn.early_silence if s.tentative else 0.0
        engine.set_early_silence(early)
        engine.set_sentence_end(bool(early and turn.sentence_end), turn.judge_text_end)
        return engine

    async def _must_send(self, s: Session, msg: P.Message) -> None:
        if not await self.transport.send_wait("asr", s.owner, msg):
            raise _Stalled()

    async def _send_events(self, s: Session, events: List[ASREvent], request_id: str = "") -> None:
        for ev in events:
            m = event_to_message(s.session_id, ev, request_id)
            if isinstance(m, P.Partial):
                if s.partials:  # superseded by the next partial or the final: may be dropped
                    self.transport.send("asr", s.owner, m)
            elif isinstance(m, (P.Tentative, P.Resume)):
                if s.tentative:  # the final decides anyway: may be dropped like a partial
                    self.transport.send("asr", s.owner, m)
            else:
                await self._must_send(s, m)

    def _pcm_for_engine(self, s: Session, pcm: bytes, last: bool = False) -> Any:
        if s.resampler is None:
            return pcm
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        return s.resampler.resample_chunk(x, last=last)

    def _next_audio(self, s: Session, first: P.Audio) -> List[P.Audio]:
        """`first` plus the audio messages queued right behind it, up to limits.max_chunk_seconds
        in all: one engine call instead of one per message. A non-audio command met on the way
        is kept for next time, so reset/finalize/close stay in order."""
        batch = [first]
        room = int(self.cfg().limits.max_chunk_seconds * s.sample_rate) * 2 - len(first.pcm)
        while s.stash is None and not s.queue.empty():
            item = s.queue.get_nowait()
            if item[0] != "audio" or len(item[1].pcm) > room:
                s.stash = item
                break
            batch.append(item[1])
            room -= len(item[1].pcm)
        return batch

    async def _audio(self, s: Session, engine: ASRSession, first: P.Audio) -> None:
        batch = self._next_audio(s, first)
        pcm = first.pcm if len(batch) == 1 else b"".join(m.pcm for m in batch)
        self.counters["asr_feeds"] += 1
        try:
            events = await self.batcher.feed(engine, self._pcm_for_engine(s, pcm))
        except AudioError as e:
            for m in batch:
                if m.ack or m is batch[-1]:
                    await self._must_send(s, P.Error.from_exception(e, m.request_id, s.session_id, m.seq))
            return
        finally:
            s.backlog.done(len(batch))
        await self._send_events(s, events)
        for m in batch:
            if m.ack:
                await self._must_send(s, P.Ack(session_id=s.session_id, request_id=m.request_id, of="audio", seq=m.seq))

    async def _run(self, s: Session) -> None:
        closed: Optional[P.Closed] = None  # what to say after releasing the slot
        try:
            closed = await self._serve(s)
        except asyncio.CancelledError:
            raise
        except _Stalled:
            if not s.closing:  # closing: the peer is gone (or closed it); nobody to tell
                logger.warning("session %s: client %s did not read its results for a while; closing",
                               s.session_id, short(s.owner))
                closed = P.Closed(session_id=s.session_id, reason="error")
        except Exception as e:
            if isinstance(e, S2SError):
                logger.warning("session %s: %s (%s)", s.session_id, e, e.code.value)
            else:
                logger.exception("session %s: engine failure", s.session_id)
                e = S2SError("recognition failed (see daemon log)", ErrorCode.ENGINE_ERROR)
            self.transport.send("asr", s.owner, P.Error.from_exception(e, "", s.session_id))
            closed = P.Closed(session_id=s.session_id, reason="error")
        finally:
            self._release(s)  # first: nothing below may keep the slot
        if closed is not None:
            await self.transport.send_wait("asr", s.owner, closed, timeout=2.0)

    async def _serve(self, s: Session) -> Optional[P.Closed]:
        """Open the engine, then run the session's commands; the `closed` to send, if any."""
        s.busy = True
        try:
            engine = s.engine = await self.worker.call("open", self._engine_open, s)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not isinstance(e, S2SError):
                logger.exception("session %s: engine failed to open", s.session_id)
                e = S2SError("recognition engine failed to open the session (see daemon log)", ErrorCode.ENGINE_ERROR)
            self._release(s)
            self.transport.send("asr", s.owner, P.Error.from_exception(e, s.request_id, s.session_id))
            return None
        finally:
            s.busy = False
        caps = self.info().capabilities.to_dict()
        caps["partials"] = caps["partials"] and s.partials
        caps.update(sample_rate=s.sample_rate, max_chunk_seconds=self.cfg().limits.max_chunk_seconds)
        await self._must_send(s, P.Opened(session_id=s.session_id, request_id=s.request_id, capabilities=caps))
        while True:
            if s.stash is not None:
                (kind, msg), s.stash = s.stash, None
            else:
                kind, msg = await s.queue.get()
            s.busy = True
            try:
                if kind == "audio":
                    await self._audio(s, engine, msg)
                elif kind == "finalize":
                    if s.resampler is not None:
                        tail = self._pcm_for_engine(s, b"", last=True)
                        if len(tail):
                            await self._send_events(s, await self.batcher.feed(engine, tail))
                    events = await self.batcher.finalize(engine)
                    await self._send_events(s, events, msg.request_id)
                    return P.Closed(session_id=s.session_id, request_id=msg.request_id, reason="finalized")
                elif kind == "reset":
                    await self.worker.call("reset", engine.reset)
                    await self._must_send(s, P.Ack(session_id=s.session_id, request_id=msg.request_id, of="reset"))
                elif kind == "close":
                    reason, request_id, notify = msg
                    return P.Closed(session_id=s.session_id, request_id=request_id, reason=reason) if notify else None
            finally:
                s.busy = False

    def _release(self, s: Session) -> None:
        if self.sessions.get(s.session_id) is not s:
            return
        del self.sessions[s.session_id]
        s.closing = True
        s.forget()
        s.engine = None  # the session's streaming state goes with it: the pool keeps none
        logger.info("session %s: released (%.1f s)", s.session_id, self.clock() - s.opened_at)


def event_to_message(session_id: str, ev: ASREvent, request_id: str = "") -> P.Message:
    """An engine event (daemon/engines.py) as its wire message: the one place they are converted.
    `request_id`: the finalize's, on the finals it caused."""
    if ev["type"] == "speech_start":
        return P.SpeechStart(session_id=session_id, start=ev["start"], utterance=ev["utterance"])
    if ev["type"] == "partial":
        return P.Partial(session_id=session_id, text=ev["text"], start=ev["start"], end=ev["end"],
                         utterance=ev["utterance"])
    if ev["type"] == "tentative":
        return P.Tentative(session_id=session_id, text=ev["text"], start=ev["start"], end=ev["end"],
                           utterance=ev["utterance"])
    if ev["type"] == "resume":
        return P.Resume(session_id=session_id, start=ev["start"], utterance=ev["utterance"])
    if ev["type"] == "final":
        return P.Final(session_id=session_id, text=ev["text"], start=ev["start"], end=ev["end"],
                       utterance=ev["utterance"], reason=ev["reason"], request_id=request_id)
    raise ValueError(f"unknown engine event {ev!r}")  # an engine outside the contract
