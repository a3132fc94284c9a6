"""Speculative turns (issue 17): the daemon's `tentative`/`resume` events and the bridge's held
replies.

Engine level: the real fsmn-vad + tiny random FunASR models (daemon/models/tiny_funasr.py) and the
bundled Whisper base, in process. A tiny Paraformer's text is nonsense, but deterministic: the
same audio decodes to the same text, which is all these tests need.

Bridge level: `python -m daemon` (tiny FunASR + the Piper voice) and `python -m bridge` as real
processes, the FAKE LangGraph server (tests/fake_langgraph.py, which also records cancels), and a
websockets client streaming Mandarin fixtures in real time.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import yaml

from bridge_procs import start_bridge, start_daemon, write_config
from fake_langgraph import FakeAgentServer
from helpers.ws import WSClient, metrics, read_pcm, silence

SR = 16000
FIX = Path(__file__).parent / "fixtures" / "zh"


def _pcm_f32(path: Path) -> np.ndarray:
    return np.frombuffer(read_pcm(path), dtype="<i2").astype(np.float32) / 32768.0


def _split_with_pause(path: Path, pause: float) -> tuple:
    """(audio with a pause of `pause` s cut into the speech at a quiet point near the middle, where
    the first part ends in seconds)."""
    x = _pcm_f32(path)
    win = 320
    rms = np.sqrt(np.convolve(x * x, np.ones(win) / win, mode="same"))
    lo, hi = int(len(x) * 0.4), int(len(x) * 0.6)
    cut = lo + int(np.argmin(rms[lo:hi]))
    return np.concatenate([x[:cut], np.zeros(int(pause * SR), np.float32), x[cut:]]), cut / SR


def _run_engine(pool: Any, audio: np.ndarray, early: float, name: str) -> List[Dict[str, Any]]:
    e = pool.open(name, partials=False)
    e.set_early_silence(early)
    events: List[Dict[str, Any]] = []
    for i in range(0, len(audio), 3200):  # 200 ms pieces (the bridge sends 100 ms ones)
        events += pool.submit(e.feed, audio[i:i + 3200]).result()
    events += pool.submit(e.finalize_events).result()
    return [ev for ev in events if ev["type"] != "partial"]


# --- the daemon's engines ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def funasr_pool(models_dir):
    from daemon.asr.funasr_engine import FunASRConfig, FunASRPool

    m = models_dir
    p = FunASRPool(FunASRConfig(paraformer_dir=m / "tiny" / "paraformer", vad_dir=m / "fsmn-vad",
                                punc_dir=m / "tiny" / "ct-punc", streaming_dir=m / "tiny" / "paraformer-streaming",
                                device="cpu", ncpu=1))
    p.load()
    yield p
    p.shutdown()


def test_pause_inside_an_utterance_gives_a_tentative_then_resume_and_one_final(funasr_pool):
    audio, cut = _split_with_pause(FIX / "01.wav", 0.45)
    audio = np.concatenate([audio, np.zeros(SR, np.float32)])
    events = _run_engine(funasr_pool, audio, 0.2, "spec-on")
    kinds = [e["type"] for e in events if e["type"] != "final" or e["text"]]
    assert kinds[:4] == ["speech_start", "tentative", "resume", "tentative"], kinds
    assert kinds[-1] == "final" and kinds.count("final") == 1 and kinds.count("speech_start") == 1, kinds
    first, resume = events[1], events[2]
    # the first tentative is the speech before the pause; the resume is where speech went on
    assert cut < first["end"] < cut + 0.45 and first["utterance"] == 0, (first, cut)
    assert cut + 0.45 < resume["start"] < cut + 0.45 + 0.6, (resume, cut)
    final = next(e for e in events if e["type"] == "final" and e["text"])
    assert final["end"] > resume["start"] + 1.0
    # speculation changes nothing about the final: the same text with it off, and no tentatives
    off = _run_engine(funasr_pool, audio, 0.0, "spec-off")
    assert [e["type"] for e in off if e["type"] != "final" or e["text"]] == ["speech_start", "final"]
    assert next(e for e in off if e["type"] == "final")["text"] == final["text"]


def test_one_tentative_per_silence_and_the_final_reuses_it(funasr_pool):
    x = _pcm_f32(FIX / "02.wav")
    audio = np.concatenate([x, np.zeros(2 * SR, np.float32)])
    calls = []
    real = funasr_pool.decode

    def counting(a, hotwords=()):
        calls.append(len(a))
        return real(a, hotwords)

    funasr_pool.decode = counting
    try:
        events = _run_engine(funasr_pool, audio, 0.3, "reuse")
    finally:
        funasr_pool.decode = real
    tent = [e for e in events if e["type"] == "tentative"]
    finals = [e for e in events if e["type"] == "final" and e["text"]]
    assert len(finals) == 1, events
    # 2 s of trailing silence: one tentative for the gap (not one per VAD step)
    last_gap = [t for t in tent if t["end"] > finals[0]["end"] - 0.3]
    assert len(last_gap) == 1, tent
    assert last_gap[0]["text"] == finals[0]["text"]
    # decoded once per tentative, never again for the final (only silence came after it)
    assert len(calls) == len(tent), (calls, tent)


def test_whisper_engine_speculates_too(models_dir):
    from daemon.asr.whisper_engine import WhisperConfig, WhisperPool

    p = WhisperPool(WhisperConfig(model_dir=models_dir / "whisper-base", vad_dir=models_dir / "fsmn-vad",
                                  device="cpu", language="zh", beam_size=1))
    p.load()
    try:
        audio = np.concatenate([_pcm_f32(FIX / "01.wav"), np.zeros(SR, np.float32)])
        events = _run_engine(p, audio, 0.3, "w")
    finally:
        p.shutdown()
    tent = [e for e in events if e["type"] == "tentative"]
    final = next(e for e in events if e["type"] == "final" and e["text"])
    assert tent and tent[-1]["text"] == final["text"], events
    assert "阳台" in final["text"] or "花" in final["text"], final


def test_early_silence_is_validated():
    from daemon.config import ConfigError, parse_config

    assert parse_config({}).turn.early_silence == 0.3 and parse_config({}).turn.speculate is True
    for bad in (-0.1, 0.8, 2):
        with pytest.raises(ConfigError, match="turn.early_silence"):
            parse_config({"turn": {"early_silence": bad}})


# --- the bridge --------------------------------------------------------------------------------


def _reply(text: str, turn: int) -> str:
    # English (the Piper voice), and different per run, so the page shows which run it came from
    return f"Answer {turn} to {len(text)} characters. It has a second sentence."


@pytest.fixture(scope="module")
def agent_srv():
    with FakeAgentServer(script=_reply, token_delay=0.02) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset_agent(request):
    if "agent_srv" in request.fixturenames:
        request.getfixturevalue("agent_srv").reset(script=_reply, token_delay=0.02, first_token_delay=0.0)


def _config(d: Path, models_dir: Path, agent_url: str, speculate: bool, name: str) -> Path:
    path = write_config(d / f"{name}.yaml", models_dir, d / "run", asr="funasr", tts="piper",
                        agent={"kind": "langgraph", "url": agent_url, "timeout": 10.0})
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["asr"]["funasr"] = {"paraformer": "tiny/paraformer", "vad": "fsmn-vad", "punc": "tiny/ct-punc",
                             "streaming": "tiny/paraformer-streaming"}
    data["tts"]["piper"] = {"voice": "piper/en_US-joe-medium.onnx"}
    data["turn"] = {"early_silence": 0.2, "speculate": speculate}
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory, models_dir, agent_srv):
    d = tmp_path_factory.mktemp("spec")
    cfg = _config(d, models_dir, agent_srv.url, True, "on")
    daemon = start_daemon(cfg, d / "daemon.log", timeout=240)
    on = start_bridge(cfg, d / "bridge-on.log")
    off = start_bridge(_config(d, models_dir, agent_srv.url, False, "off"), d / "bridge-off.log")
    yield on, off
    on.stop()
    off.stop()
    daemon.stop()


def run(coro, timeout: float = 120.0):
    async def guarded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(guarded())


def _pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


async def _session(url: str, barge_in: bool = True) -> WSClient:
    c = await WSClient.open(url)
    await c.send_json({"type": "start", "language": "zh", "barge_in": barge_in})
    await c.wait_event("ready", 1, 20)
    return c


def _turn_of(e: Any) -> Any:
    return e.get("turn") if isinstance(e, dict) else None


def _page_replies(c: WSClient) -> List[str]:
    return [d["text"] for d in c.of("agent_done")]


def test_pause_then_more_speech_gives_one_reply_to_the_whole_sentence(stack, agent_srv):
    """A sentence, a 400 ms pause, the rest: the reply started on the first half is cancelled
    unseen and unheard; exactly one reply, to the whole sentence."""
    on, _ = stack
    audio, _cut = _split_with_pause(FIX / "01.wav", 0.4)

    async def go():
        c = await _session(on.ws)
        await c.stream(_pcm16(audio) + silence(1.5), realtime=True)
        await c.wait(lambda: len(c.of("tts_end")) >= 2, 30, "the reply spoken")
        await asyncio.sleep(0.5)  # anything late from the cancelled turn would arrive now
        await c.close()
        return c

    c = run(go())
    finals = [f for f in c.of("final") if f["text"]]
    assert len(finals) == 1, finals
    runs = agent_srv.runs
    # the speculative run on the first half: started, cut off, cancelled through the API (rollback)
    spec = [r for r in runs if r.user_text != finals[0]["text"]]
    assert spec and all(r.cancelled == "rollback" for r in spec), [(r.user_text, r.cancelled) for r in runs]
    assert all(len(r.user_text) < len(finals[0]["text"]) for r in spec)
    # exactly one reply, to the whole sentence, from a run that was not cancelled
    kept = [r for r in runs if not r.cancelled]
    assert [r.user_text for r in kept] == [finals[0]["text"]], [(r.user_text, r.cancelled) for r in runs]
    assert _page_replies(c) == [kept[0].reply]
    # nothing of the cancelled turn reached the page: no deltas of its reply, one numbered turn
    deltas = "".join(e["text"] for e in c.of("agent_delta"))
    assert deltas == kept[0].reply
    for r in spec:
        assert r.reply.split(".")[0] not in deltas
    turns = {_turn_of(e) for _, e in c.events if _turn_of(e) is not None}
    assert turns == {1}, turns
    starts = c.of("tts_start")
    assert [s["text"] for s in starts] == ["Answer 1 to %d characters." % len(finals[0]["text"]),
                                           "It has a second sentence."], starts
    # the bridge counted the wasted turn
    m = metrics(on.port)
    assert m.get('s2s_bridge_speculative_turns_total{outcome="cancelled"}', 0) >= 1, m


def test_a_sentence_then_silence_releases_the_reply_prepared_before_the_final(stack, agent_srv):
    """The reply was started on the tentative; at the final its first audio goes out at once."""
    on, _ = stack
    agent_srv.reset(script=_reply, token_delay=0.01, first_token_delay=0.05)

    async def go():
        c = await _session(on.ws)
        await c.stream(read_pcm(FIX / "02.wav") + silence(1.5), realtime=True)
        await c.wait(lambda: len(c.of("tts_end")) >= 2, 30, "the reply spoken")
        await c.close()
        return c

    c = run(go())
    finals = [(t, e) for t, e in c.events if isinstance(e, dict) and e.get("type") == "final" and e["text"]]
    assert len(finals) == 1
    t_final, final = finals[0]
    # (a comma pause inside the sentence may have started and cancelled another one before)
    runs = [r for r in agent_srv.runs if not r.cancelled]
    assert len(runs) == 1 and runs[0].user_text == final["text"], [(r.user_text, r.cancelled) for r in agent_srv.runs]
    # the agent was asked before the final came (speculation), and its audio followed the final at once
    assert runs[0].started < t_final - 0.2, (t_final - runs[0].started)
    # the whole reply was written while the user was still (maybe) talking: held, then sent at once
    t_done = next(t for t, e in c.events if isinstance(e, dict) and e.get("type") == "agent_done")
    assert t_done - t_final < 0.1, t_done - t_final
    fa = c.of("first_audio")[0]
    assert fa.get("speculative") is True and fa["latency_ms"] is not None, fa
    # nothing of the reply before the final
    assert all(t >= t_final for t, e in c.events if isinstance(e, bytes) or
               (isinstance(e, dict) and e.get("type") in ("agent_delta", "tts_start", "agent_done")))
    assert _page_replies(c) == [runs[0].reply]


def test_barge_in_during_a_speculative_turn(stack, agent_srv):
    """A long reply is playing; the user talks over it, pauses, goes on: the reply stops at once
    (barge-in), the reply prepared on the half sentence is dropped, and the whole sentence gets
    the one next reply."""
    on, _ = stack
    long_reply = " ".join(f"This is sentence number {i} of a very long answer." for i in range(1, 30))
    agent_srv.reset(script=lambda text, turn: long_reply if turn == 0 else _reply(text, turn), token_delay=0.05)
    audio, _cut = _split_with_pause(FIX / "01.wav", 0.4)

    async def go():
        c = await _session(on.ws)
        await c.stream(read_pcm(FIX / "03.wav") + silence(1.2), realtime=True)
        await c.wait(lambda: len(c.audio()) >= 2, 30, "reply audio streaming")
        n_speech = len(c.of("speech_start"))
        await c.stream(_pcm16(audio) + silence(1.5), realtime=True)
        await c.wait(lambda: c.of("interrupted"), 10, "interrupted")
        await c.wait(lambda: [e for e in c.of("tts_end") if e["turn"] == 2 and e["sentence"] == 1], 30, "second reply")
        await asyncio.sleep(0.5)
        await c.close()
        return c, n_speech

    c, n_speech = run(go(), 150)
    t_speech = [t for t, e in c.events if isinstance(e, dict) and e.get("type") == "speech_start"][n_speech]
    t_int, ev_int = next((t, e) for t, e in c.events if isinstance(e, dict) and e.get("type") == "interrupted")
    assert ev_int["turn"] == 1 and t_int - t_speech < 0.3
    finals = [f for f in c.of("final") if f["text"]]
    assert len(finals) == 2
    runs = agent_srv.runs
    kept = [r for r in runs if not r.cancelled]
    spec = [r for r in runs if r.cancelled]
    assert spec and all(len(r.user_text) < len(finals[1]["text"]) for r in spec), [(r.user_text, r.cancelled) for r in runs]
    # turn 1: the first utterance (released or not); turn 2: the whole second sentence
    assert [r.user_text for r in kept][-1] == finals[1]["text"]
    done = c.of("agent_done")
    assert [d["turn"] for d in done] == [2] and done[0]["text"] == kept[-1].reply
    # after `interrupted`: no turn-1 audio, and nothing of the dropped turn at all
    after = [e for t, e in c.events if t > t_int]
    first_next = next((i for i, e in enumerate(after) if isinstance(e, dict) and e.get("type") == "tts_start"), len(after))
    assert not any(isinstance(e, bytes) for e in after[:first_next])
    assert {_turn_of(e) for e in after if _turn_of(e) is not None} <= {1, 2}
    deltas2 = "".join(e["text"] for e in c.of("agent_delta") if e["turn"] == 2)
    assert deltas2 == kept[-1].reply


def test_speculation_off_is_the_old_path(stack, agent_srv):
    """turn.speculate false: the session asks for no tentatives, the agent hears only finals."""
    _, off = stack
    audio, _cut = _split_with_pause(FIX / "01.wav", 0.4)

    async def go():
        c = await _session(off.ws)
        await c.stream(_pcm16(audio) + silence(1.5), realtime=True)
        await c.wait(lambda: len(c.of("tts_end")) >= 2, 30, "the reply spoken")
        await c.close()
        return c

    c = run(go())
    finals = [(t, e) for t, e in c.events if isinstance(e, dict) and e.get("type") == "final" and e["text"]]
    assert len(finals) == 1
    runs = agent_srv.runs
    assert [r.user_text for r in runs] == [finals[0][1]["text"]] and not runs[0].cancelled
    assert runs[0].started >= finals[0][0] - 0.05  # asked only after the final
    assert "speculative" not in c.of("first_audio")[0]
    m = metrics(off.port)
    assert m.get('s2s_bridge_speculative_turns_total{outcome="cancelled"}', 0) == 0
    assert m.get('s2s_bridge_speculative_turns_total{outcome="released"}', 0) == 0


# --- the benchmark's fixed-latency agent -------------------------------------------------------


def test_fixed_latency_agent_answers_after_its_ttft_and_counts_closed_streams():
    import httpx

    from daemon.tools.bench_agent import FixedLatencyAgent

    async def go(url: str) -> tuple:
        async with httpx.AsyncClient(trust_env=False) as client:
            t0 = time.monotonic()
            first = None
            text = []
            async with client.stream("POST", url + "/v1/chat/completions",
                                     json={"stream": True, "messages": [{"role": "user", "content": "你好"}]}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        first = first or time.monotonic() - t0
                        text.append(re.search(r'"content": "([^"]*)"', line).group(1))
            async with client.stream("POST", url + "/v1/chat/completions",
                                     json={"stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        break  # close the stream after the first token
            return first, "".join(text)

    with FixedLatencyAgent(ttft=0.3, token_delay=0.05) as agent:
        first, text = asyncio.run(go(agent.url))
        assert 0.3 <= first < 0.6, first
        assert text.startswith("好的") and text.endswith("。")
        deadline = time.monotonic() + 3
        while agent.disconnected < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.requests == 2 and agent.disconnected == 1
