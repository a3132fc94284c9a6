"""The bridge as real processes: `python -m daemon` + `python -m bridge` subprocesses, the FAKE
agent server (tests/fake_langgraph.py) and websockets clients.

Two daemons, each started once for the module:
- `fake_daemon`: FAKE engines (tests/fake_engines.py, energy VAD + tone TTS) for the tests
  about the bridge itself: HTTP and static files, origin, token, bad input, connection cap,
  backpressure, agent failures. It starts in a second.
- `real_daemon`: bundled Whisper base + fsmn-vad + Piper voice, for the acceptance tests:
  tests/fixtures/zh/long.wav streamed in real time (4 finals, replies, audio per sentence,
  first audio before the agent's last token) and barge-in.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any, List

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bridge_procs import start_bridge, start_daemon, write_config
from helpers.ws import WSClient, http_get, metrics, read_pcm, silence
from fake_langgraph import FakeAgentServer

# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent_srv():
    with FakeAgentServer(script=["好的。"]) as s:
        yield s


@pytest.fixture(scope="module")
def fake_daemon(tmp_path_factory, models_dir):
    d = tmp_path_factory.mktemp("fake-daemon")
    cfg = write_config(d / "daemon.yaml", models_dir, d / "run")
    proc = start_daemon(cfg, d / "daemon.log", fake_engines=True, timeout=60)
    yield d, proc
    proc.stop()


@pytest.fixture(scope="module")
def bridge_a(fake_daemon, agent_srv, models_dir):
    """No token, own-origin only, small send queue (256 KiB, 1 s), langgraph -> fake agent."""
    d, _ = fake_daemon
    cfg = write_config(d / "bridge-a.yaml", models_dir, d / "run",
                       bridge={"max_connections": 8, "max_message_bytes": 65536, "send_queue_bytes": 262144,
                               "slow_client_timeout": 1.0},
                       agent={"kind": "langgraph", "url": agent_srv.url, "timeout": 1.5})
    b = start_bridge(cfg, d / "bridge-a.log")
    yield b
    assert b.stop() == 0, b.text()[-2000:]


@pytest.fixture(scope="module")
def bridge_b(fake_daemon, agent_srv, models_dir):
    """Token required, one allowed origin, at most 3 connections, echo agent."""
    d, _ = fake_daemon
    cfg = write_config(d / "bridge-b.yaml", models_dir, d / "run",
                       bridge={"token": "s3cret", "allowed_origins": ["https://app.example"], "max_connections": 3},
                       agent={"kind": "echo"})
    b = start_bridge(cfg, d / "bridge-b.log")
    yield b
    b.stop()


@pytest.fixture(autouse=True)
def _reset_agent(agent_srv):
    agent_srv.reset(script=["好的。"], token_delay=0.0, first_token_delay=0.0)


def run(coro, timeout: float = 120.0):
    async def guarded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(guarded())


# --- HTTP: page, assets, traversal, health ----------------------------------------------------------


def test_serves_the_page_and_assets(bridge_a):
    status, headers, body = http_get(bridge_a.port, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"app.js" in body and "content-security-policy" in headers
    for path, ctype in (("/index.html", "text/html"), ("/app.js", "text/javascript"),
                        ("/worklet.js", "text/javascript"), ("/style.css", "text/css")):
        status, headers, body = http_get(bridge_a.port, path)
        assert status == 200 and headers["content-type"].startswith(ctype), path
        assert len(body) == int(headers["content-length"]) > 100
    assert b"registerProcessor" in http_get(bridge_a.port, "/worklet.js")[2]


@pytest.mark.parametrize("path", [
    "/../daemon/config.py", "/../server.py", "/%2e%2e/server.py", "/%2E%2E%2Fserver.py", "/..%2fserver.py",
    "/..%5cserver.py", "/static/../server.py", "/%252e%252e/server.py", "/./index.html", "//etc/passwd",
    "/%2fetc%2fpasswd", "/.hidden", "/nope.js", "/index.html%00.js", "/__init__.py", "/..", "/%ff%fe",
    "/../../../../../../etc/passwd",
])
def test_nothing_outside_static(bridge_a, path):
    status, _, body = http_get(bridge_a.port, path)
    assert status == 404, (path, body[:100])


def test_healthz_ok(bridge_a):
    status, headers, body = http_get(bridge_a.port, "/healthz")
    h = json.loads(body)
    assert status == 200 and h["status"] == "ok", h
    # no token configured: the public view (status, engines, fallbacks, the agent's kind)
    assert h["daemon"]["reachable"] and h["daemon"]["engines"]["asr"]["engine"] == "fake"
    assert h["agent"]["kind"] == "langgraph" and h["agent"]["reachable"] and not h["agent"]["echo_fallback"]
    assert "url" not in h["agent"] and "asr" not in h["daemon"]


def test_healthz_degraded_and_echo_fallback(tmp_path, models_dir):
    """No daemon, configured agent down, bridge started on --agent echo: 503, and it says so."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg = write_config(tmp_path / "c.yaml", models_dir, tmp_path / "run-nothing",
                       agent={"kind": "langgraph", "url": dead})
    b = start_bridge(cfg, tmp_path / "bridge.log", agent="echo")
    try:
        status, _, body = http_get(b.port, "/healthz")
        h = json.loads(body)
        assert status == 503 and h["status"] == "degraded"
        assert not h["daemon"]["reachable"]
        a = h["agent"]
        assert a["kind"] == "echo" and a["echo_fallback"] and a["configured_kind"] == "langgraph"
        assert a["configured_reachable"] is False and "echo" in a["notice"] and dead not in a["notice"]

        async def go():
            c = await WSClient.open(b.ws)
            hello = await c.wait_event("hello")
            assert hello["agent"]["echo_fallback"] and "echo" in hello["agent"]["notice"]
            # no daemon: start fails with a clear error, typed text still gets an echo (no TTS: an error)
            await c.send_json({"type": "start"})
            err = await c.wait_event("error")
            assert err["source"] == "asr" and err["code"] in ("unavailable", "timeout"), err
            await c.send_json({"type": "text", "text": "你好"})
            done = await c.wait_event("agent_done")
            assert done["text"] == "你说的是：你好"
            await c.wait(lambda: any(e.get("source") == "tts" for e in c.of("error")), 10, "tts error")
            await c.close()

        run(go())
    finally:
        b.stop()
    assert "echo agent" in b.text()  # said on the console too


