"""Client library for the speech daemon: blocking (`ASRClient`, `TTSClient`) and asyncio
(`AsyncASRClient`, `AsyncTTSClient`) flavours, both speaking daemon.protocol.

Each client is one DEALER socket with a random uuid identity (kept across reconnects, so
sessions stay ours), LINGER 0 and high-water marks. The asyncio clients also watch the
connection (a ZeroMQ socket monitor): when the daemon goes away (crash, SIGKILL, restart),
waiting requests fail at once with `unavailable`, and every open stream gets an `error`
(unavailable) followed by `closed` with reason "daemon_gone" (the daemon's sessions died
with it), instead of waiting for timeouts that audio streams do not have. Requests carry a request id; replies
that are not ours (an old request's late answer, another session) are ignored. Timeouts
raise `DaemonError(code=timeout)`; a timeout also reconnects the socket, dropping anything
queued for a daemon that went away. Errors from the daemon raise `DaemonError` with its
stable `code` (daemon.errors.ErrorCode) and `retry_after` for `busy`.

    with ASRClient("ipc:///run/s2s/asr.sock") as c:
        s = c.open(language="zh")
        for chunk in chunks: s.send(chunk); events = s.poll(0)
        events = s.finalize()          # ... Final, Closed

    async with AsyncTTSClient(ep) as t:
        async for chunk in t.synthesize("你好。"): play(chunk.pcm)
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import deque
from typing import Any, AsyncIterator, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import zmq
import zmq.asyncio

from daemon import protocol as P
from daemon.errors import ErrorCode, S2SError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
HWM = 1000


class DaemonError(S2SError):
    """An `error` reply from the daemon, or a client-side timeout (code timeout)."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INTERNAL, request_id: str = "",
                 session_id: str = "", retry_after: Optional[float] = None):
        super().__init__(message, code)
        self.request_id = request_id
        self.session_id = session_id
        self.retry_after = retry_after

    @classmethod
    def from_reply(cls, e: P.Error) -> "DaemonError":
        return cls(e.message or e.code, e.error_code, e.request_id, e.session_id, e.retry_after)


def new_id() -> str:
    return uuid.uuid4().hex


def _socket(ctx: zmq.Context, endpoint: str, identity: bytes) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, identity)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, HWM)
    s.setsockopt(zmq.RCVHWM, HWM)
    s.connect(endpoint)
    return s


def _decode(frames: Sequence[bytes]) -> Optional[P.Message]:
    try:
        return P.decode_reply(P.split_dealer(frames))
    except P.ProtocolError as e:
        logger.warning("ignoring malformed reply from daemon: %s", e)
        return None


# --- blocking -------------------------------------------------------------------------------


