"""The client library: its sans-I/O core (daemon/wire/client_core.py) fed frames by hand, and the
two shells over it (blocking daemon/wire/client.py, asyncio daemon/wire/client_async.py) against
a real ZeroMQ ROUTER socket that plays a scripted daemon (`StubDaemon`, a FAKE daemon: the tests
are about the client, so the stub answers exactly what each test needs and records what came).

Both shells must have the same features (issue 27, item 5): `tentative` on open, the
missing-socket check on send, `daemon_gone` when the connection is lost, `reconnect_on_timeout`,
the close of an `opened` that came after its open timed out, and a public detach."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

import pytest
import zmq

from daemon.errors import ErrorCode
from daemon.wire import protocol as P
from daemon.wire.client import ASRClient, AsyncASRClient, AsyncTTSClient, DaemonError, TTSClient
from daemon.wire.client_core import ASRStreamState, ClientCore, SynthStreamState, checked

# --- the core, without sockets ------------------------------------------------------------------


def frames(m: P.Message) -> List[bytes]:
    """What a DEALER reads for a reply from the daemon."""
    return P.dealer_frames(m)


def test_replies_go_to_their_request_and_events_to_their_stream():
    core = ClientCore("ipc:///nowhere")
    op = core.open(language="zh", tentative=True)
    assert op.tentative and core.attached(op.session_id)
    rid = core.expect(op)
    # an event of the session before the answer goes to the stream, not to the request
    assert core.receive(frames(P.SpeechStart(session_id=op.session_id))) == {op.session_id}
    assert not core.answered(rid)
    assert core.receive(frames(P.Opened(session_id=op.session_id, request_id=rid))) == {rid}
    assert isinstance(core.reply(rid), P.Opened)
    core.forget(rid)
    assert [type(m) for m in core.events(op.session_id)] == [P.SpeechStart]
    # someone else's reply is nobody's: kept for a raw recv, never given to our stream
    core.receive(frames(P.Final(session_id="other", text="x")))
    assert not core.has_events(op.session_id) and isinstance(core.unclaimed[-1], P.Final)
    # ... by the blocking shell; the asyncio one has no raw reader and keeps nothing
    quiet = ClientCore("ipc:///nowhere", keep_unclaimed=False)
    quiet.receive(frames(P.Final(session_id="other", text="x")))
    assert not quiet.unclaimed


def test_an_error_reply_raises_with_its_code_and_retry_after():
    core = ClientCore("ipc:///nowhere")
    op = core.open()
    rid = core.expect(op)
    core.receive(frames(P.Error(code="busy", message="full", request_id=rid, session_id=op.session_id,
                                retry_after=1.5)))
    with pytest.raises(DaemonError) as e:
        core.reply(rid)
    assert e.value.code == ErrorCode.BUSY and e.value.retry_after == 1.5 and e.value.session_id == op.session_id


def test_an_opened_after_its_open_was_given_up_is_closed_and_a_late_answer_dropped():
    core = ClientCore("ipc:///nowhere")
    op = core.open(session_id="late")
    rid = core.expect(op)
    core.forget(rid)  # timed out
    core.detach(op.session_id)
    core.receive(frames(P.Opened(session_id="late", request_id=rid)))
    out = core.outgoing()
    assert [(type(m), m.session_id) for m in out] == [(P.Close, "late")]  # type: ignore[attr-defined]
    assert core.outgoing() == [] and not core.unclaimed
    ping = P.Ping(request_id="p1")
    core.expect(ping)
    core.forget("p1")
    core.receive(frames(P.Pong(request_id="p1")))
    assert not core.unclaimed  # an answer nobody waits for any more is dropped, not kept


def test_a_detached_stream_gets_nothing_more():
    core = ClientCore("ipc:///nowhere")
    op = core.open(session_id="s")
    core.receive(frames(P.Partial(session_id="s", text="a")))
    core.detach("s")
    core.receive(frames(P.Final(session_id="s", text="ab")))
    assert not core.attached("s") and core.events("s") == [] and not core.unclaimed
    assert op.session_id == "s"


def test_a_lost_connection_fails_requests_and_ends_streams_with_daemon_gone():
    core = ClientCore("ipc:///nowhere")
    op = core.open(session_id="s")
    rid = core.expect(P.Ping(request_id="p"))
    assert core.connection_lost() == {"s", "p"}
    with pytest.raises(DaemonError) as e:
        core.reply(rid)
    assert e.value.code == ErrorCode.UNAVAILABLE
    evs = core.events(op.session_id)
    assert isinstance(evs[0], P.Error) and evs[0].code == "unavailable"
    assert isinstance(evs[1], P.Closed) and evs[1].reason == "daemon_gone"


def test_a_cancel_answer_reaches_the_waiter_and_ends_the_synthesis():
    core = ClientCore("ipc:///nowhere")
    syn = core.synthesize("你好。", request_id="t1")
    state = SynthStreamState(core, "t1", 5.0, ended=True)
    core.receive(frames(P.SynthAudio(request_id="t1", pcm=b"\0\0")))
    rid = core.expect(P.Cancel(request_id="t1"))
    core.receive(frames(P.Cancelled(request_id="t1")))
    assert isinstance(core.reply(rid), P.Cancelled)
    assert state.has_news() and state.next_chunk() is not None
    assert state.next_chunk() is None and state.finished and not core.attached(syn.request_id)


def test_bad_arguments_are_refused_before_they_are_sent():
    core = ClientCore("ipc:///nowhere")
    for build in (lambda: core.synthesize("x", owner="o" * (P.MAX_OWNER_CHARS + 1)),
                  lambda: core.synthesize("x", hold=True),
                  lambda: core.open(hotwords="天气"),
                  lambda: core.open(language=7)):  # type: ignore[arg-type]
        with pytest.raises(DaemonError) as e:
            build()
        assert e.value.code == ErrorCode.BAD_REQUEST
    assert checked(P.Ping(request_id="x")).request_id == "x"
    text = SynthStreamState(core, "t", 1.0)
    text.text("a", final=True)
    with pytest.raises(DaemonError):
        text.text("b")


# --- the shells, against a scripted ROUTER ----------------------------------------------------------


class StubDaemon:
    """FAKE daemon: a real ROUTER socket in a thread; `answer(msg)` returns the replies to send
    (default: none). Records every request it decoded in `got`."""

    def __init__(self, endpoint: str, answer: Optional[Callable[[P.Message], List[P.Message]]] = None):
        self.endpoint = endpoint
        self.answer = answer or (lambda m: [])
        self.got: List[P.Message] = []
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(50):
                continue
            ident, frames_ = P.split_router(self._sock.recv_multipart())
            m = P.decode_request(frames_)
            self.got.append(m)
            for r in self.answer(m):
                self._sock.send_multipart(P.router_frames(ident, r))

    def wait_for(self, pred: Callable[[P.Message], bool], timeout: float = 5.0) -> P.Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in list(self.got):
                if pred(m):
                    return m
            time.sleep(0.01)
        raise AssertionError(f"the stub never got it; got {self.got}")

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)
        self._sock.close(linger=0)


def opens(m: P.Message) -> List[P.Message]:
    if isinstance(m, P.Open):
        return [P.Opened(session_id=m.session_id, request_id=m.request_id, capabilities={"max_chunk_seconds": 1.0})]
    if isinstance(m, P.Ping):
        return [P.Pong(request_id=m.request_id)]
    return []


@pytest.fixture
def ep(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/asr.sock"


def test_blocking_open_asks_for_tentatives_like_the_asyncio_one(ep):
    stub = StubDaemon(ep, opens)
    try:
        with ASRClient(ep, timeout=5) as c:
            c.open(session_id="b", tentative=True)

        async def go() -> None:
            async with AsyncASRClient(ep, timeout=5) as a:
                await a.open(session_id="a", tentative=True)
        asyncio.run(go())
        assert {m.session_id: m.tentative for m in stub.got if isinstance(m, P.Open)} == {"b": True, "a": True}
    finally:
        stub.stop()


def test_both_shells_refuse_a_send_to_a_missing_socket_file_at_once(ep):
    t0 = time.monotonic()
    with TTSClient(ep, timeout=30) as t, pytest.raises(DaemonError) as e:
        list(t.synthesize("你好"))
    assert e.value.code == ErrorCode.UNAVAILABLE and "does not exist" in e.value.message

    async def go() -> DaemonError:
        async with AsyncTTSClient(ep, timeout=30) as a:
            with pytest.raises(DaemonError) as e:
                async for _ in a.synthesize("你好"):
                    pass
            return e.value
    err = asyncio.run(go())
    assert err.code == ErrorCode.UNAVAILABLE and "does not exist" in err.message
    assert time.monotonic() - t0 < 5


def test_both_shells_end_streams_with_daemon_gone_when_the_daemon_goes(ep):
    stub = StubDaemon(ep, opens)
    with ASRClient(ep, timeout=5) as c:
        s = c.open(session_id="b")
        assert c.reachable is True
        stub.stop()
        evs = s.poll(5)
        assert [type(m) for m in evs] == [P.Error, P.Closed], evs
        assert evs[0].code == "unavailable" and evs[1].reason == "daemon_gone" and s.closed  # type: ignore[attr-defined]
        assert c.reachable is False

    stub = StubDaemon(ep, opens)

    async def go() -> List[P.Message]:
        async with AsyncASRClient(ep, timeout=5) as a:
            s = await a.open(session_id="a")
            stub.stop()
            return [m async for m in s.events()]
    evs = asyncio.run(asyncio.wait_for(go(), 10))
    assert [type(m) for m in evs] == [P.Error, P.Closed] and evs[1].reason == "daemon_gone"  # type: ignore[attr-defined]


def test_reconnect_on_timeout_is_a_choice_in_both_shells(ep):
    stub = StubDaemon(ep)  # answers nothing
    try:
        for reconnect in (True, False):
            with ASRClient(ep, timeout=0.3, reconnect_on_timeout=reconnect) as c:
                before = c._sock
                with pytest.raises(DaemonError) as e:
                    c.ping()
                assert e.value.code == ErrorCode.TIMEOUT
                assert (c._sock is not before) == reconnect

            async def go() -> bool:
                async with AsyncASRClient(ep, timeout=0.3, reconnect_on_timeout=reconnect) as a:
                    before = a._sock
                    with pytest.raises(DaemonError):
                        await a.ping()
                    return a._sock is not before
            assert asyncio.run(go()) == reconnect
    finally:
        stub.stop()


def test_both_shells_close_a_session_opened_after_its_open_timed_out(ep):
    held: List[P.Open] = []

    def late(m: P.Message) -> List[P.Message]:
        if isinstance(m, P.Open):
            held.append(m)  # no answer until the next ping
            return []
        if isinstance(m, P.Ping):
            o = held.pop()
            return [P.Opened(session_id=o.session_id, request_id=o.request_id), P.Pong(request_id=m.request_id)]
        return []

    stub = StubDaemon(ep, late)
    try:
        with ASRClient(ep, timeout=0.3, reconnect_on_timeout=False) as c:
            with pytest.raises(DaemonError):
                c.open(session_id="late-b")
            c.ping(timeout=5)
            stub.wait_for(lambda m: isinstance(m, P.Close) and m.session_id == "late-b")

        async def go() -> None:
            async with AsyncASRClient(ep, timeout=0.3, reconnect_on_timeout=False) as a:
                with pytest.raises(DaemonError):
                    await a.open(session_id="late-a")
                await a.ping(timeout=5)
                await asyncio.sleep(0.2)
        asyncio.run(go())
        stub.wait_for(lambda m: isinstance(m, P.Close) and m.session_id == "late-a")
    finally:
        stub.stop()


def test_abandon_detaches_the_stream_and_closes_the_session(ep):
    def chatty(m: P.Message) -> List[P.Message]:
        if isinstance(m, P.Ping):  # the session's event, then the answer
            return [P.Final(session_id="a", text="晚了"), P.Pong(request_id=m.request_id)]
        return opens(m)

    stub = StubDaemon(ep, chatty)
    try:
        async def go() -> None:
            async with AsyncASRClient(ep, timeout=5) as a:
                s = await a.open(session_id="a")
                await s.abandon()
                assert s.closed and not a.core.attached("a")
                await a.ping()
        asyncio.run(go())
        stub.wait_for(lambda m: isinstance(m, P.Close) and m.session_id == "a")
        with ASRClient(ep, timeout=5) as c:
            s = c.open(session_id="a")
            s.abandon()
            c.ping()
            assert not c.core.attached("a") and not c.core.unclaimed
        assert len([m for m in stub.got if isinstance(m, P.Close)]) == 2
    finally:
        stub.stop()


def test_a_stream_knows_the_largest_audio_message_its_daemon_takes():
    core = ClientCore("ipc:///nowhere")
    assert ASRStreamState(core, "s", {"max_chunk_seconds": 0.1, "sample_rate": 16000}).max_chunk_bytes == 3200
    assert ASRStreamState(core, "s", {"max_chunk_seconds": 1.0, "sample_rate": 48000}).max_chunk_bytes == 96000
    assert ASRStreamState(core, "s", {"max_chunk_seconds": 0.00001}).max_chunk_bytes == 2  # one sample at least
    for caps in ({}, {"max_chunk_seconds": 0}, {"max_chunk_seconds": True}, {"max_chunk_seconds": "1"}):
        assert ASRStreamState(core, "s", caps).max_chunk_bytes is None  # the daemon does not say