# --- origin, token, connection cap ------------------------------------------------------------------


def test_origin_check(bridge_a, bridge_b):
    async def go():
        own = f"http://127.0.0.1:{bridge_a.port}"
        c = await WSClient.open(bridge_a.ws, origin=own)
        await c.wait_event("hello")
        await c.close()
        for url, origin in ((bridge_a.ws, "http://evil.example"), (bridge_a.ws, f"http://127.0.0.1:{bridge_a.port + 1}"),
                            (bridge_b.ws, f"http://127.0.0.1:{bridge_b.port}"),
                            (bridge_b.ws, "https://evil.example")):
            with pytest.raises(InvalidStatus) as e:
                await WSClient.open(url, origin=origin)
            assert e.value.response.status_code == 403
        c = await WSClient.open(bridge_b.ws, origin="https://app.example")
        await c.wait_event("hello")
        await c.close()

    run(go())


def test_token(bridge_b):
    async def go():
        # never in the URL (browser history, proxy logs), right or wrong
        for q in ("?token=wrong", "?token=s3cret"):
            with pytest.raises(InvalidStatus) as e:
                await WSClient.open(bridge_b.ws + q)
            assert e.value.response.status_code == 400
        # no token: the first message must carry it
        c = await WSClient.open(bridge_b.ws)
        assert (await c.wait_event("hello"))["auth_required"] is True
        await c.send_json({"type": "start", "language": "zh"})
        err = await c.wait_event("error")
        assert err["code"] == "unauthorized"
        await c.wait(lambda: c.closed is not None, 5, "close")
        assert c.closed.rcvd.code == 1008 and c.closed.rcvd.reason == "unauthorized"
        # audio first: same
        c = await WSClient.open(bridge_b.ws)
        await c.ws.send(silence(0.1))
        await c.wait(lambda: c.closed is not None, 5, "close")
        assert c.closed.rcvd.code == 1008
        # token in the start message
        c = await WSClient.open(bridge_b.ws)
        await c.send_json({"type": "start", "language": "zh", "token": "s3cret"})
        await c.wait_event("ready")
        await c.close()
        # token in a typed message
        c = await WSClient.open(bridge_b.ws)
        await c.send_json({"type": "text", "text": "hi", "token": "s3cret"})
        assert (await c.wait_event("agent_done"))["text"] == "You said: hi"
        await c.close()

    run(go())


