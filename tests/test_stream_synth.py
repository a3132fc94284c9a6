"""Streamed text into one synthesis request (issue 26) and the first clause on its own (issue 25).

The daemon is the real one (tests/daemon_harness.py): the FAKE TTS engine where the test is
about the protocol (sentences cut across chunks, hold/release, cancel, the bounds on what the
client chooses), the bundled Kokoro+Piper for one end-to-end check. The bridge's reply is one
daemon request: counted in the daemon's log, with the page's per-sentence events unchanged.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import List

import pytest

from daemon.wire import protocol as P
from daemon.tts import textsplit
from daemon.wire.client import AsyncTTSClient, DaemonError, TTSClient
from daemon.errors import ErrorCode
from daemon_harness import DaemonProcess

MAX_TEXT = 300
MAX_CHUNKS = 40
RATE = 20.0
IDLE = 1.5


@pytest.fixture(scope="module")
def d(tmp_path_factory, models_dir):
    p = DaemonProcess(tmp_path_factory.mktemp("streamsynth"), {
        "models_root": str(models_dir),
        "limits": {"max_text_chars": MAX_TEXT, "max_text_chunks": MAX_CHUNKS, "max_text_chunks_per_second": RATE,
                   "text_idle_timeout": IDLE},
    })
    p.wait_ready(30)
    yield p
    p.stop()


def _rest(s, timeout: float = 10.0) -> List[P.SynthAudio]:
    """Every chunk until done (the blocking stream, after end())."""
    return list(s)


def _sentences(chunks: List[P.SynthAudio]) -> List[str]:
    out: dict = {}
    for c in chunks:
        out.setdefault(c.sentence, c.text)
    return [out[i] for i in sorted(out)]


# --- the splitter: the first clause -----------------------------------------------------------


def test_first_clause_is_cut_once_long_enough():
    buf = textsplit.SentenceBuffer(first_clause_cjk=textsplit.FIRST_CLAUSE_MIN_CJK)
    out: List[str] = []
    for ch in "今天北京天气很好，气温二十五度，有风。明天下雨，记得带伞。":
        out += buf.push(ch)
    out += buf.flush()
    # only the first sentence's first clause is apart; later commas stay inside their sentence
    assert out == ["今天北京天气很好，", "气温二十五度，有风。", "明天下雨，记得带伞。"]
    assert textsplit.split_sentences("今天北京天气很好，气温二十五度。明天下雨，记得带伞。",
                                     first_clause_cjk=6) == ["今天北京天气很好，", "气温二十五度。", "明天下雨，记得带伞。"]


@pytest.mark.parametrize("text,expected", [
    ("你好，我是你的语音助手。", ["你好，", "我是你的语音助手。"]),  # 2 characters: an opener of its own
    ("好的，已经为你设置了计时器。", ["好的，", "已经为你设置了计时器。"]),
    ("嗯，好的。", ["嗯，好的。"]),  # 1 character: too short to stand alone
    ("打开客厅灯、空调和窗帘。", ["打开客厅灯、", "空调和窗帘。"]),
    ("提醒事项如下：明天上午十点开会。", ["提醒事项如下：", "明天上午十点开会。"]),
    ("Well, hello there, my friend. Yes.", ["Well, hello there, my friend.", "Yes."]),  # English: never
    ("今天是2024年5月1日，晴。", ["今天是2024年5月1日，", "晴。"]),  # digits: not counted, 6 CJK
    ("2024年5月1日，晴。", ["2024年5月1日，", "晴。"]),  # digits: not counted, 3 CJK
    ("没有逗号的一整句话说完了。", ["没有逗号的一整句话说完了。"]),
])
def test_first_clause_cases(text, expected):
    assert textsplit.split_sentences(text, first_clause_cjk=textsplit.FIRST_CLAUSE_MIN_CJK) == expected
    buf = textsplit.SentenceBuffer(first_clause_cjk=textsplit.FIRST_CLAUSE_MIN_CJK)
    out: List[str] = []
    for i in range(0, len(text), 3):
        out += buf.push(text[i:i + 3])
    assert out + buf.flush() == expected


def test_first_clause_of_a_whole_text():
    assert textsplit.first_clause("今天北京天气很好，气温二十五度。") == ("今天北京天气很好，", "气温二十五度。")
    assert textsplit.first_clause("今天北京天气很好，") == ("", "今天北京天气很好，")  # nothing after it
    assert textsplit.first_clause("你好。今天北京天气很好，晴。") == ("", "你好。今天北京天气很好，晴。")
    assert textsplit.split_sentences("你好，世界。") == ["你好，世界。"]  # off unless asked


def test_drop_partial():
    buf = textsplit.SentenceBuffer()
    assert buf.push("第一句话说完了。第二") == ["第一句话说完了。"]
    assert buf.drop_partial() == "第二"
    assert buf.push("抱歉。") == ["抱歉。"]


# --- the protocol against the real daemon (fake engine) --------------------------------------------


def test_sentences_cut_across_chunks_one_request(d):
    with TTSClient(d.tts, timeout=10) as t:
        s = t.synthesize_stream(text="今天天")
        s.send("气不错。明")
        first = s.poll(5.0)  # the first sentence is spoken before the text ends
        assert first and _sentences(first) == ["今天天气不错。"], first
        s.send("天下")
        s.send("雨吗？Sure, I can help. Give me one")
        s.end(" second")
        chunks = first + _rest(s)
    assert _sentences(chunks) == ["今天天气不错。", "明天下雨吗？", "Sure, I can help.", "Give me one second"]
    assert all(c.request_id == s.request_id and c.sample_rate == 24000 for c in chunks)
    assert [c.seq for c in chunks] == list(range(len(chunks)))


def test_first_clause_first_and_done_counts(d):
    with TTSClient(d.tts, timeout=10) as t:
        s = t.synthesize_stream()
        s.send("今天北京天气很好，")
        first = s.poll(5.0)
        assert _sentences(first) == ["今天北京天气很好，"]  # spoken before the sentence ends
        s.end("气温二十五度。")
        chunks = first + _rest(s)
        assert _sentences(chunks) == ["今天北京天气很好，", "气温二十五度。"]
        # a whole text's first clause goes first too (stream=True), the rest as the engine splits it
        whole = list(t.synthesize("今天北京天气很好，气温二十五度。明天下雨。"))
        assert _sentences(whole) == ["今天北京天气很好，", "气温二十五度。", "明天下雨。"]


def test_a_sentence_without_an_end_waits_for_the_final_chunk(d):
    with TTSClient(d.tts, timeout=10) as t:
        s = t.synthesize_stream(text="这句话没有句号")
        assert s.poll(0.8) == []  # nothing complete: nothing synthesised
        s.send("也没有逗号")
        assert s.poll(0.5) == []
        s.end()
        assert _sentences(_rest(s)) == ["这句话没有句号也没有逗号"]


def test_hold_speaks_only_the_first_sentence_until_release(d):
    with TTSClient(d.tts, timeout=10) as t:
        s = t.synthesize_stream(text="第一句。第二句。", hold=True)
        s.send("第三句。")
        got = s.poll(3.0)
        time.sleep(0.5)
        got += s.poll(0.0)
        assert _sentences(got) == ["第一句。"]
        s.end("第四句。")  # ended, still held
        time.sleep(0.3)
        assert s.poll(0.0) == []
        s.release()  # a bare release may follow the end
        assert _sentences(got + _rest(s)) == ["第一句。", "第二句。", "第三句。", "第四句。"]


def test_drop_partial_then_apology(d):
    with TTSClient(d.tts, timeout=10) as t:
        s = t.synthesize_stream(text="第一句话说完了。第二")
        s.end("抱歉，出错了。", drop_partial=True)
        assert _sentences(_rest(s)) == ["第一句话说完了。", "抱歉，出错了。"]


def test_cancel_mid_stream(d):
    with TTSClient(d.tts, timeout=10) as t:
        s = t.synthesize_stream(text="[slow] 一。[slow] 二。[slow] 三。[slow] 四。")
        first = s.poll(5.0)
        assert first
        s.cancel()
        after = list(s)  # ends at `cancelled`
        assert len(after) <= 2 and s.finished
        with pytest.raises(DaemonError) as e:  # the request is gone: more text is refused
            t.request(P.TextChunk(request_id=s.request_id, text="五。"), (P.Done,), 3)
        assert e.value.code == ErrorCode.BAD_REQUEST
        assert _sentences(list(t.synthesize("好的。"))) == ["好的。"]  # the worker is free


def _refused(s, code: ErrorCode, match: str) -> None:
    with pytest.raises(DaemonError) as e:
        list(s)
    assert e.value.code == code and re.search(match, e.value.message), e.value


def test_too_much_text_ends_the_request(d):
    with TTSClient(d.tts, timeout=10) as t:
        s = t.synthesize_stream(text="好。" * 100)
        s.send("对。" * 60)  # 320 > 300
        _refused(s, ErrorCode.BAD_TEXT, r"max_text_chars=300")


def test_too_many_chunks_ends_the_request(d):
    with TTSClient(d.tts, timeout=10) as t:
        s = t.synthesize_stream()
        for _ in range(MAX_CHUNKS + 1):
            s.send("字")
            time.sleep(1.2 / RATE)  # within the rate
        _refused(s, ErrorCode.BAD_REQUEST, r"max_text_chunks=40")


def test_chunks_too_fast_end_the_request(d):
    with TTSClient(d.tts, timeout=10) as t:
        s = t.synthesize_stream()
        for _ in range(int(RATE) + 5):  # a burst past one second's worth
            s.send("字")
        _refused(s, ErrorCode.BAD_REQUEST, r"max_text_chunks_per_second")


def test_an_idle_stream_is_ended(d):
    with TTSClient(d.tts, timeout=10) as t:
        s = t.synthesize_stream(text="说了一半。然后")
        t0 = time.monotonic()
        got = s.poll(3.0)
        assert _sentences(got) == ["说了一半。"]  # what was complete is spoken
        _refused(s, ErrorCode.TIMEOUT, r"text_idle_timeout")
        assert IDLE - 0.2 < time.monotonic() - t0 < IDLE + 3.0


def test_text_chunk_misuse(d):
    with TTSClient(d.tts, timeout=5) as t:
        with pytest.raises(DaemonError) as e:
            t.request(P.TextChunk(request_id="nobody", text="x"), (P.Done,), 3)
        assert e.value.code == ErrorCode.BAD_REQUEST and "no active request" in e.value.message
        s = t.synthesize_stream(text="好。")
        s.end()
        with pytest.raises(DaemonError) as e:  # after the final chunk
            t.request(P.TextChunk(request_id=s.request_id, text="又来。"), (P.Done,), 3)
        assert e.value.code == ErrorCode.BAD_REQUEST
        # an empty streamed request says so
        s = t.synthesize_stream()
        s.end("。！")
        _refused(s, ErrorCode.BAD_TEXT, r"speakable")


def test_async_client_stream(d):
    async def go():
        async with AsyncTTSClient(d.tts, timeout=10) as t:
            s = await t.synthesize_stream(owner="o1")
            chunks: List[P.SynthAudio] = []

            async def read():
                async for c in s:
                    chunks.append(c)

            reader = asyncio.create_task(read())
            for piece in ["你好", "。今天", "天气好。", "Bye."]:
                await s.send(piece)
                await asyncio.sleep(0.05)
            await s.end()
            await asyncio.wait_for(reader, 10)
            return chunks

    chunks = asyncio.run(go())
    assert _sentences(chunks) == ["你好。", "今天天气好。", "Bye."]


# --- end to end with the bundled voices ------------------------------------------------------------


@pytest.fixture(scope="module")
def kokoro_daemon(tmp_path_factory, models_dir):
    p = DaemonProcess(tmp_path_factory.mktemp("streamkokoro"), {
        "models_root": str(models_dir), "asr": {"device": "cpu"},
        "tts": {"engine": "kokoro+piper", "device": "cpu", "fallback_engine": "none"},
    }, fake=False, watchdog_usec=30_000_000)
    p.wait_ready(300)
    yield p
    p.stop()


def test_streamed_reply_with_kokoro_and_piper(kokoro_daemon):
    """An LLM-like stream through the real Kokoro+Piper: the first clause first, every sentence as
    its own audio (English routed to Piper), the sentence indexes and texts on the chunks."""
    with TTSClient(kokoro_daemon.tts, timeout=120) as t:
        before = t.describe()["tts"]["details"]
        s = t.synthesize_stream(language="zh")
        for piece in ["根据天气", "预报，明天", "北京会下雨。最高", "气温二十五度。"]:
            s.send(piece)
            time.sleep(0.05)
        s.end("Take an umbrella.")
        chunks = list(s)
        after = t.describe()["tts"]["details"]
    assert _sentences(chunks) == ["根据天气预报，", "明天北京会下雨。", "最高气温二十五度。", "Take an umbrella."]
    seconds = {i: sum(len(c.pcm) for c in chunks if c.sentence == i) / 2 / 24000 for i in range(4)}
    assert all(0.6 < seconds[i] < 6.0 for i in range(4)), seconds
    assert after["requests_en"] == before["requests_en"] + 1  # one sentence to the English voice
    assert after["requests_zh"] == before["requests_zh"] + 3


# --- the bridge: one reply, one daemon request ---------------------------------------------------

from bridge_procs import start_bridge, start_daemon, write_config  # noqa: E402
from fake_langgraph import FakeAgentServer  # noqa: E402
from helpers.ws import WSClient  # noqa: E402

REPLY = "今天北京天气很好，气温二十五度。明天下雨。Take an umbrella. 记得带伞"
BRIDGE_MAX_TEXT = 60


@pytest.fixture(scope="module")
def agent_srv():
    with FakeAgentServer(script=[REPLY]) as s:
        yield s


@pytest.fixture(scope="module")
def bridge_stack(tmp_path_factory, models_dir, agent_srv):
    """FAKE engines (the test is about requests, not speech), a bridge on the fake agent; a reply
    longer than limits.max_text_chars (60 here) spans two requests."""
    d = tmp_path_factory.mktemp("stream-bridge")
    cfg = write_config(d / "s2s.yaml", models_dir, d / "run", limits={"max_text_chars": BRIDGE_MAX_TEXT},
                       agent={"kind": "langgraph", "url": agent_srv.url, "timeout": 5.0})
    daemon = start_daemon(cfg, d / "daemon.log", fake_engines=True, timeout=60)
    bridge = start_bridge(cfg, d / "bridge.log")
    yield daemon, bridge
    bridge.stop()
    daemon.stop()


def _requests(daemon) -> List[str]:
    """The daemon's finished TTS requests, from its log: 'tts <request id>: N sentences ...'."""
    return re.findall(r"tts (\S+): (\d+) sentences.*\(streamed text\)", daemon.text())


