"""The bridge's LangGraph agent (bridge/agents/langgraph.py) against the REAL LangGraph server.

`langgraph dev` (langgraph-api, in-memory runtime) runs as a real process from ./.venv-langgraph
(scripts/langgraph-venv.sh) and serves tests/langgraph_server/graph.py, whose model node is
langchain_core's GenericFakeChatModel: offline, deterministic, streaming word by word
("Answer {n} to {c} characters. It has a second sentence.", n = the user messages the model
sees in its thread). What the tests check is read back through the server's own API (threads,
state, history, runs). Its own faults are tested here too (a graph that raises, an unknown
assistant); tests/fake_langgraph.py remains for the faults this server cannot be made to produce
(HTTP 500, dropped connections, stalls, bodies that are not event streams).

The last test runs the whole speculative path: the speech daemon and the bridge as real
processes (as tests/test_speculation.py does), with the bridge pointed at this server.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from bridge_procs import start_bridge, start_daemon
from helpers import langgraph_real
from helpers.langgraph_real import LangGraphServer
from fake_langgraph import wait_for as _wait_for
from helpers.ws import metrics, silence
from test_speculation import FIX, _config, _pcm16, _session, _split_with_pause

from bridge.agents import AgentError, build_agent, probe_agent, stream_reply
from daemon.config import AgentConfig

real_langgraph = langgraph_real.real_langgraph  # the fixture: one real server for this module
LONG = "please give me a long answer"


def answer(n: int, text: str) -> str:
    """What the graph's fake model says to `text` as the n-th user message of its thread."""
    return f"Answer {n} to {len(text)} characters. It has a second sentence."


def _agent(srv: LangGraphServer, timeout: float = 10.0):
    return build_agent(AgentConfig(kind="langgraph", url=srv.url, assistant_id="agent", timeout=timeout))


def run(coro, timeout: float = 60.0):
    async def guarded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(guarded())


async def _collect(conv, text: str, timeout: float = 10.0) -> tuple[list[str], list[float]]:
    deltas, times = [], []
    async for d in stream_reply(conv, text, timeout):
        deltas.append(d)
        times.append(time.monotonic())
    return deltas, times


async def _cut(conv, text: str, after: int) -> list[str]:
    """Start a reply and stop reading after `after` deltas, as the bridge does on barge-in or when
    it drops a speculative turn (the HTTP stream is closed)."""
    got: list[str] = []

    async def consume() -> None:
        async for d in stream_reply(conv, text, 10):
            got.append(d)

    task = asyncio.create_task(consume())
    while len(got) < after and not task.done():
        await asyncio.sleep(0.005)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return got


# --- the agent client against the real server ---------------------------------------------------


def test_probe(real_langgraph):
    ok, why = run(probe_agent(AgentConfig(kind="langgraph", url=real_langgraph.url)))
    assert ok, why


def test_reply_streams_in_messages_tuple_mode(real_langgraph):
    srv = real_langgraph

    async def go():
        agent = _agent(srv)
        conv = agent.conversation()
        try:
            deltas, times = await _collect(conv, "你好")
            return conv.thread_id, conv.run_id, conv.run_ended, deltas, times
        finally:
            await conv.aclose()
            await agent.aclose()

    tid, rid, ended, deltas, times = run(go())
    assert "".join(deltas) == answer(1, "你好")
    # streamed word by word as the model wrote it, not one blob at the end
    assert len(deltas) >= 10 and times[-1] - times[0] > 0.1, (deltas, times[-1] - times[0])
    # the real server ends its stream without an `end` event: the stream's end is the run's end
    assert ended and rid
    assert srv.thread(tid)[0] == 404  # conv.aclose() deleted the thread


def test_the_server_records_the_run_the_bridge_asked_for(real_langgraph):
    srv = real_langgraph

    async def go():
        agent = _agent(srv)
        conv = agent.conversation()
        try:
            await _collect(conv, "打开灯")
            return conv.thread_id, conv.run_id, srv.runs(conv.thread_id)
        finally:
            await conv.aclose()
            await agent.aclose()

    _tid, rid, runs = run(go())
    assert [r["run_id"] for r in runs] == [rid] and runs[0]["status"] == "success"
    kw = runs[0]["kwargs"]
    assert kw["stream_mode"] == ["messages-tuple"]
    assert kw["input"] == {"messages": [{"role": "user", "content": "打开灯"}]}
    assert runs[0]["metadata"]["graph_id"] == "agent"