def test_connection_cap(bridge_b):
    async def go():
        # The cap counts logged-in connections (those waiting to log in have their own budget,
        # bridge.max_pending_logins): the fourth login is refused.
        url = bridge_b.ws
        clients = [await WSClient.open(url) for _ in range(3)]
        for i, c in enumerate(clients):
            await c.send_json({"type": "text", "text": f"n{i}", "token": "s3cret"})
            await c.wait_event("user_text")  # logged in
        extra = await WSClient.open(url)
        await extra.wait_event("hello")
        await extra.send_json({"type": "text", "text": "extra", "token": "s3cret"})
        await extra.wait(lambda: extra.closed is not None, 5, "close")
        assert extra.closed.rcvd.code == 1013 and extra.closed.rcvd.reason == "too many connections"
        assert not extra.of("agent_done")
        # the others are unaffected
        for i, c in enumerate(clients):
            assert (await c.wait_event("agent_done"))["text"] == f"You said: n{i}"
            await c.wait(lambda: c.audio(), 10, "audio")
            await c.close()
        # a slot is free again
        await asyncio.sleep(0.3)
        c = await WSClient.open(url)
        await c.send_json({"type": "text", "text": "again", "token": "s3cret"})
        await c.wait_event("agent_done")
        await c.close()

    run(go())


# --- bad input ----------------------------------------------------------------------------------------


def test_bad_input_gets_clear_errors_and_the_connection_survives(bridge_a):
    async def go():
        other = await WSClient.open(bridge_a.ws)
        await other.wait_event("hello")
        c = await WSClient.open(bridge_a.ws)
        await c.wait_event("hello")
        await c.ws.send(silence(0.2))                 # audio before start
        await c.ws.send(silence(0.2))                 # ... warned once, then dropped
        await c.ws.send("this is not json")
        await c.ws.send("[1, 2, 3]")
        await c.send_json({"no": "type"})
        await c.send_json({"type": "dance"})
        await c.send_json({"type": "start", "language": "klingon"})
        await c.send_json({"type": "start", "hotwords": "not a list"})
        await c.send_json({"type": "text", "text": ""})
        await c.send_json({"type": "text", "text": "x" * 5000})
        await c.wait(lambda: len(c.of("error")) >= 9, 5, "9 errors")
        codes = [e["code"] for e in c.of("error")]
        assert codes == ["not_started", "bad_message", "bad_message", "bad_message", "unknown_type", "bad_message",
                         "bad_message", "bad_message", "bad_message"], codes
        assert all(e["message"] and e["source"] == "bridge" for e in c.of("error"))
        await c.send_json({"type": "start", "language": "zh"})
        await c.wait_event("ready")
        await c.ws.send(b"\x01\x02\x03")              # odd length
        err = await c.wait_event("error", 10)
        assert err["code"] == "bad_audio" and "even" in err["message"]
        # still usable: speech in, final out, reply audio back
        await c.stream(silence(0.3) + read_pcm(Path(__file__).parent / "fixtures" / "zh" / "01.wav") + silence(1.0))
        final = await c.wait_event("final", 1, 20)
        assert final["text"].startswith("utt0 bytes=") and final["latency_ms"] is not None
        await c.wait(lambda: c.audio(), 20, "reply audio")
        # too big a message closes that connection (1009) ...
        await c.ws.send(b"\0" * 70000)
        await c.wait(lambda: c.closed is not None, 5, "close")
        assert c.closed.sent is None or c.closed.rcvd.code == 1009
        # ... and no other
        await other.send_json({"type": "text", "text": "still there?"})
        await other.wait_event("agent_done")
        await other.close()

    run(go())


