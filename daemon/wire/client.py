"""Client library for the speech daemon: blocking (`ASRClient`, `TTSClient`) and asyncio
(`AsyncASRClient`, `AsyncTTSClient`) flavours, both speaking daemon.wire.protocol.

One sans-I/O core (daemon/wire/client_core.py: ids, messages checked before they leave, reply
matching, error mapping, stream state) under two thin I/O shells, this blocking one and the
asyncio one (daemon/wire/client_async.py), with the same features:

Each client is one DEALER socket with a random uuid identity (kept across reconnects, so
sessions stay ours), LINGER 0 and high-water marks. A send to an ipc:// socket file that does
not exist fails at once (`unavailable`). A socket monitor watches the connection: when the
daemon goes away (crash, SIGKILL, restart), waiting requests fail at once with `unavailable`,
and every open stream gets an `error` (unavailable) followed by `closed` with reason
"daemon_gone" (the daemon's sessions died with it), instead of waiting for timeouts that audio
streams do not have; `reachable` says what the monitor saw. Requests carry a request id;
replies that are not ours (an old request's late answer, another session) are ignored. Timeouts
raise `DaemonError(code=timeout)`; a timeout also reconnects the socket, dropping anything
queued for a daemon that went away (`reconnect_on_timeout=False` turns that off for a client
shared by many users, whose requests in flight a reconnect would fail). Errors from the daemon
raise `DaemonError` with its stable `code` (daemon.errors.ErrorCode) and `retry_after` for
`busy`. An `opened` that arrives after its `open` timed out is closed by the client. A stream
nobody will read again is `detach()`ed (its late events are dropped), or `abandon()`ed
(detached and closed at the daemon without waiting).

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
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type, TypeVar

import zmq
from zmq.utils.monitor import recv_monitor_message

from daemon.wire import protocol as P
from daemon.wire.client_async import AsyncASRClient, AsyncASRStream, AsyncClient, AsyncSynthStream, AsyncTTSClient
from daemon.wire.client_base import (DEFAULT_TIMEOUT, HWM, DaemonError, Reachability, _socket,
                                     endpoint_error, missing_endpoint, new_id, send_queue_full)
from daemon.wire.client_core import ASRStreamState, ClientCore, SynthStreamState
from daemon.errors import ErrorCode

logger = logging.getLogger(__name__)

__all__ = ["ASRClient", "ASRStream", "AsyncASRClient", "AsyncASRStream", "AsyncClient", "AsyncSynthStream",
           "AsyncTTSClient",
           "Client", "DEFAULT_TIMEOUT", "DaemonError", "HWM", "SynthStream", "TTSClient", "missing_endpoint",
           "new_id"]


_C = TypeVar("_C", bound="Client")


class Client:
    """Blocking shell: a DEALER socket and its monitor, polled while a caller waits; base of
    ASRClient and TTSClient."""

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT, identity: Optional[bytes] = None,
                 context: Optional[zmq.Context] = None, reconnect_on_timeout: bool = True):
        self.core = ClientCore(endpoint, identity)
        self.endpoint = endpoint
        self.timeout = timeout
        self.identity = self.core.identity
        self.reconnect_on_timeout = reconnect_on_timeout
        self._ctx = context or zmq.Context.instance()
        self._conn = Reachability()
        self._sock: Optional[zmq.Socket] = None
        self._monitor: Optional[zmq.Socket] = None
        self._poller = zmq.Poller()
        self._connect()

    @property
    def reachable(self) -> Optional[bool]:
        """What the socket monitor saw (see client_base.Reachability), read now."""
        self._watch()
        return self._conn.reachable

    def _connect(self) -> None:
        self._sock, self._monitor = _socket(self._ctx, self.endpoint, self.identity)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def _disconnect(self) -> None:
        if self._sock is not None:
            if self._monitor is not None:
                self._sock.disable_monitor()
                self._monitor.close(linger=0)
            self._sock.close(linger=0)
        self._sock = self._monitor = None
        self._conn.reachable = None

    def close(self) -> None:
        self._disconnect()
        self.core.fail_requests("client closed")

    def __enter__(self: "_C") -> "_C":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def reconnect(self) -> None:
        """New socket, same identity: drops stale queued traffic, keeps session ownership."""
        self._disconnect()
        self.core.fail_requests("the client reconnected")
        self._connect()

    def send(self, msg: P.Message) -> None:
        err = endpoint_error(self.endpoint, msg)
        if err is not None:
            raise err
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        try:
            self._sock.send_multipart(self.core.frames(msg), flags=zmq.DONTWAIT)
        except zmq.Again:
            raise send_queue_full(self.endpoint) from None

    def _pump(self, timeout: Optional[float]) -> bool:
        """Read what arrives within timeout seconds (None: wait) into the core; False if nothing did."""
        if self._sock is None:
            self._connect()
        ready = dict(self._poller.poll(None if timeout is None else max(0, int(timeout * 1000))))
        if not ready:
            return False
        if self._monitor is not None and self._monitor in ready:
            self._watch()
        if self._sock is not None and self._sock in ready:
            while self._sock.poll(0):
                self.core.receive(self._sock.recv_multipart())
        for m in self.core.outgoing():
            try:
                self.send(m)
            except DaemonError:
                pass
        return True

    def _watch(self) -> None:
        """The monitor's events so far; a lost connection ends requests and streams."""
        while self._monitor is not None and self._monitor.poll(0):
            if self._conn.event(recv_monitor_message(self._monitor)["event"]):
                self.core.connection_lost()

    def _wait(self, ready: Callable[[], bool], timeout: Optional[float]) -> bool:
        """Read replies until ready() (True) or timeout seconds pass (None: wait forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self._pump(0)  # what is here already
                return ready()
            self._pump(left)
        return True

    def _timed_out(self) -> None:
        if self.reconnect_on_timeout:
            self.reconnect()

    def recv(self, timeout: Optional[float]) -> Optional[P.Message]:
        """Next reply no request or stream of this client claims, within timeout seconds (None =
        wait forever); None on timeout. For messages sent with `send`."""
        core = self.core
        if self._wait(lambda: bool(core.unclaimed), timeout):
            return core.unclaimed.popleft()
        return None

    def request(self, msg: P.Message, reply_types: Optional[Tuple[Type[P.Message], ...]] = None,
                timeout: Optional[float] = None) -> P.Message:
        """Send msg and wait for its reply (reply_types, or the core's default for msg); an
        `error` reply raises DaemonError."""
        rid = self.core.expect(msg, reply_types)
        timeout = self.timeout if timeout is None else timeout
        try:
            self.send(msg)
            if not self._wait(lambda: self.core.answered(rid), timeout):
                self._timed_out()
                raise self.core.timeout_error(msg, timeout)
            return self.core.reply(rid)
        finally:
            self.core.forget(rid)

    def ping(self, timeout: Optional[float] = None) -> float:
        """Round-trip time in seconds."""
        t0 = time.monotonic()
        self.request(P.Ping(request_id=new_id()), timeout=timeout)
        return time.monotonic() - t0

    def describe(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        return self.request(P.Describe(request_id=new_id()), timeout=timeout).info  # type: ignore[attr-defined]


class ASRStream(ASRStreamState):
    """One open ASR session on a blocking ASRClient."""

    def __init__(self, client: "ASRClient", session_id: str, capabilities: Dict[str, Any]):
        super().__init__(client.core, session_id, capabilities)
        self.client = client

    def send(self, pcm: bytes, ack: bool = False) -> int:
        """Queue one PCM16 chunk; returns its seq. Events arrive asynchronously (poll())."""
        self.client.send(self.audio(pcm, ack))
        return self.sent()

    def poll(self, timeout: Optional[float] = 0.0) -> List[P.Message]:
        """Events (SpeechStart/Partial/Final/Closed/Error/Ack) of this session received so far,
        waiting up to timeout for the first one."""
        c, key = self.client, self.session_id
        c._wait(lambda: c.core.has_events(key) or not c.core.attached(key), timeout)
        while c._pump(0):  # and whatever else is already here, without waiting
            pass
        return [self.seen(m) for m in c.core.events(key)]

    def wait_ack(self, seq: int, timeout: Optional[float] = None) -> List[P.Message]:
        """Wait for the `ack` of an audio chunk sent with ack=True; returns events seen meanwhile."""
        out: List[P.Message] = []
        deadline = time.monotonic() + (self.client.timeout if timeout is None else timeout)
        while time.monotonic() < deadline and not self.closed:
            for m in self.poll(deadline - time.monotonic()):
                if isinstance(m, P.Ack) and m.of == "audio" and m.seq >= seq:
                    return out
                out.append(m)
        if self.closed:
            return out
        raise DaemonError(f"no ack for chunk {seq}", ErrorCode.TIMEOUT, session_id=self.session_id)

    def finalize(self, timeout: Optional[float] = None) -> List[P.Message]:
        """Flush; returns every remaining event, ending with Closed."""
        self.client.send(self.finalize_msg())
        return self._until_closed(timeout)

    def _until_closed(self, timeout: Optional[float]) -> List[P.Message]:
        out: List[P.Message] = []
        deadline = time.monotonic() + (self.client.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.close_timeout()
            for m in self.poll(left):
                out.append(m)
                if self.closing(m):
                    return out

    def reset(self, timeout: Optional[float] = None) -> None:
        self.client.request(self.reset_msg(), timeout=timeout)

    def close(self, timeout: Optional[float] = None) -> List[P.Message]:
        if self.closed:
            return []
        self.client.send(self.close_msg())
        return self._until_closed(timeout)

    def abandon(self) -> None:
        """Detach and close the session at the daemon without waiting (errors ignored)."""
        m = self.abandon_msg()
        if m is not None:
            try:
                self.client.send(m)
            except DaemonError:
                pass


class ASRClient(Client):
    def open(self, session_id: Optional[str] = None, language: Optional[str] = None,
             hotwords: Optional[Sequence[str]] = None, sample_rate: int = P.ASR_SAMPLE_RATE, partials: bool = True,
             timeout: Optional[float] = None, tentative: bool = False) -> ASRStream:
        msg = self.core.open(session_id, language, hotwords, sample_rate, partials, tentative)
        try:
            opened = self.request(msg, timeout=timeout)
        except BaseException:
            self.core.detach(msg.session_id)
            raise
        return ASRStream(self, msg.session_id, dict(opened.capabilities))  # type: ignore[attr-defined]


class TTSClient(Client):
    def synthesize(self, text: str, language: Optional[str] = None, speed: Optional[float] = None,
                   stream: bool = True, request_id: Optional[str] = None,
                   timeout: Optional[float] = None, owner: str = "") -> Iterator[P.SynthAudio]:
        """Yield audio chunks until `done`; raises DaemonError on an error reply or a timeout
        between chunks. Leaving early cancels the request at the daemon. owner: who it is for
        (the daemon is fair across owners of one peer)."""
        msg = self.core.synthesize(text, language, speed, stream, request_id, owner)
        s = SynthStream(self, msg.request_id, self.timeout if timeout is None else timeout, ended=True)
        try:
            self.send(msg)
        except BaseException:
            self.core.detach(msg.request_id)
            raise
        yield from s

    def synthesize_stream(self, request_id: Optional[str] = None, text: str = "", language: Optional[str] = None,
                          speed: Optional[float] = None, stream: bool = True, owner: str = "",
                          hold: bool = False, timeout: Optional[float] = None) -> "SynthStream":
        """Open a streamed-text request: `send` text as it comes, `end` it, iterate its audio (see
        AsyncSynthStream for the rules both clients follow)."""
        msg = self.core.synthesize(text, language, speed, stream, request_id, owner, stream_text=True, hold=hold)
        try:
            self.send(msg)
        except BaseException:
            self.core.detach(msg.request_id)
            raise
        return SynthStream(self, msg.request_id, self.timeout if timeout is None else timeout)

    def speak(self, text: str, **kw: Any) -> Tuple[bytes, int]:
        """Whole utterance: (PCM16 bytes, sample rate)."""
        pcm, rate = [], 24000
        for chunk in self.synthesize(text, **kw):
            pcm.append(chunk.pcm)
            rate = chunk.sample_rate
        return b"".join(pcm), rate

    def cancel(self, request_id: str, timeout: Optional[float] = None) -> None:
        """Ask the daemon to stop and wait for `cancelled` (the stream's iterator then ends)."""
        self.request(P.Cancel(request_id=request_id), timeout=timeout)


class SynthStream(SynthStreamState):
    """A synthesis request on a blocking TTSClient: `send`/`end`/`release`/`cancel`; `poll()`
    returns the audio received so far, iterating reads it until `done` (DaemonError on an error;
    `timeout` between chunks once the text has ended, none before: the daemon ends an idle one).
    Leaving the iteration early cancels the request at the daemon."""

    def __init__(self, client: TTSClient, request_id: str, timeout: float, ended: bool = False):
        super().__init__(client.core, request_id, timeout, ended)
        self.client = client

    def send(self, text: str, final: bool = False, release: bool = False, drop_partial: bool = False) -> None:
        self.client.send(self.text(text, final, release, drop_partial))

    def end(self, text: str = "", release: bool = False, drop_partial: bool = False) -> None:
        self.send(text, final=True, release=release, drop_partial=drop_partial)

    def release(self) -> None:
        """A held request goes on past its first sentence (also after `end`)."""
        m = self.release_msg()
        if m is not None:
            self.client.send(m)

    def cancel(self) -> None:
        m = self.cancel_msg()
        if m is not None:
            self.client.send(m)

    def poll(self, timeout: float = 0.0) -> List[P.SynthAudio]:
        """Audio chunks that arrived so far (waiting up to timeout for the first)."""
        out: List[P.SynthAudio] = []
        wait = timeout
        while not self.finished and self.client._wait(self.has_news, wait):
            chunk = self.next_chunk()
            if chunk is not None:
                out.append(chunk)
            wait = 0.0
        return out

    def __iter__(self) -> Iterator[P.SynthAudio]:
        try:
            while not self.finished:
                if not self.client._wait(self.has_news, self.wait_limit()):
                    self.client._timed_out()
                    raise self.timeout_error()
                chunk = self.next_chunk()
                if chunk is not None:
                    yield chunk
        finally:
            m = self.left_msg()
            if m is not None and self.client._sock is not None:
                try:
                    self.client.send(m)
                except DaemonError:
                    pass