@pytest.mark.parametrize("assistant,text,message", [
    ("agent", "please raise", "the graph failed on purpose"),  # the graph raises: the server's `error` event
    ("no-such-graph", "你好", "HTTP 422"),                      # a wrong agent.assistant_id
])
def test_faults_the_real_server_produces_are_agent_errors(real_langgraph, assistant, text, message):
    async def go():
        agent = build_agent(AgentConfig(kind="langgraph", url=real_langgraph.url, assistant_id=assistant, timeout=10))
        conv = agent.conversation()
        try:
            return await _collect(conv, text)
        finally:
            await conv.aclose()
            await agent.aclose()

    with pytest.raises(AgentError) as e:
        run(go())
    assert e.value.code == "agent_error" and message in e.value.message, e.value.message


def test_one_thread_per_conversation(real_langgraph):
    srv = real_langgraph

    async def go():
        agent = _agent(srv)
        conv, other = agent.conversation(), agent.conversation()
        try:
            first, _ = await _collect(conv, "你好")
            tid_after_first = conv.thread_id
            second, _ = await _collect(conv, "再来一次")
            third, _ = await _collect(other, "别的对话")
            state = srv.messages(conv.thread_id), srv.messages(other.thread_id)
            runs = len(srv.runs(conv.thread_id)), len(srv.runs(other.thread_id))
            return conv.thread_id, tid_after_first, other.thread_id, first, second, third, state, runs
        finally:
            await conv.aclose()
            await other.aclose()
            await agent.aclose()

    tid, tid1, other_tid, first, second, third, (state, other_state), runs = run(go())
    assert tid == tid1 and tid != other_tid
    assert "".join(first) == answer(1, "你好")
    assert "".join(second) == answer(2, "再来一次")  # the model saw the first exchange
    assert "".join(third) == answer(1, "别的对话")  # a new conversation starts a new thread
    assert state == [("human", "你好"), ("ai", answer(1, "你好")), ("human", "再来一次"), ("ai", answer(2, "再来一次"))]
    assert other_state == [("human", "别的对话"), ("ai", answer(1, "别的对话"))]
    assert runs == (2, 1)
    assert srv.thread(tid)[0] == 404 and srv.thread(other_tid)[0] == 404


def test_a_cancelled_speculative_run_is_rolled_back(real_langgraph):
    """The way the bridge drops a speculative turn (turns.drop_speculation): the stream is closed
    mid-reply, then `Conversation.discard()`. The server's own API must then show no run left
    pending or running, the run gone (rolled back), and a thread without the dropped exchange;
    the next turn works and its model did not see the dropped one."""
    srv = real_langgraph
    spoken = "先说这一句"
    dropped = "这一句不算"

    async def go():
        agent = _agent(srv)
        conv = agent.conversation()
        try:
            await _collect(conv, spoken)
            got = await _cut(conv, dropped, 3)
            tid, rid = conv.thread_id, conv.run_id
            status_before = srv.run_status(tid, rid)
            t0 = time.monotonic()
            await conv.discard()
            took = time.monotonic() - t0
            after = {"status": srv.run_status(tid, rid), "active": srv.active_runs(tid),
                     "state": srv.messages(tid), "history": srv.history_texts(tid)}
            nxt, _ = await _collect(conv, "下一句")
            final = {"state": srv.messages(tid), "thread": srv.thread(tid)[1]["status"],
                     "active": srv.active_runs(tid)}
            return got, rid, status_before, took, after, nxt, final
        finally:
            await conv.aclose()
            await agent.aclose()

    got, rid, status_before, took, after, nxt, final = run(go())
    assert rid and len(got) == 3 and "".join(got) != answer(2, dropped)
    assert status_before in ("pending", "running", "interrupted"), status_before  # cut mid-reply
    assert took < 2.0, took
    assert after["status"] is None, after["status"]  # the run itself is gone (rolled back)
    assert after["active"] == [], after["active"]  # no orphaned run
    assert after["state"] == [("human", spoken), ("ai", answer(1, spoken))], after["state"]
    assert dropped not in after["history"] and not any(t.startswith("Answer 2") for t in after["history"])
    # a second turn after the cancel: the model sees two user messages, not three
    assert "".join(nxt) == answer(2, "下一句")
    assert final["state"] == [("human", spoken), ("ai", answer(1, spoken)), ("human", "下一句"),
                              ("ai", answer(2, "下一句"))]
    assert final["thread"] == "idle" and final["active"] == []


