"""The speech daemon's serving side: two ZeroMQ ROUTER sockets (ASR, TTS) on one asyncio loop.

Lifecycle (`run()`): load engines on a thread while the main thread sends systemd
EXTEND_TIMEOUT_USEC + STATUS lines -> bind the sockets -> READY=1 -> serve. WATCHDOG=1 pings
come from the serving loop, and only while a heartbeat task submitted to each engine worker
has completed recently. SIGTERM/SIGINT: STOPPING=1, refuse new work, let in-flight work finish
within daemon.drain_timeout, cancel the rest, exit 0; a second SIGINT exits at once. SIGHUP
re-reads the config and applies what needs no model reload (config.reloadable_diff).

The loop never runs inference: every engine call goes through `pool.submit` / `tts.submit`
(one worker thread per engine) and is awaited as a future. Each ASR session has its own
bounded command queue and task, so a session's audio is processed in order while sessions
interleave on the worker (audio messages queued behind each other go to the engine as one
chunk; sessions too far behind real time get `busy`, see `_check_lag` and `_open`); TTS streams sentence by sentence (one worker step per sentence), so
a long synthesis never holds the TTS worker, and never touches the ASR worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import errno
import logging
import os
import signal
import socket as pysocket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Tuple

import numpy as np
import zmq
import zmq.asyncio

import daemon
from daemon import protocol as P
from daemon.config import Config, ConfigError, load_config, reloadable_diff
from daemon.engines import Capabilities, EngineInfo, Fallback, merge_fallbacks
from daemon.rules import LANGUAGES, MAX_ID_CHARS
from daemon.errors import AudioError, ErrorCode, S2SError
from daemon.notify import Notifier

logger = logging.getLogger(__name__)

# Audio a session may have queued, in seconds; more gets `busy` (the sender is far ahead).
# The hard cap; lag behind real time (limits.max_session_lag) refuses audio much earlier.
SESSION_BACKLOG_SECONDS = 60.0
# How often the ASR worker's load figure is refreshed, seconds.
LOAD_WINDOW_SECONDS = 2.0
# TTS output chunks are at most this long, so cancel and the first byte stay snappy.
TTS_CHUNK_SECONDS = 1.0
MAX_MESSAGE_BYTES = 16 << 20
LINGER_MS = 500
EXTEND_SECONDS = 60.0


def _short(ident: bytes) -> str:
    return ident.hex()[:12] if not ident.isascii() else ident.decode("ascii", "replace")[:40]


@dataclass
class Session:
    session_id: str
    owner: bytes
    sample_rate: int
    language: Optional[str]
    hotwords: Optional[Tuple[str, ...]]
    partials: bool
    request_id: str
    queue: "asyncio.Queue[tuple]" = field(default_factory=asyncio.Queue)
    engine: Any = None
    task: Optional[asyncio.Task] = None
    resampler: Any = None
    backlog_samples: int = 0
    busy: bool = False  # a command is on the worker right now
    closing: bool = False
    opened_at: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    # Audio accepted but not yet through the engine: (due time, samples), oldest first. An
    # audio message is due when it arrives, or, when the sender is ahead of real time, when
    # the previous one would have finished playing: a fast (file) sender is not "behind".
    pending: Deque[Tuple[float, int]] = field(default_factory=deque)
    clock: float = 0.0  # when the last accepted audio ends in real time
    stash: Optional[tuple] = None  # a command taken off the queue while merging audio
    shedding: bool = False  # too far behind: audio is refused until it catches up
    shed_chunks: int = 0
    shed_samples: int = 0

    def lag(self, now: float) -> float:
        """Seconds the oldest unprocessed audio is behind real time (0 when caught up)."""
        return max(0.0, now - self.pending[0][0]) if self.pending else 0.0

    def has_work(self) -> bool:
        return self.busy or self.stash is not None or not self.queue.empty()

    def accept(self, samples: int, now: float) -> None:
        due = max(now, self.clock)
        self.clock = due + samples / self.sample_rate
        self.pending.append((due, samples))
        self.backlog_samples += samples

    def done(self, count: int) -> None:
        for _ in range(count):
            if not self.pending:
                break
            self.backlog_samples -= self.pending.popleft()[1]
        self.backlog_samples = max(0, self.backlog_samples)

    def forget(self) -> None:
        self.pending.clear()
        self.backlog_samples = 0
        self.stash = None


@dataclass
class TTSJob:
    key: Tuple[bytes, str]
    request: P.Synthesize
    task: Optional[asyncio.Task] = None
    cancelled: bool = False
    started: float = field(default_factory=time.monotonic)


class _Heartbeat:
    """Tracks a no-op task on one engine worker: the worker is healthy while these complete."""

    def __init__(self, name: str, engine: Any):
        self.name = name
        self.engine = engine
        self.future: Optional[concurrent.futures.Future] = None
        self.ok_at = time.monotonic()

    def _done(self, fut: concurrent.futures.Future) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.ok_at = time.monotonic()

    def kick(self) -> None:
        if self.future is None or self.future.done():
            try:
                self.future = self.engine.submit(_noop)
                self.future.add_done_callback(self._done)
            except RuntimeError:  # executor shut down
                self.future = None


def _noop() -> None:
    return None


def _retry_after(seconds: float) -> float:
    """A retry hint for `busy`: the expected wait, within 1-30 s."""
    return round(min(30.0, max(1.0, seconds)), 1)


class Daemon:
    def __init__(self, cfg: Config, asr: Any, tts: Any, fallbacks: List[Fallback], notifier: Optional[Notifier] = None):
        self.cfg = cfg
        self.asr = asr
        self.tts = tts
        self.fallbacks = list(fallbacks)
        self.notifier = notifier or Notifier()
        self.sessions: Dict[str, Session] = {}
        self.jobs: Dict[Tuple[bytes, str], TTSJob] = {}
        self.stopping = False
        self.started = time.time()
        self.counters: Dict[str, int] = {"peer_gone": 0, "dropped_hwm": 0, "protocol_errors": 0,
                                         "idle_closed": 0, "busy": 0,
                                         # open refused / audio messages refused for lag
                                         "busy_open_lag": 0, "audio_shed": 0,
                                         # audio messages vs engine feed() calls (merging)
                                         "asr_audio_messages": 0, "asr_feeds": 0}
        # ASR worker time spent in session calls (written on the worker), and the load figure
        # derived from it every LOAD_WINDOW_SECONDS.
        self._asr_busy_s = 0.0
        self._load_mark = (time.monotonic(), 0.0)
        self.asr_load = 0.0
        self.heartbeats = [_Heartbeat("asr", asr), _Heartbeat("tts", tts)]
        self.healthy = True
        self._stop_event: Optional[asyncio.Event] = None
        self._ctx: Optional[zmq.asyncio.Context] = None
        self.asr_sock: Optional[zmq.asyncio.Socket] = None
        self.tts_sock: Optional[zmq.asyncio.Socket] = None
        self._tasks: List[asyncio.Task] = []
        self._sync: Dict[int, zmq.Socket] = {}
        self._sigint_count = 0
        self._last_status = ""

    # --- sockets ---------------------------------------------------------------------------

    def _prepare_ipc(self, endpoint: str) -> Optional[Path]:
        if not endpoint.startswith("ipc://"):
            if endpoint.startswith("tcp://") and not endpoint.startswith(("tcp://127.", "tcp://localhost", "tcp://[::1]")):
                logger.warning("endpoint %s is not loopback: anyone who can reach it can use the daemon", endpoint)
            return None
        path = Path(endpoint[len("ipc://"):])
        parent = path.parent
        if not parent.exists():
            # Only the daemon and its group (the bridge) may look inside a directory we create.
            parent.mkdir(parents=True, mode=0o750)
            os.chmod(parent, 0o750)
        if path.exists():
            # libzmq silently replaces the file: make sure no live daemon still owns it.
            probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()
            else:
                raise S2SError(f"{path} is in use by another running daemon", ErrorCode.UNAVAILABLE)
            finally:
                probe.close()
        return path

    def _bind(self, endpoint: str) -> zmq.asyncio.Socket:
        path = self._prepare_ipc(endpoint)
        assert self._ctx is not None
        s = self._ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.SNDHWM, self.cfg.daemon.hwm)
        s.setsockopt(zmq.RCVHWM, self.cfg.daemon.hwm)
        s.setsockopt(zmq.LINGER, LINGER_MS)
        s.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        s.bind(endpoint)
        if path is not None:
            os.chmod(path, self.cfg.daemon.socket_mode_bits)
        self._sync[id(s)] = zmq.Socket.shadow(s.underlying)
        logger.info("listening on %s", endpoint)
        return s

    def send(self, sock: Optional[zmq.asyncio.Socket], ident: bytes, msg: P.Message) -> bool:
        """Non-blocking send; a vanished peer frees its sessions, a full peer loses the message."""
        if sock is None or sock.closed:
            return False
        try:
            # The synchronous shadow raises at once (zmq.asyncio would hide errors in a future).
            self._sync[id(sock)].send_multipart(P.router_frames(ident, msg), flags=zmq.DONTWAIT)
            return True
        except zmq.Again:
            self.counters["dropped_hwm"] += 1
            logger.warning("peer %s is not reading (high-water mark): dropped %s", _short(ident), msg.TYPE.value)
        except zmq.ZMQError as e:
            if e.errno == errno.EHOSTUNREACH:
                self._peer_gone(ident)
            else:
                logger.warning("send to %s failed: %s", _short(ident), e)
        finally:
            # The shadow send may have processed libzmq's pending commands, and with them the
            # edge on the socket's FD that would wake the pending asyncio recv: without this
            # re-check a session's audio could sit unread until some other peer's traffic (what
            # pyzmq does after its own sends; getting EVENTS schedules the waiting recv).
            if not sock.closed:
                sock.get(zmq.EVENTS)
        return False

    def _peer_gone(self, ident: bytes) -> None:
        owned = [s for s in self.sessions.values() if s.owner == ident and not s.closing]
        jobs = [j for j in self.jobs.values() if j.key[0] == ident and not j.cancelled]
        if owned or jobs:
            self.counters["peer_gone"] += 1
            logger.info("peer %s vanished: freeing %d session(s), cancelling %d TTS request(s)", _short(ident),
                        len(owned), len(jobs))
        for s in owned:
            self._close_session(s, "peer_gone", notify=False)
        for j in jobs:
            self._cancel_job(j)

    # --- receive loops ---------------------------------------------------------------------

    async def _recv_loop(self, sock: zmq.asyncio.Socket, which: str) -> None:
        allowed = P.ASR_REQUESTS if which == "asr" else P.TTS_REQUESTS
        while True:
            try:
                frames = await sock.recv_multipart()
            except (asyncio.CancelledError, zmq.ContextTerminated):
                return
            except zmq.ZMQError as e:
                if sock.closed:
                    return
                logger.warning("%s recv failed: %s", which, e)
                continue
            ident = bytes(frames[0]) if frames else b""
            msg: Optional[P.Message] = None
            try:
                ident, body = P.split_router(frames)
                msg = P.decode_request(body)
                if msg.TYPE.value not in allowed:
                    raise P.ProtocolError(f"{msg.TYPE.value!r} is not served on the {which} socket",
                                          ErrorCode.UNKNOWN_TYPE, getattr(msg, "request_id", ""),
                                          getattr(msg, "session_id", ""))
                if which == "asr":
                    self._handle_asr(sock, ident, msg)
                else:
                    self._handle_tts(sock, ident, msg)
            except P.ProtocolError as e:
                self.counters["protocol_errors"] += 1
                logger.info("%s: bad message from %s: %s (%s)", which, _short(ident), e, e.code.value)
                if ident:
                    self.send(sock, ident, P.Error(code=e.code.value, message=str(e), request_id=e.request_id,
                                                   session_id=e.session_id))
            except S2SError as e:
                if e.code == ErrorCode.BUSY:
                    self.counters["busy"] += 1
                self.send(sock, ident, P.Error.from_exception(e, getattr(msg, "request_id", ""),
                                                              getattr(msg, "session_id", ""), getattr(msg, "seq", None)))
            except Exception:  # never let one message kill the loop; the client gets a code only
                logger.exception("%s: error handling a message from %s", which, _short(ident))
                self.send(sock, ident, P.Error(code=ErrorCode.INTERNAL.value, message="internal error (see daemon log)"))

    def _common(self, sock: zmq.asyncio.Socket, ident: bytes, msg: P.Message) -> bool:
        if isinstance(msg, P.Ping):
            self.send(sock, ident, P.Pong(request_id=msg.request_id, time=time.time()))
            return True
        if isinstance(msg, P.Describe):
            self.send(sock, ident, P.Info(request_id=msg.request_id, info=self.describe()))
            return True
        return False

    # --- ASR ------------------------------------------------------------------------------

    def _owned(self, ident: bytes, session_id: str, request_id: str = "") -> Session:
        s = self.sessions.get(session_id)
        if s is None or s.closing:
            raise S2SError(f"session {session_id!r} is not open", ErrorCode.NO_SESSION)
        if s.owner != ident:
            raise S2SError(f"session {session_id!r} belongs to another client", ErrorCode.NOT_OWNER)
        s.last_active = time.monotonic()
        return s

    def _handle_asr(self, sock: zmq.asyncio.Socket, ident: bytes, msg: P.Message) -> None:
        if self._common(sock, ident, msg):
            return
        lim = self.cfg.limits
        if isinstance(msg, P.Audio):
            s = self._owned(ident, msg.session_id)
            n = len(msg.pcm)
            if n % 2:
                raise AudioError(f"PCM16 audio must have an even number of bytes, got {n}")
            if n > lim.max_chunk_seconds * s.sample_rate * 2:
                raise AudioError(f"audio chunk of {n // 2 / s.sample_rate:.2f} s exceeds limits.max_chunk_seconds="
                                 f"{lim.max_chunk_seconds:g}")
            if s.backlog_samples + n // 2 > SESSION_BACKLOG_SECONDS * s.sample_rate:
                raise S2SError(f"session {s.session_id} has {SESSION_BACKLOG_SECONDS:g} s of audio queued; slow down",
                               ErrorCode.BUSY, retry_after=1.0)
            now = time.monotonic()
            self._check_lag(s, now, n // 2)
            s.accept(n // 2, now)
            self.counters["asr_audio_messages"] += 1
            s.queue.put_nowait(("audio", msg))
            return
        if isinstance(msg, P.Open):
            self._open(sock, ident, msg)
            return
        if isinstance(msg, (P.Finalize, P.Reset, P.Close)):
            s = self._owned(ident, msg.session_id)
            if isinstance(msg, P.Close):
                self._close_session(s, "closed", request_id=msg.request_id)
            elif isinstance(msg, P.Finalize):
                s.closing = True  # further audio for it is refused; the queue is drained first
                s.queue.put_nowait(("finalize", msg))
            else:
                s.queue.put_nowait(("reset", msg))
            return
        raise P.ProtocolError(f"unexpected {msg.TYPE.value}", ErrorCode.UNKNOWN_TYPE)  # pragma: no cover

    def _check_lag(self, s: Session, now: float, samples: int) -> None:
        """Refuse (drop) audio for a session too far behind real time, until it catches up.

        Shedding starts past limits.max_session_lag and stops once the session is back within
        limits.max_asr_lag, so the gap in its audio is one stretch, not scattered frames."""
        lim = self.cfg.limits
        lag = s.lag(now)
        if s.shedding and lag <= lim.max_asr_lag:
            s.shedding = False
            logger.info("session %s: caught up (%.1f s behind); accepting audio again (%d messages, %.1f s dropped)",
                        s.session_id, lag, s.shed_chunks, s.shed_samples / s.sample_rate)
        elif not s.shedding and lag > lim.max_session_lag:
            s.shedding = True
            logger.warning("session %s: %.1f s behind real time (limits.max_session_lag=%g): refusing audio until "
                           "within %g s", s.session_id, lag, lim.max_session_lag, lim.max_asr_lag)
        if s.shedding:
            s.shed_chunks += 1
            s.shed_samples += samples
            self.counters["audio_shed"] += 1
            raise S2SError(f"speech recognition is {lag:.1f} s behind real time for session {s.session_id} "
                           f"(limits.max_session_lag={lim.max_session_lag:g}); audio dropped",
                           ErrorCode.BUSY, retry_after=_retry_after(lag - lim.max_asr_lag))

    def asr_lag(self, now: Optional[float] = None) -> Tuple[float, float]:
        """(worst session lag behind real time, audio seconds queued over all sessions)."""
        now = time.monotonic() if now is None else now
        worst = max([s.lag(now) for s in self.sessions.values()] or [0.0])
        queued = sum(s.backlog_samples / s.sample_rate for s in self.sessions.values())
        return worst, queued

    def _open(self, sock: zmq.asyncio.Socket, ident: bytes, msg: P.Open) -> None:
        if self.stopping:
            raise S2SError("daemon is shutting down", ErrorCode.SHUTTING_DOWN)
        if not msg.session_id or len(msg.session_id) > MAX_ID_CHARS:
            raise S2SError(f"session_id must be 1-{MAX_ID_CHARS} characters", ErrorCode.BAD_REQUEST)
        if msg.session_id in self.sessions:
            raise S2SError(f"session {msg.session_id!r} is already open", ErrorCode.SESSION_EXISTS)
        if msg.language is not None and msg.language not in LANGUAGES:
            raise S2SError(f"language must be one of {', '.join(LANGUAGES)}", ErrorCode.BAD_REQUEST)
        if not 8000 <= msg.sample_rate <= 48000:
            raise AudioError(f"sample_rate {msg.sample_rate} outside 8000-48000")
        if len(self.sessions) >= self.cfg.limits.max_sessions:
            raise S2SError(f"{len(self.sessions)} sessions open (limits.max_sessions); retry later", ErrorCode.BUSY,
                           retry_after=1.0)
        worst, queued = self.asr_lag()
        if worst > self.cfg.limits.max_asr_lag:
            # Past capacity: one more stream would make every session's finals later still.
            self.counters["busy_open_lag"] += 1
            logger.info("open %s refused: ASR %.1f s behind real time, %.1f s audio queued (limits.max_asr_lag=%g)",
                        msg.session_id, worst, queued, self.cfg.limits.max_asr_lag)
            raise S2SError(f"speech recognition is at capacity ({worst:.1f} s behind real time, "
                           f"limits.max_asr_lag={self.cfg.limits.max_asr_lag:g}); retry later", ErrorCode.BUSY,
                           retry_after=_retry_after(worst - self.cfg.limits.max_asr_lag + 1.0))
        s = Session(msg.session_id, ident, msg.sample_rate, msg.language, msg.hotwords, msg.partials, msg.request_id)
        if msg.sample_rate != P.ASR_SAMPLE_RATE:
            import soxr

            s.resampler = soxr.ResampleStream(msg.sample_rate, P.ASR_SAMPLE_RATE, 1, dtype="float32")
        self.sessions[s.session_id] = s
        s.task = asyncio.get_running_loop().create_task(self._run_session(sock, s), name=f"asr-{s.session_id}")
        logger.info("session %s: open from %s (lang=%s, rate=%d, partials=%s)", s.session_id, _short(ident),
                    msg.language, msg.sample_rate, msg.partials)

    async def _asr_call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.wrap_future(self.asr.submit(self._timed, fn, *args, **kwargs))

    def _timed(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Runs on the ASR worker: fn, adding its time to the worker's busy total."""
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._asr_busy_s += time.perf_counter() - t0  # one writer: the worker thread

    def _update_load(self) -> None:
        now = time.monotonic()
        t0, busy0 = self._load_mark
        if now - t0 >= LOAD_WINDOW_SECONDS:
            busy = self._asr_busy_s
            self.asr_load = min(1.0, max(0.0, (busy - busy0) / (now - t0)))
            self._load_mark = (now, busy)

    def _next_audio(self, s: Session, first: P.Audio) -> List[P.Audio]:
        """`first` plus the audio messages queued right behind it, up to limits.max_chunk_seconds
        in all: one engine call instead of one per message (each call pays the thread hop and
        the VAD's fixed cost). A non-audio command met on the way is kept for next time, so
        reset/finalize/close stay in order."""
        batch = [first]
        room = int(self.cfg.limits.max_chunk_seconds * s.sample_rate) * 2 - len(first.pcm)
        while s.stash is None and not s.queue.empty():
            item = s.queue.get_nowait()
            if item[0] != "audio" or len(item[1].pcm) > room:
                s.stash = item
                break
            batch.append(item[1])
            room -= len(item[1].pcm)
        return batch

    def _engine_open(self, s: Session) -> Any:
        hotwords = s.hotwords if s.hotwords is not None else (self.cfg.asr.hotwords or None)
        try:
            return self.asr.open(s.session_id, language=s.language or self.cfg.asr.language,
                                 hotwords=list(hotwords) if hotwords else None, partials=s.partials)
        except S2SError as e:
            if e.code == ErrorCode.UNSUPPORTED and s.hotwords is None and hotwords:
                # The configured defaults do not fit this model: serve without them.
                logger.warning("session %s: default hotwords unusable (%s); opening without", s.session_id, e)
                return self.asr.open(s.session_id, language=s.language or self.cfg.asr.language, hotwords=None,
                                     partials=s.partials)
            raise

    def _send_events(self, sock: zmq.asyncio.Socket, s: Session, events: List[Dict[str, Any]], request_id: str = "") -> None:
        for ev in events or []:
            m = P.event_to_message(s.session_id, ev, request_id)
            if m is None:
                logger.debug("session %s: unknown engine event %r", s.session_id, ev.get("type"))
                continue
            if isinstance(m, P.Partial) and not s.partials:
                continue
            if not self.send(sock, s.owner, m):
                return

    def _pcm_for_engine(self, s: Session, pcm: bytes, last: bool = False) -> Any:
        if s.resampler is None:
            return pcm
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        return s.resampler.resample_chunk(x, last=last)

    async def _run_session(self, sock: zmq.asyncio.Socket, s: Session) -> None:
        reason = "error"
        failed = False
        try:
            try:
                s.busy = True
                s.engine = await self._asr_call(self._engine_open, s)
            except S2SError as e:
                self.send(sock, s.owner, P.Error.from_exception(e, s.request_id, s.session_id))
                reason = ""
                return
            finally:
                s.busy = False
            caps = self._engine_info("asr").capabilities.to_dict()
            caps["partials"] = caps["partials"] and s.partials
            caps.update(sample_rate=s.sample_rate, max_chunk_seconds=self.cfg.limits.max_chunk_seconds)
            self.send(sock, s.owner, P.Opened(session_id=s.session_id, request_id=s.request_id, capabilities=caps))
            while True:
                if s.stash is not None:
                    (kind, msg), s.stash = s.stash, None
                else:
                    kind, msg = await s.queue.get()
                s.busy = True
                try:
                    if kind == "audio":
                        batch = self._next_audio(s, msg)
                        pcm = msg.pcm if len(batch) == 1 else b"".join(m.pcm for m in batch)
                        self.counters["asr_feeds"] += 1
                        try:
                            events = await self._asr_call(s.engine.feed, self._pcm_for_engine(s, pcm))
                        except AudioError as e:
                            for m in batch:
                                if m.ack or m is batch[-1]:
                                    self.send(sock, s.owner, P.Error.from_exception(e, m.request_id, s.session_id,
                                                                                    m.seq))
                            continue
                        finally:
                            s.done(len(batch))
                        self._send_events(sock, s, events)
                        for m in batch:
                            if m.ack:
                                self.send(sock, s.owner, P.Ack(session_id=s.session_id, request_id=m.request_id,
                                                               of="audio", seq=m.seq))
                    elif kind == "finalize":
                        if s.resampler is not None:
                            tail = self._pcm_for_engine(s, b"", last=True)
                            if len(tail):
                                self._send_events(sock, s, await self._asr_call(s.engine.feed, tail))
                        events = await self._asr_call(s.engine.finalize_events)
                        self._send_events(sock, s, events, msg.request_id)
                        self.send(sock, s.owner, P.Closed(session_id=s.session_id, request_id=msg.request_id,
                                                          reason="finalized"))
                        reason = ""
                        return
                    elif kind == "reset":
                        await self._asr_call(s.engine.reset)
                        self.send(sock, s.owner, P.Ack(session_id=s.session_id, request_id=msg.request_id, of="reset"))
                    elif kind == "close":
                        reason_, request_id, notify = msg
                        if notify:
                            self.send(sock, s.owner, P.Closed(session_id=s.session_id, request_id=request_id,
                                                              reason=reason_))
                        reason = ""
                        return
                finally:
                    s.busy = False
        except asyncio.CancelledError:
            reason = "shutdown" if self.stopping else "cancelled"
            raise
        except S2SError as e:
            failed = True
            logger.warning("session %s: %s (%s)", s.session_id, e, e.code.value)
            self.send(sock, s.owner, P.Error.from_exception(e, "", s.session_id))
        except Exception:
            failed = True
            logger.exception("session %s: engine failure", s.session_id)
            self.send(sock, s.owner, P.Error(code=ErrorCode.ENGINE_ERROR.value, message="recognition failed (see daemon log)",
                                             session_id=s.session_id))
        finally:
            # A failure also ends a session that was finalizing or had a close queued: the
            # `closed` those would have sent never comes, so say it here.
            if reason and reason != "shutdown" and (failed or not s.closing):
                self.send(sock, s.owner, P.Closed(session_id=s.session_id, reason=reason))
            self._release(s)

    def _release(self, s: Session) -> None:
        if self.sessions.get(s.session_id) is s:
            del self.sessions[s.session_id]
        s.closing = True
        try:
            self.asr.submit(self.asr.close, s.session_id)
        except RuntimeError:
            pass  # worker already shut down
        logger.info("session %s: released (%.1f s)", s.session_id, time.monotonic() - s.opened_at)

    def _close_session(self, s: Session, reason: str, request_id: str = "", notify: bool = True) -> None:
        """Drop queued audio and end the session after the command on the worker (if any)."""
        s.closing = True
        while not s.queue.empty():
            s.queue.get_nowait()
        s.forget()
        if s.task is not None and s.task.done():
            return
        s.queue.put_nowait(("close", (reason, request_id, notify)))
        if s.engine is None and not s.busy and s.task is not None:
            s.task.cancel()
            if notify:
                self.send(self.asr_sock, s.owner, P.Closed(session_id=s.session_id, request_id=request_id, reason=reason))

    async def _gc_loop(self) -> None:
        while True:
            timeout = self.cfg.limits.idle_timeout
            await asyncio.sleep(min(1.0, timeout / 4))
            self._update_load()
            now = time.monotonic()
            for s in list(self.sessions.values()):
                if not s.closing and not s.has_work() and now - s.last_active > timeout:
                    logger.info("session %s: idle for %.0f s, closing", s.session_id, now - s.last_active)
                    self.counters["idle_closed"] += 1
                    self._close_session(s, "idle")

    # --- TTS ------------------------------------------------------------------------------

    def _handle_tts(self, sock: zmq.asyncio.Socket, ident: bytes, msg: P.Message) -> None:
        if self._common(sock, ident, msg):
            return
        if isinstance(msg, P.Cancel):
            job = self.jobs.get((ident, msg.request_id))
            if job is None:
                raise S2SError(f"no active request {msg.request_id!r}", ErrorCode.BAD_REQUEST)
            self._cancel_job(job)
            self.send(sock, ident, P.Cancelled(request_id=msg.request_id))
            return
        if not isinstance(msg, P.Synthesize):
            raise P.ProtocolError(f"unexpected {msg.TYPE.value}", ErrorCode.UNKNOWN_TYPE)
        lim = self.cfg.limits
        if self.stopping:
            raise S2SError("daemon is shutting down", ErrorCode.SHUTTING_DOWN)
        if not msg.request_id:
            raise S2SError("synthesize needs a request_id", ErrorCode.BAD_REQUEST)
        if (ident, msg.request_id) in self.jobs:
            raise S2SError(f"request {msg.request_id!r} is already running", ErrorCode.BAD_REQUEST)
        if not msg.text.strip():
            raise S2SError("text is empty", ErrorCode.BAD_TEXT)
        if len(msg.text) > lim.max_text_chars:
            raise S2SError(f"text of {len(msg.text)} characters exceeds limits.max_text_chars={lim.max_text_chars}",
                           ErrorCode.BAD_TEXT)
        if msg.speed is not None and not 0.25 <= msg.speed <= 4.0:
            raise S2SError("speed must be between 0.25 and 4", ErrorCode.BAD_REQUEST)
        if len(self.jobs) >= lim.max_tts_queue:
            raise S2SError(f"{len(self.jobs)} TTS requests queued (limits.max_tts_queue); retry later", ErrorCode.BUSY,
                           retry_after=1.0)
        job = TTSJob((ident, msg.request_id), msg)
        self.jobs[job.key] = job
        job.task = asyncio.get_running_loop().create_task(self._run_tts(sock, job), name=f"tts-{msg.request_id}")

    def _cancel_job(self, job: TTSJob) -> None:
        job.cancelled = True
        if self.jobs.get(job.key) is job:
            del self.jobs[job.key]

    async def _tts_call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.wrap_future(self.tts.submit(fn, *args))

    async def _run_tts(self, sock: zmq.asyncio.Socket, job: TTSJob) -> None:
        ident, rid = job.key
        req = job.request
        lang = req.language or self.cfg.tts.language.lower()
        speed = req.speed if req.speed is not None else self.cfg.tts.speed
        rate = int(getattr(self.tts, "sample_rate", self.cfg.tts.sample_rate))
        max_bytes = int(rate * TTS_CHUNK_SECONDS) * 2
        seq = sentences = 0
        samples = 0
        gen = None
        try:
            if req.stream:
                gen = await self._tts_call(self.tts.synthesize_stream, req.text, lang, speed)
                parts = None
            else:
                pcm = await self._tts_call(self.tts.synthesize, req.text, lang, speed)
                parts = [(0, req.text, pcm)]
            while not job.cancelled:
                if parts is None:
                    # One worker step per sentence: cancel, heartbeats and other requests get in between.
                    item = await self._tts_call(next, gen, None)
                    if item is None:
                        break
                else:
                    if not parts:
                        break
                    item = parts.pop(0)
                if job.cancelled:
                    break
                idx, text, pcm = item
                sentences += 1
                for off in range(0, max(len(pcm), 1), max_bytes):
                    piece = pcm[off:off + max_bytes]
                    if not self.send(sock, ident, P.SynthAudio(request_id=rid, seq=seq, sentence=int(idx), text=text,
                                                               sample_rate=rate, pcm=piece)):
                        job.cancelled = True
                        break
                    seq += 1
                    samples += len(piece) // 2
            if not job.cancelled:
                self.send(sock, ident, P.Done(request_id=rid, chunks=seq, sentences=sentences, duration=samples / rate))
                logger.info("tts %s: %d sentences, %.2f s audio in %.2f s", rid, sentences, samples / rate,
                            time.monotonic() - job.started)
        except asyncio.CancelledError:
            raise
        except S2SError as e:
            self.send(sock, ident, P.Error.from_exception(e, rid))
        except Exception:
            logger.exception("tts %s: synthesis failed", rid)
            self.send(sock, ident, P.Error(code=ErrorCode.ENGINE_ERROR.value, message="synthesis failed (see daemon log)",
                                           request_id=rid))
        finally:
            if self.jobs.get(job.key) is job:
                del self.jobs[job.key]
            if gen is not None and job.cancelled:
                try:
                    self.tts.submit(gen.close)
                except RuntimeError:
                    pass

    # --- info, health, status --------------------------------------------------------------

    def _engine_info(self, kind: str) -> EngineInfo:
        engine = self.asr if kind == "asr" else self.tts
        try:
            return engine.info()
        except Exception as e:  # info must never break describe: report the failure in the same schema
            logger.exception("%s engine info failed", kind)
            return EngineInfo(kind=kind, engine=str(getattr(engine, "name", "?")), device="?", requested_device="?",
                              dtype="?", sample_rate=0, capabilities=Capabilities(), loaded=False,
                              notes=(f"info failed: {type(e).__name__}: {e}",))

    def all_fallbacks(self, asr: EngineInfo, tts: EngineInfo) -> List[Fallback]:
        return merge_fallbacks(self.fallbacks, asr.fallbacks, tts.fallbacks)

    def describe(self) -> Dict[str, Any]:
        now = time.monotonic()
        worst, queued = self.asr_lag(now)
        asr, tts = self._engine_info("asr"), self._engine_info("tts")
        return {
            "daemon": {"version": daemon.__version__, "protocol": P.PROTOCOL_VERSION, "pid": os.getpid(),
                       "uptime": round(time.time() - self.started, 3), "config": self.cfg.source,
                       "stopping": self.stopping, "healthy": self.healthy,
                       "endpoints": {"asr": self.cfg.daemon.endpoint("asr"), "tts": self.cfg.daemon.endpoint("tts")}},
            "asr": asr.to_dict(),
            "tts": tts.to_dict(),
            "capabilities": {
                "partials": asr.capabilities.partials,
                "hotwords": asr.capabilities.hotwords,
                "streaming_tts": tts.capabilities.streaming,
            },
            # Every fallback taken (startup engine choice, device moves), each once: Fallback records.
            "fallbacks": [f.to_dict() for f in self.all_fallbacks(asr, tts)],
            "sessions": [{"session_id": s.session_id, "language": s.language, "sample_rate": s.sample_rate,
                          "age": round(now - s.opened_at, 2), "idle": round(now - s.last_active, 2),
                          "backlog_seconds": round(s.backlog_samples / s.sample_rate, 2),
                          "lag": round(s.lag(now), 3), "shedding": s.shedding,
                          "shed_seconds": round(s.shed_samples / s.sample_rate, 2),
                          "queued": s.queue.qsize(), "busy": s.busy} for s in self.sessions.values()],
            "queues": {"asr_sessions": len(self.sessions),
                       "asr_queued_chunks": sum(s.queue.qsize() for s in self.sessions.values()),
                       "asr_max_lag": round(worst, 3), "asr_queued_seconds": round(queued, 2),
                       "asr_worker_load": round(self.asr_load, 3),
                       "asr_at_capacity": worst > self.cfg.limits.max_asr_lag,
                       "tts_requests": len(self.jobs)},
            "limits": dataclasses.asdict(self.cfg.limits),
            "counters": dict(self.counters),
        }

    def status_line(self) -> str:
        a, t = self._engine_info("asr"), self._engine_info("tts")
        line = (f"serving: asr={a.engine}@{a.device} tts={t.engine}@{t.device}, "
                f"{len(self.sessions)} session(s), {len(self.jobs)} TTS request(s)")
        fallbacks = self.all_fallbacks(a, t)
        if fallbacks:
            line += f"; fallback: {'; '.join(f.line() for f in fallbacks)}"
        if not self.healthy:
            line += "; UNHEALTHY: engine worker unresponsive"
        return line

    async def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_interval()
        period = interval or 5.0
        for hb in self.heartbeats:
            hb.kick()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            stuck = [hb.name for hb in self.heartbeats if now - hb.ok_at > 1.5 * period]
            healthy = not stuck
            if healthy != self.healthy:
                if stuck:
                    logger.error("engine worker(s) unresponsive: %s; withholding WATCHDOG=1", ", ".join(stuck))
                else:
                    logger.info("engine workers responsive again")
            self.healthy = healthy
            if healthy and interval:
                self.notifier.watchdog()
            line = self.status_line()
            if line != self._last_status:
                self._last_status = line
                self.notifier.status(line)
            for hb in self.heartbeats:
                hb.kick()

    # --- signals, reload, shutdown ----------------------------------------------------------

    def request_stop(self, why: str) -> None:
        if self._stop_event is not None and not self._stop_event.is_set():
            logger.info("%s: shutting down (drain up to %.1f s)", why, self.cfg.daemon.drain_timeout)
            self._stop_event.set()

    def _on_sigint(self) -> None:
        self._sigint_count += 1
        if self._sigint_count > 1:
            logger.warning("second SIGINT: exiting now")
            logging.shutdown()
            os._exit(130)
        self.request_stop("SIGINT (again to force)")

    def reload(self) -> Tuple[List[str], List[str]]:
        """Re-read the config file; apply limits, logging, hotword defaults and the like."""
        try:
            new = load_config(self.cfg.source if self.cfg.source != "<defaults>" else None)
        except ConfigError as e:
            logger.error("SIGHUP: config not reloaded: %s", e)
            self.notifier.status(f"reload failed: {e}")
            return [], []
        applied, restart = reloadable_diff(self.cfg, new)
        old = self.cfg
        self.cfg = dataclasses.replace(
            old, limits=new.limits, logging=new.logging,
            asr=dataclasses.replace(old.asr, hotwords=new.asr.hotwords, partial_interval=new.asr.partial_interval),
            tts=dataclasses.replace(old.tts, speed=new.tts.speed),
            daemon=dataclasses.replace(old.daemon, drain_timeout=new.daemon.drain_timeout))
        if new.logging != old.logging:
            root = logging.getLogger()
            root.setLevel(getattr(logging, new.logging.level))
            for h in root.handlers:
                h.setFormatter(logging.Formatter(new.logging.format))
        msg = f"reloaded {self.cfg.source}: applied {', '.join(applied) or 'nothing'}"
        if restart:
            msg += f"; needs a restart: {', '.join(restart)}"
        logger.info("SIGHUP: %s", msg)
        self.notifier.status(msg)
        return applied, restart

    def _in_flight(self) -> int:
        return sum(1 for s in self.sessions.values() if s.has_work()) + len(self.jobs)

    async def _drain_and_close(self) -> None:
        self.stopping = True
        timeout = self.cfg.daemon.drain_timeout
        self.notifier.stopping(f"stopping: draining {self._in_flight()} request(s), up to {timeout:g} s")
        deadline = time.monotonic() + timeout
        while self._in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self._in_flight()
        if left:
            logger.warning("drain timeout: cancelling %d in-flight request(s)", left)
        for s in list(self.sessions.values()):
            self.send(self.asr_sock, s.owner, P.Closed(session_id=s.session_id, reason="shutdown"))
            s.closing = True
            if s.task:
                s.task.cancel()
        for job in list(self.jobs.values()):
            self.send(self.tts_sock, job.key[0], P.Error(code=ErrorCode.SHUTTING_DOWN.value,
                                                          message="daemon is shutting down", request_id=job.key[1]))
            self._cancel_job(job)
            if job.task:
                job.task.cancel()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._ctx = zmq.asyncio.Context()
        try:
            self.asr_sock = self._bind(self.cfg.daemon.endpoint("asr"))
            self.tts_sock = self._bind(self.cfg.daemon.endpoint("tts"))
        except (zmq.ZMQError, OSError, S2SError) as e:
            logger.error("cannot bind: %s", e)
            self._ctx.destroy(linger=0)
            return 1
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._tasks = [loop.create_task(self._recv_loop(self.asr_sock, "asr"), name="asr-recv"),
                       loop.create_task(self._recv_loop(self.tts_sock, "tts"), name="tts-recv"),
                       loop.create_task(self._gc_loop(), name="gc"),
                       loop.create_task(self._watchdog_loop(), name="watchdog")]
        self._last_status = self.status_line()
        self.notifier.ready(self._last_status)
        if self.notifier.watchdog_interval():
            self.notifier.watchdog()
        logger.info("ready: %s", self._last_status)
        await self._stop_event.wait()
        await self._drain_and_close()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        self.asr_sock.close(linger=LINGER_MS)
        self.tts_sock.close(linger=LINGER_MS)
        for ep in (self.cfg.daemon.endpoint("asr"), self.cfg.daemon.endpoint("tts")):
            if ep.startswith("ipc://"):
                try:
                    os.unlink(ep[len("ipc://"):])
                except OSError:
                    pass
        self._ctx.term()
        return 0


