"""Client library for the speech daemon: blocking (`ASRClient`, `TTSClient`) and asyncio
(`AsyncASRClient`, `AsyncTTSClient`) flavours, both speaking daemon.wire.protocol.

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

import logging
import time
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import zmq

from daemon.wire import protocol as P
from daemon.wire.client_async import AsyncASRClient, AsyncASRStream, AsyncClient, AsyncSynthStream, AsyncTTSClient
from daemon.wire.client_base import DEFAULT_TIMEOUT, HWM, DaemonError, _decode, _socket, missing_endpoint, new_id
from daemon.errors import ErrorCode

logger = logging.getLogger(__name__)

__all__ = ["ASRClient", "ASRStream", "AsyncASRClient", "AsyncASRStream", "AsyncClient", "AsyncSynthStream",
           "AsyncTTSClient",
           "Client", "DEFAULT_TIMEOUT", "DaemonError", "HWM", "SynthStream", "TTSClient", "missing_endpoint",
           "new_id"]


_C = TypeVar("_C", bound="Client")


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

    def __enter__(self: "_C") -> "_C":
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
                   timeout: Optional[float] = None, owner: str = "") -> Iterator[P.SynthAudio]:
        """Yield audio chunks until `done`; raises DaemonError on an error reply or a timeout
        between chunks. owner: who it is for (the daemon is fair across owners of one peer)."""
        rid = request_id or new_id()
        self.send(P.Synthesize(request_id=rid, text=text, language=language, speed=speed, stream=stream,
                               owner=owner))
        timeout = self.timeout if timeout is None else timeout
        finished = False
        try:
            while True:
                m = self.recv(timeout)
                if m is None:
                    finished = True
                    self.reconnect()
                    raise DaemonError(f"no audio within {timeout:g} s", ErrorCode.TIMEOUT, rid)
                if getattr(m, "request_id", None) != rid:
                    continue  # not ours (a cancelled request's late chunk, ...)
                if isinstance(m, P.Error):
                    finished = True
                    raise DaemonError.from_reply(m)
                if isinstance(m, P.SynthAudio):
                    yield m
                elif isinstance(m, (P.Done, P.Cancelled)):
                    finished = True
                    return
        finally:
            if not finished:
                # Left early (break, exception in the caller): the daemon stops synthesising, as
                # with the asyncio client; its late chunks are ignored by request id.
                try:
                    self.send(P.Cancel(request_id=rid))
                except DaemonError:
                    pass

    def synthesize_stream(self, request_id: Optional[str] = None, text: str = "", language: Optional[str] = None,
                          speed: Optional[float] = None, stream: bool = True, owner: str = "",
                          hold: bool = False, timeout: Optional[float] = None) -> "SynthStream":
        """Open a streamed-text request: `send` text as it comes, `end` it, iterate its audio (see
        AsyncSynthStream for the rules both clients follow)."""
        rid = request_id or new_id()
        self.send(P.Synthesize(request_id=rid, text=text, language=language, speed=speed, stream=stream,
                               owner=owner, stream_text=True, hold=hold))
        return SynthStream(self, rid, self.timeout if timeout is None else timeout)

    def speak(self, text: str, **kw: Any) -> Tuple[bytes, int]:
        """Whole utterance: (PCM16 bytes, sample rate)."""
        pcm, rate = [], 24000
        for chunk in self.synthesize(text, **kw):
            pcm.append(chunk.pcm)
            rate = chunk.sample_rate
        return b"".join(pcm), rate

    def cancel(self, request_id: str, timeout: Optional[float] = None) -> None:
        self.request(P.Cancel(request_id=request_id), (P.Cancelled,), timeout)


class SynthStream:
    """A streamed-text request on a blocking TTSClient: `send`/`end`/`release`/`cancel`; `poll()`
    returns the audio received so far, iterating reads it until `done` (DaemonError on an error;
    `timeout` between chunks once the text has ended, none before: the daemon ends an idle one)."""

    def __init__(self, client: TTSClient, request_id: str, timeout: float):
        self.client = client
        self.request_id = request_id
        self.timeout = timeout
        self.ended = False
        self.released = False
        self.finished = False

    def send(self, text: str, final: bool = False, release: bool = False, drop_partial: bool = False) -> None:
        if self.ended:
            raise DaemonError("the text has ended", ErrorCode.BAD_REQUEST, self.request_id)
        self.ended = self.ended or final
        self.released = self.released or release
        self.client.send(P.TextChunk(request_id=self.request_id, text=text, final=final, release=release,
                                     drop_partial=drop_partial))

    def end(self, text: str = "", release: bool = False, drop_partial: bool = False) -> None:
        self.send(text, final=True, release=release, drop_partial=drop_partial)

    def release(self) -> None:
        """A held request goes on past its first sentence (also after `end`)."""
        if not self.released and not self.finished:
            self.released = True
            self.client.send(P.TextChunk(request_id=self.request_id, release=True))

    def cancel(self) -> None:
        if not self.finished:
            self.client.send(P.Cancel(request_id=self.request_id))

    def _one(self, timeout: Optional[float]) -> Optional[P.Message]:
        """Our next message within timeout (None: none came); others' are dropped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            m = self.client.recv(left)
            if m is None:
                return None
            if getattr(m, "request_id", None) != self.request_id:
                continue
            if isinstance(m, P.Error):
                self.finished = True
                raise DaemonError.from_reply(m)
            if isinstance(m, (P.Done, P.Cancelled)):
                self.finished = True
            return m

    def poll(self, timeout: float = 0.0) -> List[P.SynthAudio]:
        """Audio chunks that arrived so far (waiting up to timeout for the first)."""
        out: List[P.SynthAudio] = []
        wait: Optional[float] = timeout
        while not self.finished:
            m = self._one(wait)
            if m is None:
                break
            if isinstance(m, P.SynthAudio):
                out.append(m)
            wait = 0.0
        return out

    def __iter__(self) -> Iterator[P.SynthAudio]:
        while not self.finished:
            m = self._one(self.timeout if self.ended else None)
            if m is None:
                self.finished = True
                raise DaemonError(f"no audio within {self.timeout:g} s", ErrorCode.TIMEOUT, self.request_id)
            if isinstance(m, P.SynthAudio):
                yield m