def test_client_that_never_reads_is_closed_and_others_are_unaffected(bridge_a, agent_srv):
    """Backpressure: the send queue (256 KiB here) stays full for 1 s -> close, memory bounded."""
    # ~60 sentences of fake tone audio: about 9 MB, far more than socket buffers + queue.
    agent_srv.reset(script=["".join(f"这是第{i}个很长的句子，用来产生很多很多的声音数据给那个不读数据的浏览器。"
                                    for i in range(60))])

    async def go():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", bridge_a.port))
        slow = await connect(bridge_a.ws, sock=s, proxy=None, compression=None, max_queue=1)
        await slow.send(json.dumps({"type": "text", "text": "说很多话"}))
        t0 = time.monotonic()
        good = await WSClient.open(bridge_a.ws)
        await good.wait_event("hello")
        # the slow one is closed within queue timeout + close timeout (+ slack)
        deadline = time.monotonic() + 20
        while True:
            m = metrics(bridge_a.port)
            if m.get('s2s_bridge_closed_total{reason="client too slow"}', 0) >= 1:
                break
            assert time.monotonic() < deadline, m
            await asyncio.sleep(0.2)
        took = time.monotonic() - t0
        # reading now drains what was buffered, then the connection is gone
        n = 0
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(slow.recv(), 10)
                n += 1
        assert n > 0 and took < 15
        # the other connection works normally meanwhile
        agent_srv.reset(script=["好的。"])
        await good.send_json({"type": "text", "text": "你好"})
        await good.wait_event("agent_done")
        await good.wait(lambda: good.audio(), 10, "audio")
        await good.close()

    run(go())


# --- agent failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["error", "hang", "drop"])
def test_agent_failure_is_said_and_shown(bridge_a, agent_srv, mode):
    """Mid-reply failure: an `error` event and a short spoken apology; never silence."""
    agent_srv.reset(script=["第一句话说完了。第二句话永远说不完"], fail_mode=mode, fail_after=10)

    async def go():
        c = await WSClient.open(bridge_a.ws)
        await c.send_json({"type": "text", "text": "讲个故事"})
        err = await c.wait_event("error", 1, 10)
        assert err["source"] == "agent" and err["code"] == {"error": "agent_error", "hang": "timeout",
                                                            "drop": "unavailable"}[mode], err
        done = await c.wait_event("agent_done")
        assert done["text"] == "第一句话说完了。第二" and done["error"] == err["code"]
        await c.wait(lambda: len(c.of("tts_end")) >= 2, 10, "two sentences spoken")
        starts = [e["text"] for e in c.of("tts_start")]
        assert starts == ["第一句话说完了。", "抱歉，助手暂时无法回答，请稍后再试。"]
        assert c.audio() and all(not e.get("error") for e in c.of("tts_end"))
        await c.close()

    run(go())


# --- acceptance with the real engines ------------------------------------------------------------------

REPLIES = ["Sure, I can help with that. Give me one second to check.",
           "Okay, the route is ready. Drive safely and take care."]


@pytest.fixture(scope="module")
def real_stack(tmp_path_factory, models_dir, agent_srv):
    d = tmp_path_factory.mktemp("real-daemon")
    cfg = write_config(d / "s2s.yaml", models_dir, d / "run", asr="whisper", tts="piper",
                       agent={"kind": "langgraph", "url": agent_srv.url, "timeout": 10.0})
    daemon = start_daemon(cfg, d / "daemon.log", timeout=240)
    bridge = start_bridge(cfg, d / "bridge.log")
    yield daemon, bridge
    bridge.stop()
    daemon.stop()


def _turn_events(c: WSClient, turn: int) -> List[Any]:
    """This turn's tts_start / audio / tts_end sequence, in arrival order."""
    out, current = [], None
    for _, e in c.events:
        if isinstance(e, dict) and e.get("type") in ("tts_start", "tts_end"):
            current = e["turn"]
            if current == turn:
                out.append((e["type"], e["sentence"]))
        elif isinstance(e, bytes) and current == turn:
            out.append(("audio", len(e)))
    return out