def _shutdown_engines(engines: List[Any], timeout: float) -> bool:
    """Shut engines down on a helper thread; False when a hung worker did not let go in time."""
    def work() -> None:
        for e in engines:
            try:
                e.shutdown()
            except Exception:
                logger.exception("engine shutdown failed")

    t = threading.Thread(target=work, name="engine-shutdown", daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive()


def load_engines(cfg: Config, strict: bool, notifier: Notifier) -> Tuple[Any, Any, List[Fallback]]:
    """Build ASR then TTS on a thread; meanwhile keep systemd's start timeout extended."""
    from daemon.factory import build_asr, build_tts

    result: Dict[str, Any] = {}
    stage = {"now": "loading ASR engine"}

    def work() -> None:
        try:
            notifier.status(f"loading ASR engine ({cfg.asr.engine} on {cfg.asr.device})")
            asr, fb1 = build_asr(cfg, strict)
            result["asr"] = asr
            stage["now"] = "loading TTS engine"
            notifier.status(f"loading TTS engine ({cfg.tts.engine} on {cfg.tts.device})")
            tts, fb2 = build_tts(cfg, strict)
            result.update(tts=tts, fallbacks=fb1 + fb2)
        except BaseException as e:  # handed to the main thread
            result["error"] = e

    stop = {"signal": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    t = threading.Thread(target=work, name="engine-load", daemon=True)
    started = time.monotonic()
    t.start()
    try:
        while t.is_alive():
            notifier.extend_timeout(EXTEND_SECONDS)
            t.join(1.0)
            if stop["signal"]:
                logger.info("signal %d while %s: exiting", stop["signal"], stage["now"])
                notifier.stopping("stopped while loading engines")
                logging.shutdown()
                os._exit(0)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if "error" in result:
        raise result["error"]
    logger.info("engines loaded in %.1f s", time.monotonic() - started)
    return result["asr"], result["tts"], result["fallbacks"]


def run(cfg: Config, strict: bool = False) -> int:
    """Load, serve until SIGTERM/SIGINT, drain, exit code."""
    from daemon.factory import StartupError

    notifier = Notifier()
    notifier.status("starting: loading engines")
    try:
        asr, tts, fallbacks = load_engines(cfg, strict, notifier)
    except StartupError as e:
        logger.error("%s", e)
        notifier.status(f"failed: {e}")
        return 1
    except S2SError as e:
        logger.error("engine load failed: %s", e)
        notifier.status(f"failed: {e}")
        return 1
    for f in fallbacks:
        logger.warning("running on a fallback: %s", f.line())
    d = Daemon(cfg, asr, tts, fallbacks, notifier)
    rc = asyncio.run(d.serve())
    if not _shutdown_engines([asr, tts], timeout=max(1.0, d.cfg.daemon.drain_timeout)):
        logger.warning("an engine worker did not stop; exiting anyway")
        logging.shutdown()
        os._exit(rc)
    logger.info("stopped")
    return rc
