"""asyncio shell of the client library (`AsyncASRClient`, `AsyncTTSClient`) over the sans-I/O
core (daemon/wire/client_core.py); see daemon/wire/client.py for what both shells do. One reader
task hands the socket's replies to the core and wakes whoever waits on the keys they woke; a
monitor task turns a lost connection into errors for waiting requests and open streams. The
bridge shares one of each per process."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type

import zmq
import zmq.asyncio

from daemon.wire import protocol as P
from daemon.wire.client_base import (DEFAULT_TIMEOUT, DaemonError, Reachability, _socket,
                                     endpoint_error, new_id, send_queue_full)
from daemon.wire.client_core import ASRStreamState, ClientCore, SynthStreamState

logger = logging.getLogger(__name__)


class _Waker:
    """Wakes the tasks waiting on one key (a request id, a stream's key)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.waiting = 0


class AsyncClient:
    """asyncio DEALER client; base of AsyncASRClient and AsyncTTSClient."""

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT, identity: Optional[bytes] = None,
                 context: Optional[zmq.asyncio.Context] = None, reconnect_on_timeout: bool = True):
        self.core = ClientCore(endpoint, identity, keep_unclaimed=False)
        self.endpoint = endpoint
        self.timeout = timeout
        # A timed-out request reconnects the socket (dropping what was queued for a daemon that
        # went away). A client shared by many users (the bridge's) turns this off: a reconnect
        # would fail everyone else's requests in flight; ZeroMQ reconnects to a restarted daemon.
        self.reconnect_on_timeout = reconnect_on_timeout
        self.identity = self.core.identity
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: Optional[zmq.asyncio.Socket] = None
        self._reader: Optional[asyncio.Task] = None
        self._watcher: Optional[asyncio.Task] = None
        self._monitor: Optional[zmq.asyncio.Socket] = None
        self._conn = Reachability()
        self._wakers: Dict[str, _Waker] = {}  # keys someone waits on

    @property
    def reachable(self) -> Optional[bool]:
        """From the socket monitor: True once connected, False while ZeroMQ's connects fail (a
        killed daemon's stale ipc file refuses them), None before either; a stopped daemon stays True."""
        return self._conn.reachable

    async def connect(self) -> "AsyncClient":
        if self._sock is None:
            sock, self._monitor = _socket(self._ctx, self.endpoint, self.identity)
            self._sock = sock
            loop = asyncio.get_running_loop()
            self._reader = loop.create_task(self._read(sock), name="s2s-client-reader")
            self._watcher = loop.create_task(self._watch(self._monitor), name="s2s-client-monitor")
        return self

    async def close(self) -> None:
        await self._disconnect()
        self._wake(self.core.fail_requests("client closed"))

    async def _disconnect(self) -> None:
        for task in (self._reader, self._watcher):
            if task is not None and task is not asyncio.current_task():
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
        self._conn.reachable = None

    async def reconnect(self) -> None:
        """New socket, same identity (sessions stay ours, streams stay attached); pending requests fail."""
        await self._disconnect()
        self._wake(self.core.fail_requests("the client reconnected"))
        await self.connect()

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # --- I/O -----------------------------------------------------------------------------------

    def _wake(self, keys: Iterable[str]) -> None:
        for key in keys:
            w = self._wakers.get(key)
            if w is not None:
                w.event.set()

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            self._wake(self.core.receive(await sock.recv_multipart()))
            for m in self.core.outgoing():
                try:
                    await self.send(m)
                except DaemonError:
                    pass

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            ev = (await recv_monitor_message(monitor))["event"]  # type: ignore[misc]
            if ev == zmq.EVENT_MONITOR_STOPPED:
                return
            if self._conn.event(ev):
                self._wake(self.core.connection_lost())

    async def _wait(self, key: str, ready: Callable[[], bool], timeout: Optional[float]) -> bool:
        """Until ready() (True) or timeout seconds pass (None: forever); woken by replies for key."""
        if ready():
            return True
        w = self._wakers.get(key)
        if w is None:
            w = self._wakers[key] = _Waker()
        w.waiting += 1
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not ready():
                w.event.clear()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                try:
                    await asyncio.wait_for(w.event.wait(), left)
                except asyncio.TimeoutError:
                    return ready()
            return True
        finally:
            w.waiting -= 1
            if not w.waiting and self._wakers.get(key) is w:
                del self._wakers[key]

    async def send(self, msg: P.Message) -> None:
        err = endpoint_error(self.endpoint, msg)
        if err is not None:
            raise err
        await self.connect()
        assert self._sock is not None
        try:
            await self._sock.send_multipart(self.core.frames(msg), flags=zmq.DONTWAIT)
        except zmq.Again:
            raise send_queue_full(self.endpoint) from None

    async def request(self, msg: P.Message, timeout: Optional[float] = None,
                      reply_types: Optional[Tuple[Type[P.Message], ...]] = None) -> P.Message:
        """Send msg and wait for its reply (reply_types, or the core's default for msg); an
        `error` reply raises DaemonError."""
        rid = self.core.expect(msg, reply_types)
        timeout = self.timeout if timeout is None else timeout
        try:
            await self.send(msg)
            if not await self._wait(rid, lambda: self.core.answered(rid), timeout):
                await self._timed_out()
                raise self.core.timeout_error(msg, timeout)
            return self.core.reply(rid)
        finally:
            self.core.forget(rid)

    async def _timed_out(self) -> None:
        if self.reconnect_on_timeout:
            await self.reconnect()

    async def ping(self, timeout: Optional[float] = None) -> float:
        t0 = time.monotonic()
        await self.request(P.Ping(request_id=new_id()), timeout)
        return time.monotonic() - t0

    async def describe(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        return (await self.request(P.Describe(request_id=new_id()), timeout)).info  # type: ignore[attr-defined]


class AsyncASRStream(ASRStreamState):
    """One ASR session: send audio, read typed events (SpeechStart, Partial, Final, Closed, Error)."""

    def __init__(self, client: "AsyncASRClient", session_id: str, capabilities: Dict[str, Any]):
        super().__init__(client.core, session_id, capabilities)
        self.client = client

    async def send(self, pcm: bytes, ack: bool = False) -> int:
        await self.client.send(self.audio(pcm, ack))
        return self.sent()

    async def next_event(self, timeout: Optional[float] = None) -> Optional[P.Message]:
        """Next event, or None after timeout seconds (None = wait forever)."""
        core, key = self.client.core, self.session_id
        if not await self.client._wait(key, lambda: core.has_events(key), timeout):
            return None
        return self.seen(core.next_event(key))  # type: ignore[arg-type]

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
                raise self.close_timeout()
            out.append(m)
            self.closing(m)
        return out

    async def finalize(self, timeout: Optional[float] = None) -> List[P.Message]:
        """Flush; returns the remaining events (last Final, then Closed)."""
        await self.client.send(self.finalize_msg())
        return await self._until_closed(timeout)

    async def reset(self, timeout: Optional[float] = None) -> None:
        await self.client.request(self.reset_msg(), timeout)

    async def close(self, timeout: Optional[float] = None) -> List[P.Message]:
        if self.closed:
            return []
        await self.client.send(self.close_msg())
        return await self._until_closed(timeout)

    async def abandon(self) -> None:
        """Detach and close the session at the daemon without waiting (errors ignored): for a
        reader that goes away (a browser that hung up) while the session may be open."""
        m = self.abandon_msg()
        if m is not None:
            try:
                await self.client.send(m)
            except DaemonError:
                pass


class AsyncASRClient(AsyncClient):
    async def open(self, session_id: Optional[str] = None, language: Optional[str] = None,
                   hotwords: Optional[Sequence[str]] = None, sample_rate: int = P.ASR_SAMPLE_RATE,
                   partials: bool = True, timeout: Optional[float] = None,
                   tentative: bool = False) -> AsyncASRStream:
        msg = self.core.open(session_id, language, hotwords, sample_rate, partials, tentative)
        try:
            opened = await self.request(msg, timeout)
        except BaseException:
            self.core.detach(msg.session_id)
            raise
        return AsyncASRStream(self, msg.session_id, dict(opened.capabilities))  # type: ignore[attr-defined]


class AsyncSynthStream(SynthStreamState):
    """One synthesis request (`AsyncTTSClient.synthesize_stream`): `send` text as it comes,
    `end` it; `async for chunk in stream` yields its audio until `done` (DaemonError on an
    error). Until `end` the wait for audio has no client-side timeout (the text may pause; the
    daemon ends an idle request after limits.text_idle_timeout); after it, `timeout` between
    chunks. Leaving the loop early, or `cancel()`, cancels the request at the daemon."""

    def __init__(self, client: "AsyncTTSClient", request_id: str, timeout: float, ended: bool = False):
        super().__init__(client.core, request_id, timeout, ended)
        self.client = client

    async def send(self, text: str, final: bool = False, release: bool = False, drop_partial: bool = False) -> None:
        """More text (final: the last; release: a held request goes on; drop_partial: the text
        after the last complete sentence is dropped first)."""
        await self.client.send(self.text(text, final, release, drop_partial))

    async def end(self, text: str = "", release: bool = False, drop_partial: bool = False) -> None:
        await self.send(text, final=True, release=release, drop_partial=drop_partial)

    async def release(self) -> None:
        """A held request (hold=True) goes on past its first sentence (also after `end`)."""
        m = self.release_msg()
        if m is not None:
            await self.client.send(m)

    async def cancel(self) -> None:
        """Stop it at the daemon, not waiting for the answer (the iterator ends at `cancelled`)."""
        m = self.cancel_msg()
        if m is not None:
            try:
                await self.client.send(m)
            except DaemonError:
                pass

    def __aiter__(self) -> AsyncIterator[P.SynthAudio]:
        return self.audio()

    async def audio(self) -> AsyncGenerator[P.SynthAudio, None]:
        c = self.client
        try:
            while not self.finished:
                if not await c._wait(self.request_id, self.has_news, self.wait_limit()):
                    await c._timed_out()
                    raise self.timeout_error()
                chunk = self.next_chunk()
                if chunk is not None:
                    yield chunk
        finally:
            m = self.left_msg()
            if m is not None and c._sock is not None:
                try:
                    await c.send(m)
                except DaemonError:
                    pass


class AsyncTTSClient(AsyncClient):
    async def synthesize_stream(self, request_id: Optional[str] = None, text: str = "",
                                language: Optional[str] = None, speed: Optional[float] = None, stream: bool = True,
                                owner: str = "", hold: bool = False,
                                timeout: Optional[float] = None) -> AsyncSynthStream:
        """Open a streamed-text request (the daemon cuts sentences as the text arrives and speaks
        each at once); `text` is its first chunk. hold: only the first sentence until `release()`."""
        msg = self.core.synthesize(text, language, speed, stream, request_id, owner, stream_text=True, hold=hold)
        try:
            await self.send(msg)
        except BaseException:
            self.core.detach(msg.request_id)
            raise
        return AsyncSynthStream(self, msg.request_id, self.timeout if timeout is None else timeout)

    async def synthesize(self, text: str, language: Optional[str] = None, speed: Optional[float] = None,
                         stream: bool = True, request_id: Optional[str] = None,
                         timeout: Optional[float] = None, owner: str = "") -> AsyncIterator[P.SynthAudio]:
        """Async iterator of audio chunks until `done`/`cancelled`; DaemonError on error/timeout.
        Breaking out of the loop early cancels the request in the daemon. owner: who it is for
        (the daemon is fair across owners of one peer)."""
        msg = self.core.synthesize(text, language, speed, stream, request_id, owner)
        s = AsyncSynthStream(self, msg.request_id, self.timeout if timeout is None else timeout, ended=True)
        try:
            await self.send(msg)
        except BaseException:
            self.core.detach(msg.request_id)
            raise
        gen = s.audio()
        try:
            async for chunk in gen:
                yield chunk
        finally:
            await gen.aclose()

    async def speak(self, text: str, **kw: Any) -> Tuple[bytes, int]:
        pcm, rate = [], 24000
        async for chunk in self.synthesize(text, **kw):
            pcm.append(chunk.pcm)
            rate = chunk.sample_rate
        return b"".join(pcm), rate

    async def cancel(self, request_id: str, timeout: Optional[float] = None) -> None:
        """Ask the daemon to stop and wait for `cancelled` (the stream's iterator then ends)."""
        await self.request(P.Cancel(request_id=request_id), timeout)