def test_long_wav_in_real_time(real_stack, agent_srv, fixtures_dir, manifest):
    """4 utterances streamed in real time: 4 finals, 4 replies, each reply sentence's 24 kHz
    audio in order, and the first audio before the agent wrote its last token."""
    _, bridge = real_stack
    agent_srv.reset(script=REPLIES, token_delay=0.2)
    segs = next(m for m in manifest if m["id"].endswith("long"))["segments"]

    async def go():
        c = await WSClient.open(bridge.ws)
        # barge_in off: the next utterance starts before a reply ends; every reply is heard in full
        await c.send_json({"type": "start", "language": "zh", "barge_in": False})
        ready = await c.wait_event("ready", 1, 20)
        assert ready["output_sample_rate"] == 24000
        await c.stream(read_pcm(fixtures_dir / "zh" / "long.wav") + silence(1.5), realtime=True)
        await c.wait(lambda: len([f for f in c.of("final") if f["text"]]) >= 4, 30, "4 finals")
        await c.wait(lambda: len(c.of("agent_done")) >= 4, 30, "4 replies")
        await c.wait(lambda: len(c.of("tts_end")) >= 8, 60, "8 sentences spoken")
        await c.close()
        return c

    c = run(go(), 180)
    finals = [f for f in c.of("final") if f["text"]]
    assert len(finals) == 4, finals
    import jiwer
    import re as _re
    norm = lambda s: _re.sub(r"[^\w]", "", s)
    for f, seg in zip(finals, segs):
        cer = jiwer.cer(" ".join(norm(seg["text"])), " ".join(norm(f["text"])))
        assert cer < 0.5, (f["text"], seg["text"], cer)
        # measured and plausible: not before turn.early_silence's 0.3 s pause (a whole sentence the
        # engine confirms ends there; at the VAD's end the final reuses the tentative's decode, so
        # it can come ~0.6 s after the last loud frame); speed targets live in s2s-bench
        assert f["latency_ms"] is not None and 300 < f["latency_ms"] < 20000, f
    # user turns -> agent runs, in order, with what was recognised (speculative runs started at a
    # comma pause and cancelled when the user went on are not turns)
    runs = [r for r in agent_srv.runs if r.completed and not r.cancelled]
    assert [r.user_text for r in runs] == [f["text"] for f in finals]
    assert [d["text"] for d in c.of("agent_done")] == [r.reply for r in runs]
    for turn in (1, 2, 3, 4):
        seq = _turn_events(c, turn)
        # sentence 0: start, audio..., end; then sentence 1
        kinds = [k for k, _ in seq]
        i_end0 = kinds.index("tts_end")
        assert seq[0] == ("tts_start", 0) and seq[i_end0] == ("tts_end", 0) and seq[-1] == ("tts_end", 1)
        assert "audio" in kinds[1:i_end0] and "audio" in kinds[i_end0 + 1:-1]
        assert all(n % 2 == 0 and n > 0 for k, n in seq if k == "audio")
    starts = c.of("tts_start")
    assert all(s["sample_rate"] == 24000 for s in starts)
    assert [s["text"] for s in starts[:2]] == ["Sure, I can help with that.", "Give me one second to check."]
    # sentence streaming: turn 1's first audio reached the client before the agent's last token was sent
    first_audio_t = next(t for t, e in c.events if isinstance(e, bytes))
    assert first_audio_t < runs[0].last_token_time, (first_audio_t - runs[0].started, runs[0].last_token_time - runs[0].started)
    # ~3 s of speech per reply at 24 kHz PCM16
    total = sum(len(b) for _, b in c.audio())
    assert total > 4 * 2 * 24000 * 1.5