def missing_endpoint(endpoint: str) -> Optional[str]:
    """Why nothing can be listening at `endpoint` (an ipc:// socket file that does not exist), or None.

    libzmq connects to a missing ipc path without complaint and waits; this lets a caller say so at once."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not os.path.exists(path):
            return f"no daemon at {endpoint}: the socket file {path} does not exist (is s2s-speechd running?)"
    return None


class Client:
    """Blocking DEALER client; base of ASRClient and TTSClient."""

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT, identity: Optional[bytes] = None,
                 context: Optional[zmq.Context] = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self.identity = identity or f"s2s-{new_id()}".encode()
        self._ctx = context or zmq.Context.instance()
        self._sock = _socket(self._ctx, endpoint, self.identity)
        # Replies read while waiting for something else, kept for their owners.
        self._backlog: Deque[P.Message] = deque()

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def reconnect(self) -> None:
        """New socket, same identity: drops stale queued traffic, keeps session ownership."""
        self._sock.close(linger=0)
        self._sock = _socket(self._ctx, self.endpoint, self.identity)

    def send(self, msg: P.Message) -> None:
        why = missing_endpoint(self.endpoint)
        if why:  # libzmq would queue the message and wait for a daemon that is not there
            raise DaemonError(why, ErrorCode.UNAVAILABLE, getattr(msg, "request_id", ""))
        try:
            self._sock.send_multipart(P.dealer_frames(msg), flags=zmq.DONTWAIT)
        except zmq.Again:
            raise DaemonError(f"daemon at {self.endpoint} is not reading (send queue full)", ErrorCode.UNAVAILABLE) from None

    def recv(self, timeout: Optional[float]) -> Optional[P.Message]:
        """Next reply within timeout seconds (None = wait forever); None on timeout."""
        if self._backlog:
            return self._backlog.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._sock.poll(None if left is None else int(left * 1000)):
                return None
            m = _decode(self._sock.recv_multipart())
            if m is not None:
                return m
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def request(self, msg: P.Message, reply_types: Tuple[type, ...], timeout: Optional[float] = None) -> P.Message:
        """Send msg and wait for the first reply of reply_types (or an error) with its request id."""
        rid = getattr(msg, "request_id", "")
        self.send(msg)
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        kept: List[P.Message] = []
        try:
            while True:
                left = deadline - time.monotonic()
                m = self.recv(left) if left > 0 else None
                if m is None:
                    self.reconnect()
                    raise DaemonError(f"no reply to {msg.TYPE.value} within {timeout:g} s", ErrorCode.TIMEOUT, rid)
                if getattr(m, "request_id", None) == rid and isinstance(m, P.Error):
                    raise DaemonError.from_reply(m)
                if getattr(m, "request_id", None) == rid and isinstance(m, reply_types):
                    return m
                kept.append(m)
        finally:
            self._backlog.extend(kept)

    def ping(self, timeout: Optional[float] = None) -> float:
        """Round-trip time in seconds."""
        t0 = time.monotonic()
        self.request(P.Ping(request_id=new_id()), (P.Pong,), timeout)
        return time.monotonic() - t0

    def describe(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        return self.request(P.Describe(request_id=new_id()), (P.Info,), timeout).info  # type: ignore[attr-defined]


class ASRStream:
    """One open ASR session on a blocking ASRClient."""

    def __init__(self, client: "ASRClient", session_id: str, capabilities: Dict[str, Any]):
        self.client = client
        self.session_id = session_id
        self.capabilities = capabilities
        self.seq = 0
        self.closed = False

    def send(self, pcm: bytes, ack: bool = False) -> int:
        """Queue one PCM16 chunk; returns its seq. Events arrive asynchronously (poll())."""
        seq = self.seq
        self.client.send(P.Audio(session_id=self.session_id, seq=seq, pcm=bytes(pcm), ack=ack))
        self.seq += 1
        return seq

    def poll(self, timeout: Optional[float] = 0.0) -> List[P.Message]:
        """Events (SpeechStart/Partial/Final/Closed/Error/Ack) of this session received so far,
        waiting up to timeout for the first one."""
        return self.client._events(self.session_id, timeout)

    def wait_ack(self, seq: int, timeout: Optional[float] = None) -> List[P.Message]:
        """Wait for the `ack` of an audio chunk sent with ack=True; returns events seen meanwhile."""
        out: List[P.Message] = []
        deadline = time.monotonic() + (self.client.timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            for m in self.poll(deadline - time.monotonic()):
                if isinstance(m, P.Ack) and m.of == "audio" and m.seq >= seq:
                    return out
                out.append(m)
                if isinstance(m, P.Closed):
                    self.closed = True
                    return out
        raise DaemonError(f"no ack for chunk {seq}", ErrorCode.TIMEOUT, session_id=self.session_id)

    def finalize(self, timeout: Optional[float] = None) -> List[P.Message]:
        """Flush; returns every remaining event, ending with Closed."""
        rid = new_id()
        self.client.send(P.Finalize(session_id=self.session_id, request_id=rid))
        return self._until_closed(timeout)

    def _until_closed(self, timeout: Optional[float]) -> List[P.Message]:
        out: List[P.Message] = []
        deadline = time.monotonic() + (self.client.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonError("session did not close in time", ErrorCode.TIMEOUT, session_id=self.session_id)
            for m in self.poll(left):
                out.append(m)
                if isinstance(m, P.Closed):
                    self.closed = True
                    return out
                if isinstance(m, P.Error) and m.code in (ErrorCode.NO_SESSION.value, ErrorCode.NOT_OWNER.value):
                    raise DaemonError.from_reply(m)

    def reset(self, timeout: Optional[float] = None) -> None:
        rid = new_id()
        self.client.send(P.Reset(session_id=self.session_id, request_id=rid))
        deadline = time.monotonic() + (self.client.timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            for m in self.poll(deadline - time.monotonic()):
                if isinstance(m, P.Ack) and m.request_id == rid:
                    return
                if isinstance(m, P.Error) and m.request_id == rid:
                    raise DaemonError.from_reply(m)
        raise DaemonError("no reply to reset", ErrorCode.TIMEOUT, session_id=self.session_id)

    def close(self, timeout: Optional[float] = None) -> List[P.Message]:
        if self.closed:
            return []
        self.client.send(P.Close(session_id=self.session_id, request_id=new_id()))
        return self._until_closed(timeout)


class ASRClient(Client):
    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self._events_by_session: Dict[str, Deque[P.Message]] = {}

    def open(self, session_id: Optional[str] = None, language: Optional[str] = None,
             hotwords: Optional[Sequence[str]] = None, sample_rate: int = P.ASR_SAMPLE_RATE, partials: bool = True,
             timeout: Optional[float] = None) -> ASRStream:
        sid = session_id or new_id()
        self._events_by_session[sid] = deque()
        msg = P.Open(session_id=sid, request_id=new_id(), language=language,
                     hotwords=tuple(hotwords) if hotwords is not None else None, sample_rate=sample_rate,
                     partials=partials)
        try:
            opened = self.request(msg, (P.Opened,), timeout)
        except DaemonError:
            self._events_by_session.pop(sid, None)
            raise
        return ASRStream(self, sid, dict(opened.capabilities))  # type: ignore[attr-defined]

    def _route(self, m: P.Message) -> None:
        sid = getattr(m, "session_id", "")
        q = self._events_by_session.get(sid)
        if q is not None:
            q.append(m)
        else:
            logger.debug("ignoring %s for unknown session %r", m.TYPE.value, sid)

    def _events(self, session_id: str, timeout: Optional[float]) -> List[P.Message]:
        q = self._events_by_session.setdefault(session_id, deque())
        while self._backlog:
            self._route(self._backlog.popleft())
        deadline = None if timeout is None else time.monotonic() + timeout
        while not q:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            m = self.recv(left)
            if m is None:
                break
            self._route(m)
        # Drain whatever else is already here without waiting.
        while True:
            m = self.recv(0)
            if m is None:
                break
            self._route(m)
        out = list(q)
        q.clear()
        return out


class TTSClient(Client):
    def synthesize(self, text: str, language: Optional[str] = None, speed: Optional[float] = None,
                   stream: bool = True, request_id: Optional[str] = None,
                   timeout: Optional[float] = None) -> Iterator[P.SynthAudio]:
        """Yield audio chunks until `done`; raises DaemonError on an error reply or a timeout
        between chunks."""
        rid = request_id or new_id()
        self.send(P.Synthesize(request_id=rid, text=text, language=language, speed=speed, stream=stream))
        timeout = self.timeout if timeout is None else timeout
        while True:
            m = self.recv(timeout)
            if m is None:
                self.reconnect()
                raise DaemonError(f"no audio within {timeout:g} s", ErrorCode.TIMEOUT, rid)
            if getattr(m, "request_id", None) != rid:
                continue  # not ours (a cancelled request's late chunk, ...)
            if isinstance(m, P.Error):
                raise DaemonError.from_reply(m)
            if isinstance(m, P.SynthAudio):
                yield m
            elif isinstance(m, (P.Done, P.Cancelled)):
                return

    def speak(self, text: str, **kw: Any) -> Tuple[bytes, int]:
        """Whole utterance: (PCM16 bytes, sample rate)."""
        pcm, rate = [], 24000
        for chunk in self.synthesize(text, **kw):
            pcm.append(chunk.pcm)
            rate = chunk.sample_rate
        return b"".join(pcm), rate

    def cancel(self, request_id: str, timeout: Optional[float] = None) -> None:
        self.request(P.Cancel(request_id=request_id), (P.Cancelled,), timeout)


# --- asyncio --------------------------------------------------------------------------------


class AsyncClient:
    """asyncio DEALER client: one reader task routes replies to waiting requests and streams;
    a monitor task turns a lost connection into errors for them (see the module docstring)."""

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT, identity: Optional[bytes] = None,
                 context: Optional[zmq.asyncio.Context] = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self.identity = identity or f"s2s-{new_id()}".encode()
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: Optional[zmq.asyncio.Socket] = None
        self._reader: Optional[asyncio.Task] = None
        self._watcher: Optional[asyncio.Task] = None
        self._monitor: Optional[zmq.asyncio.Socket] = None
        self._pending: Dict[str, asyncio.Future] = {}
        self._streams: Dict[str, asyncio.Queue] = {}

    async def connect(self) -> "AsyncClient":
        if self._sock is None:
            # An asyncio context makes asyncio sockets; _socket is typed for the blocking ones.
            sock = cast(zmq.asyncio.Socket, _socket(self._ctx, self.endpoint, self.identity))  # type: ignore[arg-type]
            self._sock = sock
            loop = asyncio.get_running_loop()
            self._reader = loop.create_task(self._read(), name="s2s-client-reader")
            self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self._watcher = loop.create_task(self._watch(self._monitor), name="s2s-client-monitor")
        return self

    async def close(self) -> None:
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._reader = self._watcher = None
        if self._monitor is not None:
            if self._sock is not None:
                self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        for f in self._pending.values():
            if not f.done():
                f.set_exception(DaemonError("client closed", ErrorCode.UNAVAILABLE))
        self._pending.clear()

    async def reconnect(self) -> None:
        """New socket, same identity (sessions stay ours); pending requests fail."""
        streams = self._streams
        await self.close()
        self._streams = streams
        await self.connect()

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _read(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            m = _decode(frames)
            if m is not None:
                self._dispatch(m)

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            ev = await recv_monitor_message(monitor)
            if ev["event"] == zmq.EVENT_DISCONNECTED:
                self._connection_lost()
            elif ev["event"] == zmq.EVENT_MONITOR_STOPPED:
                return

    def _connection_lost(self) -> None:
        """The daemon went away: fail waiting requests, end open streams (their sessions died
        with the daemon). zmq keeps reconnecting; later requests reach the next daemon."""
        msg = f"lost the connection to the speech daemon at {self.endpoint}"
        logger.warning("%s (%d request(s) waiting, %d stream(s) open)", msg, len(self._pending), len(self._streams))
        for rid, fut in list(self._pending.items()):
            if not fut.done():
                fut.set_exception(DaemonError(msg, ErrorCode.UNAVAILABLE, rid))
        for key, q in list(self._streams.items()):
            q.put_nowait(P.Error(code=ErrorCode.UNAVAILABLE.value, message=msg, request_id=key, session_id=key))
            q.put_nowait(P.Closed(session_id=key, reason="daemon_gone"))

    def _dispatch(self, m: P.Message) -> None:
        rid = getattr(m, "request_id", "")
        fut = self._pending.get(rid) if rid else None
        if fut is not None and not fut.done() and not isinstance(m, (P.SynthAudio, P.Final, P.Closed)):
            fut.set_result(m)
            return
        key = getattr(m, "session_id", "") or rid
        if isinstance(m, (P.SynthAudio, P.Done, P.Cancelled)) or (isinstance(m, P.Error) and not getattr(m, "session_id", "")):
            key = rid
        q = self._streams.get(key)
        if q is not None:
            q.put_nowait(m)
        else:
            logger.debug("ignoring %s not addressed to us (%r)", m.TYPE.value, key)

    async def send(self, msg: P.Message) -> None:
        await self.connect()
        assert self._sock is not None
        try:
            await self._sock.send_multipart(P.dealer_frames(msg), flags=zmq.DONTWAIT)
        except zmq.Again:
            raise DaemonError(f"daemon at {self.endpoint} is not reading (send queue full)", ErrorCode.UNAVAILABLE) from None

    async def request(self, msg: P.Message, timeout: Optional[float] = None) -> P.Message:
        rid = getattr(msg, "request_id", "") or new_id()
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self.send(msg)
            m = await asyncio.wait_for(fut, self.timeout if timeout is None else timeout)
        except asyncio.TimeoutError:
            await self.reconnect()
            raise DaemonError(f"no reply to {msg.TYPE.value} within {self.timeout if timeout is None else timeout:g} s",
                              ErrorCode.TIMEOUT, rid) from None
        finally:
            self._pending.pop(rid, None)
        if isinstance(m, P.Error):
            raise DaemonError.from_reply(m)
        return m

    async def ping(self, timeout: Optional[float] = None) -> float:
        t0 = time.monotonic()
        await self.request(P.Ping(request_id=new_id()), timeout)
        return time.monotonic() - t0

    async def describe(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        return (await self.request(P.Describe(request_id=new_id()), timeout)).info  # type: ignore[attr-defined]


class AsyncASRStream:
    """One ASR session: send audio, read typed events (SpeechStart, Partial, Final, Closed, Error)."""

    def __init__(self, client: "AsyncASRClient", session_id: str, capabilities: Dict[str, Any], queue: asyncio.Queue):
        self.client = client
        self.session_id = session_id
        self.capabilities = capabilities
        self.queue = queue
        self.seq = 0
        self.closed = False

    async def send(self, pcm: bytes, ack: bool = False) -> int:
        seq = self.seq
        await self.client.send(P.Audio(session_id=self.session_id, seq=seq, pcm=bytes(pcm), ack=ack))
        self.seq += 1
        return seq

    async def next_event(self, timeout: Optional[float] = None) -> Optional[P.Message]:
        """Next event, or None after timeout seconds (None = wait forever)."""
        try:
            m = await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if isinstance(m, P.Closed):
            self.closed = True
            self.client._streams.pop(self.session_id, None)
        return m

    async def events(self) -> AsyncIterator[P.Message]:
        """Every event until the session closes (the Closed event is yielded last)."""
        while True:
            m = await self.next_event()
            if m is None:
                continue
            yield m
            if isinstance(m, P.Closed):
                return

    async def _until_closed(self, timeout: Optional[float]) -> List[P.Message]:
        out: List[P.Message] = []
        deadline = time.monotonic() + (self.client.timeout if timeout is None else timeout)
        while not self.closed:
            m = await self.next_event(max(0.0, deadline - time.monotonic()))
            if m is None:
                raise DaemonError("session did not close in time", ErrorCode.TIMEOUT, session_id=self.session_id)
            out.append(m)
            if isinstance(m, P.Error) and m.code in (ErrorCode.NO_SESSION.value, ErrorCode.NOT_OWNER.value):
                raise DaemonError.from_reply(m)
        return out

    async def finalize(self, timeout: Optional[float] = None) -> List[P.Message]:
        """Flush; returns the remaining events (last Final, then Closed)."""
        await self.client.send(P.Finalize(session_id=self.session_id, request_id=new_id()))
        return await self._until_closed(timeout)

    async def reset(self, timeout: Optional[float] = None) -> None:
        await self.client.request(P.Reset(session_id=self.session_id, request_id=new_id()), timeout)

    async def close(self, timeout: Optional[float] = None) -> List[P.Message]:
        if self.closed:
            return []
        await self.client.send(P.Close(session_id=self.session_id, request_id=new_id()))
        return await self._until_closed(timeout)


class AsyncASRClient(AsyncClient):
    async def open(self, session_id: Optional[str] = None, language: Optional[str] = None,
                   hotwords: Optional[Sequence[str]] = None, sample_rate: int = P.ASR_SAMPLE_RATE,
                   partials: bool = True, timeout: Optional[float] = None,
                   tentative: bool = False) -> AsyncASRStream:
        sid = session_id or new_id()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[sid] = q
        try:
            opened = await self.request(P.Open(session_id=sid, request_id=new_id(), language=language,
                                               hotwords=tuple(hotwords) if hotwords is not None else None,
                                               sample_rate=sample_rate, partials=partials, tentative=tentative),
                                        timeout)
        except BaseException:
            self._streams.pop(sid, None)
            raise
        return AsyncASRStream(self, sid, dict(opened.capabilities), q)  # type: ignore[attr-defined]


class AsyncTTSClient(AsyncClient):
    async def synthesize(self, text: str, language: Optional[str] = None, speed: Optional[float] = None,
                         stream: bool = True, request_id: Optional[str] = None,
                         timeout: Optional[float] = None) -> AsyncIterator[P.SynthAudio]:
        """Async iterator of audio chunks until `done`/`cancelled`; DaemonError on error/timeout.
        Breaking out of the loop early cancels the request in the daemon."""
        rid = request_id or new_id()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = q
        finished = False
        try:
            await self.send(P.Synthesize(request_id=rid, text=text, language=language, speed=speed, stream=stream))
            while True:
                try:
                    m = await asyncio.wait_for(q.get(), self.timeout if timeout is None else timeout)
                except asyncio.TimeoutError:
                    raise DaemonError("no audio in time", ErrorCode.TIMEOUT, rid) from None
                if isinstance(m, P.Error):
                    finished = True
                    raise DaemonError.from_reply(m)
                if isinstance(m, (P.Done, P.Cancelled)):
                    finished = True
                    return
                if isinstance(m, P.SynthAudio):
                    yield m
        finally:
            self._streams.pop(rid, None)
            if not finished and self._sock is not None:
                try:
                    await self.send(P.Cancel(request_id=rid))
                except DaemonError:
                    pass

    async def speak(self, text: str, **kw: Any) -> Tuple[bytes, int]:
        pcm, rate = [], 24000
        async for chunk in self.synthesize(text, **kw):
            pcm.append(chunk.pcm)
            rate = chunk.sample_rate
        return b"".join(pcm), rate

    async def cancel(self, request_id: str, timeout: Optional[float] = None) -> None:
        """Ask the daemon to stop; the stream's iterator then ends (no more chunks arrive)."""
        q = self._streams.get(request_id)
        fut_rid = request_id
        fut = asyncio.get_running_loop().create_future()
        # The `cancelled` reply goes to the stream (which ends) and to this waiter.
        self._pending[fut_rid] = fut
        try:
            await self.send(P.Cancel(request_id=request_id))
            m = await asyncio.wait_for(fut, self.timeout if timeout is None else timeout)
        except asyncio.TimeoutError:
            raise DaemonError("no reply to cancel", ErrorCode.TIMEOUT, request_id) from None
        finally:
            self._pending.pop(fut_rid, None)
        if q is not None:
            q.put_nowait(m)
        if isinstance(m, P.Error):
            raise DaemonError.from_reply(m)
