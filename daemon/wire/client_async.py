"""asyncio client for the speech daemon (`AsyncASRClient`, `AsyncTTSClient`); see daemon/wire/client.py
for the protocol notes both clients follow. The bridge shares one of each per process."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncGenerator, AsyncIterator, Dict, List, Optional, Sequence, Tuple, cast

import zmq
import zmq.asyncio

from daemon.wire import protocol as P
from daemon.wire.client_base import DEFAULT_TIMEOUT, DaemonError, _decode, _socket, new_id
from daemon.errors import ErrorCode

logger = logging.getLogger(__name__)


class AsyncClient:
    """asyncio DEALER client: one reader task routes replies to waiting requests and streams;
    a monitor task turns a lost connection into errors for them (see the module docstring)."""

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT, identity: Optional[bytes] = None,
                 context: Optional[zmq.asyncio.Context] = None, reconnect_on_timeout: bool = True):
        self.endpoint = endpoint
        self.timeout = timeout
        # A timed-out request reconnects the socket (dropping what was queued for a daemon that
        # went away). A client shared by many users (the bridge's) turns this off: a reconnect
        # would fail everyone else's requests in flight; ZeroMQ reconnects to a restarted daemon.
        self.reconnect_on_timeout = reconnect_on_timeout
        self.identity = identity or f"s2s-{new_id()}".encode()
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: Optional[zmq.asyncio.Socket] = None
        self._reader: Optional[asyncio.Task] = None
        self._watcher: Optional[asyncio.Task] = None
        self._monitor: Optional[zmq.asyncio.Socket] = None
        self._pending: Dict[str, asyncio.Future] = {}
        self._streams: Dict[str, asyncio.Queue] = {}
        # From the socket monitor: True once connected, False while ZeroMQ's connects fail (a
        # killed daemon's stale ipc file refuses them), None before either; a stopped daemon stays True.
        self.reachable: Optional[bool] = None
        self._closers: set = set()   # tasks closing sessions nobody waits for (late `opened`)

    async def connect(self) -> "AsyncClient":
        if self._sock is None:
            # An asyncio context makes asyncio sockets; _socket is typed for the blocking ones.
            sock = cast(zmq.asyncio.Socket, _socket(self._ctx, self.endpoint, self.identity))  # type: ignore[arg-type]
            self._sock = sock
            loop = asyncio.get_running_loop()
            self._reader = loop.create_task(self._read(), name="s2s-client-reader")
            self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED
                                                    | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CLOSED)
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
        self.reachable = None
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
                self.reachable = False
                self._connection_lost()
            elif ev["event"] == zmq.EVENT_CONNECTED:
                self.reachable = True
            elif ev["event"] in (zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_CLOSED):
                self.reachable = False
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
        if isinstance(m, P.Opened):  # its open timed out: nobody will use or close the session
            logger.info("closing session %s: opened after nobody waits for it", m.session_id)
            task = asyncio.get_running_loop().create_task(self._close_orphan(m.session_id))
            self._closers.add(task)
            task.add_done_callback(self._closers.discard)
            return
        key = getattr(m, "session_id", "") or rid
        if isinstance(m, (P.SynthAudio, P.Done, P.Cancelled)) or (isinstance(m, P.Error) and not getattr(m, "session_id", "")):
            key = rid
        q = self._streams.get(key)
        if q is not None:
            q.put_nowait(m)
        else:
            logger.debug("ignoring %s not addressed to us (%r)", m.TYPE.value, key)

    async def _close_orphan(self, session_id: str) -> None:
        try:
            await self.send(P.Close(session_id=session_id, request_id=new_id()))
        except DaemonError:
            pass

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
            if self.reconnect_on_timeout:
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


class AsyncSynthStream:
    """One streamed-text synthesis request (`AsyncTTSClient.synthesize_stream`): `send` text as it
    comes, `end` it; `async for chunk in stream` yields its audio until `done` (DaemonError on an
    error). Until `end` the wait for audio has no client-side timeout (the text may pause; the
    daemon ends an idle request after limits.text_idle_timeout); after it, `timeout` between
    chunks. Leaving the loop early, or `cancel()`, cancels the request at the daemon."""

    def __init__(self, client: "AsyncTTSClient", request_id: str, queue: asyncio.Queue, timeout: float):
        self.client = client
        self.request_id = request_id
        self.queue = queue
        self.timeout = timeout
        self.ended = False
        self.released = False
        self.finished = False  # done, cancelled or error seen

    async def send(self, text: str, final: bool = False, release: bool = False, drop_partial: bool = False) -> None:
        """More text (final: the last; release: a held request goes on; drop_partial: the text
        after the last complete sentence is dropped first)."""
        if self.ended:
            raise DaemonError("the text has ended", ErrorCode.BAD_REQUEST, self.request_id)
        self.ended = self.ended or final
        self.released = self.released or release
        await self.client.send(P.TextChunk(request_id=self.request_id, text=text, final=final, release=release,
                                           drop_partial=drop_partial))

    async def end(self, text: str = "", release: bool = False, drop_partial: bool = False) -> None:
        await self.send(text, final=True, release=release, drop_partial=drop_partial)

    async def release(self) -> None:
        """A held request (hold=True) goes on past its first sentence (also after `end`)."""
        if not self.released and not self.finished:
            self.released = True
            await self.client.send(P.TextChunk(request_id=self.request_id, release=True))

    async def cancel(self) -> None:
        """Stop it at the daemon, not waiting for the answer (the iterator ends at `cancelled`)."""
        if not self.finished:
            try:
                await self.client.send(P.Cancel(request_id=self.request_id))
            except DaemonError:
                pass

    def __aiter__(self) -> AsyncIterator[P.SynthAudio]:
        return self.audio()

    async def audio(self) -> AsyncGenerator[P.SynthAudio, None]:
        try:
            while not self.finished:
                try:
                    m = await asyncio.wait_for(self.queue.get(), self.timeout if self.ended else None)
                except asyncio.TimeoutError:
                    raise DaemonError("no audio in time", ErrorCode.TIMEOUT, self.request_id) from None
                if isinstance(m, P.Error):
                    self.finished = True
                    raise DaemonError.from_reply(m)
                if isinstance(m, (P.Done, P.Cancelled)):
                    self.finished = True
                    return
                if isinstance(m, P.SynthAudio):
                    yield m
        finally:
            self.client._streams.pop(self.request_id, None)
            if not self.finished:
                self.finished = True
                if self.client._sock is not None:
                    try:
                        await self.client.send(P.Cancel(request_id=self.request_id))
                    except DaemonError:
                        pass


class AsyncTTSClient(AsyncClient):
    async def synthesize_stream(self, request_id: Optional[str] = None, text: str = "",
                                language: Optional[str] = None, speed: Optional[float] = None, stream: bool = True,
                                owner: str = "", hold: bool = False,
                                timeout: Optional[float] = None) -> AsyncSynthStream:
        """Open a streamed-text request (the daemon cuts sentences as the text arrives and speaks
        each at once); `text` is its first chunk. hold: only the first sentence until `release()`."""
        rid = request_id or new_id()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = q
        try:
            await self.send(P.Synthesize(request_id=rid, text=text, language=language, speed=speed, stream=stream,
                                         owner=owner, stream_text=True, hold=hold))
        except BaseException:
            self._streams.pop(rid, None)
            raise
        return AsyncSynthStream(self, rid, q, self.timeout if timeout is None else timeout)

    async def synthesize(self, text: str, language: Optional[str] = None, speed: Optional[float] = None,
                         stream: bool = True, request_id: Optional[str] = None,
                         timeout: Optional[float] = None, owner: str = "") -> AsyncIterator[P.SynthAudio]:
        """Async iterator of audio chunks until `done`/`cancelled`; DaemonError on error/timeout.
        Breaking out of the loop early cancels the request in the daemon. owner: who it is for
        (the daemon is fair across owners of one peer)."""
        rid = request_id or new_id()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = q
        finished = False
        try:
            await self.send(P.Synthesize(request_id=rid, text=text, language=language, speed=speed, stream=stream,
                                         owner=owner))
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