def test_barge_in_stops_audio_and_cancels_the_agent(real_stack, agent_srv, fixtures_dir):
    _, bridge = real_stack
    long_reply = " ".join(f"This is sentence number {i} of a very long answer." for i in range(1, 30))
    agent_srv.reset(script=[long_reply, "Okay."], token_delay=0.05)

    async def go():
        c = await WSClient.open(bridge.ws)
        await c.send_json({"type": "start", "language": "zh"})
        await c.wait_event("ready", 1, 20)
        await c.stream(read_pcm(fixtures_dir / "zh" / "03.wav") + silence(1.2))  # faster than real time
        await c.wait_event("final", 1, 30)
        await c.wait(lambda: len(c.audio()) >= 2, 30, "reply audio streaming")
        assert not agent_srv.runs[0].completed  # the agent is still writing
        n_speech = len(c.of("speech_start"))
        # the user talks over the reply
        await c.stream(read_pcm(fixtures_dir / "zh" / "01.wav") + silence(1.2), realtime=True)
        await c.wait(lambda: c.of("interrupted"), 10, "interrupted")
        await c.wait(lambda: len(c.of("agent_done")) >= 1, 30, "second reply")
        await c.close()
        return c, n_speech

    c, n_speech = run(go(), 120)
    t_speech = [t for t, e in c.events if isinstance(e, dict) and e.get("type") == "speech_start"][n_speech]
    t_int, ev_int = next((t, e) for t, e in c.events if isinstance(e, dict) and e.get("type") == "interrupted")
    assert ev_int["turn"] == 1 and ev_int["reason"] in ("speech_start", "partial")
    assert t_int - t_speech < 0.3, t_int - t_speech
    # no audio of turn 1 after `interrupted`; turn 1 never reached its end
    after = [e for t, e in c.events if t > t_int]
    first_next = next((i for i, e in enumerate(after) if isinstance(e, dict) and e.get("type") == "tts_start"), len(after))
    assert not any(isinstance(e, bytes) for e in after[:first_next])
    assert all(e["turn"] != 1 for e in c.of("agent_done"))
    # the agent stream was cancelled: the fake agent saw the disconnect mid-reply
    first = agent_srv.runs[0]
    assert agent_srv.wait_for(lambda: first.disconnected, 3.0)
    assert not first.completed and len(first.tokens_sent) < len(long_reply.split())
    assert first.disconnected_at - t_int < 1.0


# --- per-turn timing and speculation counts for the page (issue 17) -------------------------------
# The speculation module's stack (tiny FunASR + fsmn-vad + the Piper voice, `turn.early_silence`
# 0.2 s, one bridge with `turn.speculate` on and one with it off), on this module's fake agent.

from test_speculation import FIX, _pcm16, _reply, _session, _split_with_pause, stack  # noqa: E402,F401

SPEC_KEYS = {"type", "released", "cancelled", "turns"}
SPEC_METRIC = 's2s_bridge_speculative_turns_total{outcome="%s"}'


def _at(c: WSClient, kind: str) -> List[Any]:
    return [(t, e) for t, e in c.events if isinstance(e, dict) and e.get("type") == kind]


async def _spoken(url: str, pcm: bytes, replies: int = 1) -> Any:
    c = await _session(url)
    t0 = time.monotonic()
    await c.stream(pcm, realtime=True)
    await c.wait(lambda: len(c.of("tts_end")) >= 2 * replies, 30, "the reply spoken")
    await asyncio.sleep(0.3)
    await c.close()
    return c, t0


def test_first_audio_says_speech_end_and_the_page_gets_a_released_speculative_turn(stack, agent_srv):
    """A sentence then silence: the reply prepared on the tentative is released at the final. Its
    `first_audio` has speech end -> first audio on the bridge's clock (= the final's latency + final
    -> first audio), and `speculation` counts it as released for the page."""
    on, _ = stack
    agent_srv.reset(script=_reply, token_delay=0.01, first_token_delay=0.05)
    before = metrics(on.port)
    c, t0 = run(_spoken(on.ws, read_pcm(FIX / "02.wav") + silence(1.5)))
    after = metrics(on.port)
    assert c.of("ready")[0]["speculate"] is True
    finals = [f for f in c.of("final") if f["text"]]
    assert len(finals) == 1, finals
    final = finals[0]
    (t_fa, fa), = _at(c, "first_audio")
    assert fa["turn"] == 1 and fa["speculative"] is True, fa
    # speech end -> first audio = speech end -> final + final -> first audio (a few ms between them)
    gap = fa["speech_end_ms"] - final["latency_ms"] - fa["latency_ms"]
    assert -1.0 <= gap < 100.0, (fa, final)
    # ...and what a client that sent the audio in real time sees: its sample at the final's `end`
    # went out at t0 + end, the first audio arrived at t_fa
    seen = (t_fa - (t0 + final["end"])) * 1000.0
    assert abs(seen - fa["speech_end_ms"]) < 300.0, (seen, fa)
    # the counts: every `speculation` event is counts only (never a dropped turn's text); the last
    # says one spoken turn, released; the cancelled ones (a comma pause) are the bridge's metric
    spec = c.of("speculation")
    assert spec and all(set(e) == SPEC_KEYS for e in spec), spec
    last = spec[-1]
    released = after[SPEC_METRIC % "released"] - before[SPEC_METRIC % "released"]
    cancelled = after[SPEC_METRIC % "cancelled"] - before[SPEC_METRIC % "cancelled"]
    assert (last["released"], last["cancelled"], last["turns"]) == (1, cancelled, 1) and released == 1, (spec, released,
                                                                                                        cancelled)
    # the release is reported before the reply's events, and nothing was sent while it was held
    t_final = _at(c, "final")[-1][0]
    t_last = _at(c, "speculation")[-1][0]
    assert t_final <= t_last <= t_fa
    assert all(t >= t_final for t, e in c.events if isinstance(e, bytes) or
               (isinstance(e, dict) and e.get("type") in ("agent_delta", "tts_start", "first_audio")))


