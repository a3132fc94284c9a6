"""Agent clients (bridge/agents/) against the FAKE LangGraph / OpenAI-compatible server
(tests/fake_langgraph.py: a real local HTTP server) and the built-in echo agent."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge.agents import (AgentError, LangGraphStreamParser, build_agent, echo_text, iter_sse, openai_delta,
                           probe_agent, stream_reply)
from daemon.config import AgentConfig
from fake_langgraph import FakeAgentServer, tokenize

ROOT = Path(__file__).resolve().parent.parent
REPLY = "好的，马上办。Then I will call you back."


@pytest.fixture(scope="module")
def srv():
    with FakeAgentServer(script=[REPLY, "第二个回答。"], token_delay=0.0) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset(srv):
    srv.reset(script=[REPLY, "第二个回答。"], token_delay=0.0, first_token_delay=0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def collect(conv, text, timeout=5.0):
    return [d async for d in stream_reply(conv, text, timeout)]


# --- parsing (pure) ---------------------------------------------------------------------------


def test_iter_sse_follows_the_spec():
    lines = ["event: messages", "data: [1,", "data: 2]", "", ": heartbeat", "", "data:x", "", "id: 7",
             "event: end\r", "data: null", ""]

    async def run():
        async def gen():
            for line in lines:
                yield line
        return [e async for e in iter_sse(gen())]

    assert asyncio.run(run()) == [("messages", "[1,\n2]"), ("message", "x"), ("end", "null")]


def test_langgraph_parser_messages_tuple_and_legacy_modes():
    p = LangGraphStreamParser()
    meta = {"langgraph_node": "agent"}
    chunk = lambda c, i="m1", t="AIMessageChunk": json.dumps([{"type": t, "id": i, "content": c}, meta])
    assert p.feed("metadata", json.dumps({"run_id": "r"})) == ""
    assert p.feed("messages", chunk("你")) == "你"
    assert p.feed("messages", chunk([{"type": "text", "text": "好"}])) == "好"
    # a tool result and a human message are not the assistant speaking
    assert p.feed("messages", chunk("42", "t1", "tool")) == ""
    assert p.feed("messages", chunk("hi", "h1", "human")) == ""
    # subgraph namespaces: "messages|<ns>"
    assert p.feed("messages|sub:1", chunk("。")) == "。"
    # a complete ai message repeating what was streamed adds only what is new
    assert p.feed("messages", chunk("你好。再见", "m1", "ai")) == "再见"
    # legacy "messages" mode: cumulative partials
    q = LangGraphStreamParser()
    part = lambda c: json.dumps([{"type": "ai", "id": "x", "content": c}])
    assert q.feed("messages/partial", part("Hel")) == "Hel"
    assert q.feed("messages/partial", part("Hello")) == "lo"
    assert q.feed("messages/complete", part("Hello!")) == "!"
    assert q.feed("end", "null") == "" and q.ended
    with pytest.raises(AgentError) as e:
        q.feed("error", json.dumps({"error": "ValueError", "message": "boom"}))
    assert e.value.code == "agent_error" and "boom" in e.value.message
    with pytest.raises(AgentError) as e:
        q.feed("messages", "{not json")
    assert e.value.code == "bad_reply"


def test_openai_delta():
    c = lambda d: json.dumps({"choices": [{"index": 0, "delta": d}]})
    assert openai_delta(c({"role": "assistant"})) == ""
    assert openai_delta(c({"content": "你好"})) == "你好"
    assert openai_delta("[DONE]") is None
    with pytest.raises(AgentError):
        openai_delta(json.dumps({"error": {"message": "rate limited"}}))


def test_echo_agent_says_what_it_heard():
    assert echo_text("今天天气怎么样") == "你说的是：今天天气怎么样"
    assert echo_text("hello") == "You said: hello"
    agent = build_agent(AgentConfig(kind="langgraph"), kind="echo")
    conv = agent.conversation()
    assert "".join(asyncio.run(collect(conv, "打开灯"))) == "你说的是：打开灯"


# --- against the fake server ----------------------------------------------------------------


def test_langgraph_thread_per_conversation_and_stream(srv):
    async def run():
        agent = build_agent(AgentConfig(kind="langgraph", url=srv.url, assistant_id="my-graph", timeout=5))
        conv = agent.conversation()
        first = await collect(conv, "你好")
        second = await collect(conv, "再来")
        other = agent.conversation()
        await collect(other, "别的对话")
        await agent.aclose()
        return conv, other, first, second

    conv, other, first, second = asyncio.run(run())
    assert "".join(first) == REPLY and len(first) == len(tokenize(REPLY)) > 5  # streamed, not one blob
    assert "".join(second) == "第二个回答。"
    assert srv.requests.count("POST /threads") == 2  # one per conversation, not per message
    assert [r.thread_id for r in srv.runs] == [conv.thread_id, conv.thread_id, other.thread_id]
    body = srv.runs[0].request
    assert body["assistant_id"] == "my-graph"
    assert body["input"] == {"messages": [{"role": "user", "content": "你好"}]}
    assert body["stream_mode"] == ["messages-tuple"]
    assert all(r.completed for r in srv.runs)


def test_openai_keeps_history_per_conversation(srv):
    async def run():
        agent = build_agent(AgentConfig(kind="openai", url=srv.url + "/v1", model="m", api_key="k", timeout=5))
        conv = agent.conversation()
        a = await collect(conv, "first")
        b = await collect(conv, "second")
        await agent.aclose()
        return a, b

    a, b = asyncio.run(run())
    assert "".join(a) == REPLY and "".join(b) == "第二个回答。"
    req = srv.runs[1].request
    assert req["stream"] is True and req["model"] == "m"
    assert req["messages"] == [{"role": "user", "content": "first"}, {"role": "assistant", "content": REPLY},
                               {"role": "user", "content": "second"}]


@pytest.mark.parametrize("kind", ["langgraph", "openai"])
def test_cancelling_the_consumer_closes_the_stream(srv, kind):
    """Barge-in path: the bridge stops reading; the agent server must see the disconnect."""
    srv.reset(script=["one two three four five six seven eight nine ten"], token_delay=0.1)

    async def run():
        agent = build_agent(AgentConfig(kind=kind, url=srv.url, timeout=5))
        conv = agent.conversation()
        got = []

        async def consume():
            async for d in stream_reply(conv, "go", 5):
                got.append(d)

        task = asyncio.create_task(consume())
        while len(got) < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        t_cancel = time.monotonic()
        await agent.aclose()
        return got, t_cancel

    got, t_cancel = asyncio.run(run())
    assert srv.wait_for(lambda: srv.runs and srv.runs[-1].disconnected, 3.0)
    run_ = srv.runs[-1]
    assert not run_.completed and len(run_.tokens_sent) < 10
    assert run_.disconnected_at - t_cancel < 0.5


@pytest.mark.parametrize("kind", ["langgraph", "openai"])
@pytest.mark.parametrize("mode,code", [("error", "agent_error"), ("drop", "unavailable"), ("http500", "agent_error")])
def test_agent_failures_are_agent_errors(srv, kind, mode, code):
    srv.reset(fail_mode=mode, fail_after=2)

    async def run():
        agent = build_agent(AgentConfig(kind=kind, url=srv.url, timeout=5))
        got = []
        try:
            async for d in stream_reply(agent.conversation(), "x", 5):
                got.append(d)
        finally:
            await agent.aclose()
        return got

    with pytest.raises(AgentError) as e:
        asyncio.run(run())
    assert e.value.code == code, e.value.message


def test_token_timeout(srv):
    """A stalled agent (first token arrives, then nothing) fails after agent.timeout."""
    srv.reset(fail_mode="hang", fail_after=2)

    async def run():
        agent = build_agent(AgentConfig(kind="langgraph", url=srv.url, timeout=0.5))
        got = []
        t0 = time.monotonic()
        try:
            async for d in stream_reply(agent.conversation(), "x", 0.5):
                got.append(d)
        except AgentError as e:
            return got, e, time.monotonic() - t0
        finally:
            await agent.aclose()

    got, err, took = asyncio.run(run())
    assert len(got) == 2 and err.code == "timeout" and 0.4 < took < 2.0
    assert srv.wait_for(lambda: srv.runs[-1].disconnected, 3.0)


def test_unreachable_agent():
    url = f"http://127.0.0.1:{free_port()}"

    async def run():
        agent = build_agent(AgentConfig(kind="langgraph", url=url, timeout=2))
        try:
            return await collect(agent.conversation(), "x", 2)
        finally:
            await agent.aclose()

    with pytest.raises(AgentError) as e:
        asyncio.run(run())
    assert e.value.code == "unavailable"
    ok, why = asyncio.run(probe_agent(AgentConfig(kind="openai", url=url), timeout=1.0))
    assert not ok and "not reachable" in why


def test_probe_agent_cli(srv, tmp_path):
    """`s2s-bridge --probe-agent`: exit 0 when the agent answers, 1 with one line when not."""
    def run(url, kind="langgraph"):
        cfg = tmp_path / f"{kind}.yaml"
        cfg.write_text(f"agent: {{kind: {kind}, url: '{url}'}}\n")
        return subprocess.run([sys.executable, "-m", "bridge", "--config", str(cfg), "--probe-agent"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)

    ok = run(srv.url)
    assert ok.returncode == 0, ok.stderr
    assert "answers" in ok.stdout
    assert run(srv.url, "openai").returncode == 0
    assert run("http://x", "echo").returncode == 0
    bad = run(f"http://127.0.0.1:{free_port()}")
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "not reachable" in lines[0], bad.stderr