def test_a_speculative_reply_that_finished_is_forgotten_too(real_langgraph):
    """A fast agent finished the speculative reply before the user went on: the run is no longer
    cancellable (the server answers 404 to the cancel), yet the thread must not keep it."""
    srv = real_langgraph
    dropped = "说完了也不算"

    async def go():
        agent = _agent(srv)
        conv = agent.conversation()
        try:
            await _collect(conv, "第一句")
            deltas, _ = await _collect(conv, dropped)  # the whole reply, held by the bridge
            tid, rid = conv.thread_id, conv.run_id
            assert _wait_for(lambda: srv.run_status(tid, rid) == "success"), srv.run_status(tid, rid)
            await conv.discard()
            after = {"status": srv.run_status(tid, rid), "state": srv.messages(tid),
                     "history": srv.history_texts(tid)}
            nxt, _ = await _collect(conv, "下一句")
            return deltas, after, nxt
        finally:
            await conv.aclose()
            await agent.aclose()

    deltas, after, nxt = run(go())
    assert "".join(deltas) == answer(2, dropped)
    assert after["status"] is None, after["status"]
    assert after["state"] == [("human", "第一句"), ("ai", answer(1, "第一句"))], after["state"]
    assert dropped not in after["history"], after["history"]
    assert "".join(nxt) == answer(2, "下一句")