def _typed_turn(bridge, text: str, sentences: int):
    async def go():
        c = await WSClient.open(bridge.ws)
        await c.wait_event("hello")
        await c.send_json({"type": "text", "text": text})
        await c.wait(lambda: len(c.of("tts_end")) >= sentences, 30, "the reply spoken")
        await c.wait_event("agent_done")
        await asyncio.sleep(0.3)
        await c.close()
        return c

    return asyncio.run(asyncio.wait_for(go(), 60))


def test_a_reply_is_one_daemon_request(bridge_stack, agent_srv):
    daemon, bridge = bridge_stack
    agent_srv.reset(script=[REPLY], token_delay=0.08)
    before = len(_requests(daemon))
    c = _typed_turn(bridge, "明天天气怎么样", 5)
    starts, ends = c.of("tts_start"), c.of("tts_end")
    # the page's events per sentence, as before; the first clause is a piece of its own
    assert [(s["sentence"], s["text"]) for s in starts] == list(enumerate(
        ["今天北京天气很好，", "气温二十五度。", "明天下雨。", "Take an umbrella.", "记得带伞"]))
    assert [e["sentence"] for e in ends] == [0, 1, 2, 3, 4] and not any(e.get("error") for e in ends)
    # ... from one request at the daemon: the connection's turn 1
    assert _requests(daemon)[before:] == [(f"{c.of('hello')[0]['connection']}-1", "5")]
    # the first sentence was heard before the agent finished writing
    run = agent_srv.runs[-1]
    first_audio = next(t for t, e in c.events if isinstance(e, bytes))
    assert first_audio < run.token_times[-1], (first_audio - run.started, run.token_times[-1] - run.started)


def test_a_reply_past_one_requests_text_goes_on_in_a_second(bridge_stack, agent_srv):
    daemon, bridge = bridge_stack
    long = "这是第一句比较长的话。" * 4 + "这是后面的话。" * 4  # 44 + 28 = 72 > 60 characters
    agent_srv.reset(script=[long], token_delay=0.0)
    before = len(_requests(daemon))
    c = _typed_turn(bridge, "说长一点", 9)
    starts = c.of("tts_start")
    assert [s["sentence"] for s in starts] == list(range(len(starts)))  # numbered on across requests
    assert "".join(s["text"] for s in starts) == long
    conn = c.of("hello")[0]["connection"]
    # 8 pieces: the first sentence's word cut (这是第一句 | 比较长的话。, textsplit) and 7 sentences
    assert _requests(daemon)[before:] == [(f"{conn}-1", "8"), (f"{conn}-1-1", "2")]