def test_a_dropped_speculative_turn_is_counted_for_the_page_when_it_is_dropped(stack, agent_srv):
    """A sentence, a pause, the rest: the turn started on the first half is dropped when speech
    resumes; the page gets `speculation` with the new count then (before the final), no text of it,
    and the one reply's `first_audio` counts from the end of the whole sentence."""
    on, _ = stack
    agent_srv.reset(script=_reply, token_delay=0.02)
    audio, cut = _split_with_pause(FIX / "01.wav", 0.4)
    before = metrics(on.port)
    c, t0 = run(_spoken(on.ws, _pcm16(audio) + silence(1.5)))
    after = metrics(on.port)
    finals = [(t, f) for t, f in _at(c, "final") if f["text"]]
    assert len(finals) == 1, finals
    t_final, final = finals[0]
    spec = _at(c, "speculation")
    assert all(set(e) == SPEC_KEYS for _, e in spec), spec
    # the drop at the pause reached the page before the final, as a count
    dropped = [(t, e) for t, e in spec if t < t_final]
    assert dropped and dropped[0][1]["cancelled"] == 1 and dropped[0][1]["released"] == 0, spec
    assert dropped[0][1]["turns"] == 0
    # after the final: one spoken turn; released if the reply was prepared on the whole sentence
    (t_fa, fa), = _at(c, "first_audio")
    last = spec[-1][1]
    cancelled = after[SPEC_METRIC % "cancelled"] - before[SPEC_METRIC % "cancelled"]
    assert last == {"type": "speculation", "released": 1 if fa.get("speculative") else 0,
                    "cancelled": cancelled, "turns": 1}, (spec, cancelled)
    assert cancelled >= 1
    # speech end is the end of the whole sentence (after the pause), not of its first half
    assert final["end"] > cut + 0.4 + 0.5, (final, cut)
    assert fa["speech_end_ms"] >= final["latency_ms"] + fa["latency_ms"] - 1.0, (fa, final)
    seen = (t_fa - (t0 + final["end"])) * 1000.0
    assert abs(seen - fa["speech_end_ms"]) < 300.0, (seen, fa)


def test_speculation_off_sends_no_counts_and_typed_turns_no_speech_end(stack, agent_srv):
    """`turn.speculate: false`: `ready` says so, no `speculation` events; a spoken reply's
    `first_audio` still has `speech_end_ms` (not speculative); a typed one has none."""
    _, off = stack
    agent_srv.reset(script=_reply, token_delay=0.01)

    async def go():
        c, t0 = await _spoken(off.ws, read_pcm(FIX / "02.wav") + silence(1.5))
        t = await WSClient.open(off.ws)
        await t.send_json({"type": "text", "text": "hello there."})
        await t.wait_event("first_audio", 1, 30)
        await t.close()
        return c, t

    c, t = run(go())
    assert c.of("ready")[0]["speculate"] is False
    assert not c.of("speculation") and not t.of("speculation")
    fa, = c.of("first_audio")
    final = next(f for f in c.of("final") if f["text"])
    assert "speculative" not in fa and fa["speech_end_ms"] >= final["latency_ms"] + fa["latency_ms"] - 1.0, (fa, final)
    typed = t.of("first_audio")[0]
    assert "speech_end_ms" not in typed and "speculative" not in typed and typed["latency_ms"] > 0, typed