class _LateHeaders:
    """An httpx transport that hands the runs/stream answer to the bridge `delay` seconds after
    the server sent it: the run exists on the server while the bridge does not know its id yet.
    Cancelled while waiting, it closes the answer (the server sees the disconnect)."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    async def handle_async_request(self, request):
        response = await self.inner.handle_async_request(request)
        if request.method == "POST" and request.url.path.endswith("/runs/stream"):
            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:
                await response.aclose()
                raise
        return response

    async def aclose(self):
        await self.inner.aclose()


def test_a_speculative_turn_dropped_before_its_run_was_named_is_forgotten(real_langgraph):
    """Dropped after the server made the run but before its answer named it (Content-Location):
    discard() must still take the user's words out of the thread, and never the reply kept
    before it."""
    srv = real_langgraph
    dropped = "还没开始就不算"

    async def go():
        agent = _agent(srv)
        conv = agent.conversation()
        try:
            await _collect(conv, "第一句")
            tid = conv.thread_id
            kept = conv.run_id
            agent.client._transport = _LateHeaders(agent.client._transport, 1.0)
            task = asyncio.create_task(_collect(conv, dropped))
            assert await asyncio.to_thread(_wait_for, lambda: len(srv.runs(tid)) == 2, 5.0), srv.runs(tid)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert conv.run_id == ""  # the bridge never learned the run's id
            agent.client._transport = agent.client._transport.inner
            await conv.discard()
            after = {"runs": [r["run_id"] for r in srv.runs(tid)], "state": srv.messages(tid),
                     "history": srv.history_texts(tid), "active": srv.active_runs(tid)}
            nxt, _ = await _collect(conv, "下一句")
            return kept, after, nxt
        finally:
            await conv.aclose()
            await agent.aclose()

    kept, after, nxt = run(go())
    assert after["runs"] == [kept], after["runs"]  # the kept reply's run stays, the dropped one is gone
    assert after["state"] == [("human", "第一句"), ("ai", answer(1, "第一句"))], after["state"]
    assert dropped not in after["history"], after["history"]
    assert after["active"] == []
    assert "".join(nxt) == answer(2, "下一句")


def test_a_speculative_run_dropped_as_it_ends_is_forgotten(real_langgraph):
    """The race between the two above: the stream is cut at the last words, as the run finishes.
    Whichever way the server sees it (a cancel that answers 404, or one that is accepted while
    the run completes anyway), the thread must not keep the exchange."""
    srv = real_langgraph
    words = len(answer(2, "不算的").split(" ")) * 2 - 1  # chunks: words and the spaces between

    async def go():
        agent = _agent(srv)
        conv = agent.conversation()
        kept = []
        try:
            await _collect(conv, "先说")
            for after in (words - 1, words, words):
                await _cut(conv, "不算的", after)
                tid, rid = conv.thread_id, conv.run_id
                await conv.discard()
                kept.append((after, srv.run_status(tid, rid), srv.messages(tid)[2:], srv.active_runs(tid)))
            return kept
        finally:
            await conv.aclose()
            await agent.aclose()

    for after, status, extra, active in run(go()):
        assert (status, extra, active) == (None, [], []), (after, status, extra, active)


def test_barge_in_stops_the_run_and_the_next_turn_does_not_wait_for_it(real_langgraph):
    """Barge-in: the bridge closes the stream of a long reply. The server must stop that run
    (not finish it in the background), so the next turn on the thread is not queued behind it
    and the thread does not claim the whole unheard reply was said."""
    srv = real_langgraph

    async def go():
        agent = _agent(srv, timeout=30)
        conv = agent.conversation()
        try:
            got = await _cut(conv, LONG, 5)
            tid, rid = conv.thread_id, conv.run_id
            t0 = time.monotonic()
            nxt, times = await _collect(conv, "next", 30)
            first = times[0] - t0
            status = srv.run_status(tid, rid)
            return got, first, nxt, status, srv.messages(tid)
        finally:
            await conv.aclose()
            await agent.aclose()

    got, first, nxt, status, state = run(go())
    assert len(got) == 5
    assert first < 3.0, f"the next turn's first token came {first:.1f} s after barge-in"  # the long reply takes ~18 s
    assert status == "interrupted", status
    assert "".join(nxt) == answer(2, "next")
    assert not any(t == "ai" and "long answer" in text for t, text in state), state


# --- the whole speculative path: daemon + bridge + the real server ------------------------------


@pytest.fixture(scope="module")
def real_stack(tmp_path_factory, models_dir, real_langgraph):
    d = tmp_path_factory.mktemp("spec-real")
    cfg = _config(d, models_dir, real_langgraph.url, True, "on")
    daemon = start_daemon(cfg, d / "daemon.log", timeout=240)
    bridge = start_bridge(cfg, d / "bridge.log")
    yield bridge
    bridge.stop()
    daemon.stop()


def test_pause_then_more_speech_gives_one_reply_to_the_whole_sentence(real_stack, real_langgraph):
    """tests/test_speculation.py's test of the same name, against the real server: the reply
    started on the first half of the sentence is discarded through the server's API, no run of
    it is left, and the thread holds exactly the one exchange the user heard."""
    srv = real_langgraph
    bridge = real_stack
    audio, _cut_at = _split_with_pause(FIX / "01.wav", 0.4)

    async def go():
        c = await _session(bridge.ws)
        await c.stream(_pcm16(audio) + silence(1.5), realtime=True)
        await c.wait(lambda: len(c.of("tts_end")) >= 2, 30, "the reply spoken")
        await asyncio.sleep(0.5)  # anything late from the cancelled turn would arrive now
        # read the server's side before the connection closes (the bridge deletes its thread then)
        m = re.search(r"langgraph thread (\S+) created", bridge.text())
        assert m, bridge.text()[-3000:]
        tid = m.group(1)
        # the runs the bridge discarded (cancelled with rollback, or deleted once the server had
        # stopped them when the bridge closed their stream)
        dropped = re.findall(rf"langgraph thread {tid}: run (\S+) (?:cancelled \(rollback\)|had \w+; deleted)",
                             bridge.text())
        server = {"state": srv.messages(tid), "history": srv.history_texts(tid), "runs": srv.runs(tid),
                  "dropped": {rid: srv.run_status(tid, rid) for rid in dropped}}
        await c.close()
        return c, server

    c, server = run(go(), 120)
    finals = [f["text"] for f in c.of("final") if f["text"]]
    assert len(finals) == 1, finals
    final = finals[0]
    reply = answer(1, final)  # "1": the model never saw the half sentence
    # the page: one reply, to the whole sentence, nothing of the dropped turn
    assert [d["text"] for d in c.of("agent_done")] == [reply]
    assert "".join(e["text"] for e in c.of("agent_delta")) == reply
    # the bridge dropped at least one speculative turn and discarded its run at the server
    assert server["dropped"], bridge.text()[-3000:]
    assert metrics(bridge.port).get('s2s_bridge_speculative_turns_total{outcome="cancelled"}', 0) >= 1
    # the server: the dropped runs are gone, nothing pending or running, one run kept
    assert set(server["dropped"].values()) == {None}, server["dropped"]
    assert [r["status"] for r in server["runs"]] == ["success"], server["runs"]
    assert server["runs"][0]["kwargs"]["input"]["messages"][0]["content"] == final
    # the thread's state and its whole history hold only the heard exchange
    assert server["state"] == [("human", final), ("ai", reply)], server["state"]
    assert set(server["history"]) <= {final, reply}, server["history"]
