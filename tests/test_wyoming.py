"""s2s-wyoming against the real daemon (bundled Whisper base, Kokoro + Piper), both started as
processes, driven by the wyoming package's async TCP client the way Home Assistant's Wyoming
integration drives it (daemon/tools/bench_wyoming.ha_*): describe, Mandarin and English
transcription, synthesis, streamed synthesis, eight clients at once, and bad input, each
followed by a request that must be served."""

from __future__ import annotations

import asyncio
import io
import json
import re
import sys
import time
import wave
from pathlib import Path

import pytest

from bridge_procs import Proc, _env, start_daemon, write_config
from daemon.audio import read_wav
from daemon.tools.bench_wyoming import (CHUNK_SAMPLES, free_port, ha_describe, ha_stream_synthesize, ha_synthesize,
                                        ha_transcribe)
from daemon.tools.metrics import cer

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
HOST = "127.0.0.1"


def pcm16k(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (16000, 2, 1)
        return w.readframes(w.getnframes())


def manifest():
    return {r["id"]: r for r in map(json.loads, (FIX / "manifest.jsonl").read_text(encoding="utf-8").splitlines())}


class Stack:
    def __init__(self, tmp: Path, models: Path):
        import yaml

        self.asr_port, self.tts_port = free_port(), free_port()
        cfg = write_config(tmp / "s2s.yaml", models, tmp / "run", asr="whisper", tts="kokoro+piper",
                           limits={"idle_timeout": 20.0})
        data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
        data["wyoming"] = {"host": HOST, "asr_port": self.asr_port, "tts_port": self.tts_port, "max_connections": 12}
        cfg.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        self.cfg = cfg
        self.daemon = start_daemon(cfg, tmp / "daemon.log")
        self.asr_endpoint = f"ipc://{tmp / 'run'}/asr.sock"
        self.wy = Proc("wyoming", [sys.executable, "-m", "bridge.wyoming", "--config", str(cfg)], tmp / "wy.log", _env())
        deadline = time.monotonic() + 60
        while len(re.findall(r"serving tcp://", self.wy.text())) < 2:
            assert self.wy.alive() and time.monotonic() < deadline, self.wy.text()
            time.sleep(0.1)

    def sessions(self) -> int:
        """ASR sessions open in the daemon (from its describe)."""
        from daemon.wire.client import ASRClient

        with ASRClient(self.asr_endpoint, timeout=5) as c:
            return int(c.describe()["queues"]["asr_sessions"])

    def stop(self) -> None:
        self.wy.stop()
        self.daemon.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, models_dir):
    st = Stack(tmp_path_factory.mktemp("wyoming"), models_dir)
    yield st
    st.stop()
    assert "Traceback" not in st.wy.text(), st.wy.text()[-3000:]


def run(coro):
    return asyncio.run(coro)


def served(stack) -> None:
    """The next request is served: an English transcription comes back right."""
    r = run(ha_transcribe(HOST, stack.asr_port, pcm16k(FIX / "en" / "01.wav"), "en"))
    assert r.text is not None and "timer" in r.text.lower(), r


def heard(stack, wav: bytes, language: str) -> str:
    """What the bundled Whisper hears in a WAV (sent back through the ASR port at its own rate)."""
    with wave.open(io.BytesIO(wav)) as w:
        rate, width, ch, pcm = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.readframes(w.getnframes())
    assert len(pcm) > rate * width * 0.5, "less than half a second of audio"
    r = run(ha_transcribe(HOST, stack.asr_port, pcm, language, rate=rate, width=width, channels=ch))
    assert r.text is not None, r
    return r.text


def test_describe_answers_within_home_assistants_second(stack):
    asr = run(ha_describe(HOST, stack.asr_port))
    tts = run(ha_describe(HOST, stack.tts_port))
    assert asr is not None and tts is not None
    assert len(asr.asr) == 1 and not asr.tts and len(tts.tts) == 1 and not tts.asr
    prog = asr.asr[0]
    assert prog.installed and prog.supports_transcript_streaming
    assert prog.models[0].name == "whisper" and {"zh", "en"} <= set(prog.models[0].languages)
    voices = {v.name: v.languages for v in tts.tts[0].voices}
    assert tts.tts[0].supports_synthesize_streaming
    assert voices["s2s-zh"] == ["zh"] and voices["s2s-en"] == ["en"] and set(voices["s2s"]) == {"zh", "en"}


def test_mandarin_and_english_transcription(stack):
    m = manifest()
    zh = run(ha_transcribe(HOST, stack.asr_port, pcm16k(FIX / "zh" / "02.wav"), "zh", realtime=True))
    assert zh.text is not None and cer(m["zh_02"]["text"], zh.text) < 0.3, zh.text
    en = run(ha_transcribe(HOST, stack.asr_port, pcm16k(FIX / "en" / "01.wav"), "en-US"))
    assert en.text is not None and "timer" in en.text.lower() and "minutes" in en.text.lower(), en.text
    # The streaming events, in Wyoming's order; the chunks add up to the transcript, except where
    # the final (beam search with timestamps) revised what two partials (greedy) had agreed on
    # and was sent: a chunk is never taken back, the `transcript` has the final's text
    # (bridge/speech.TextDeltas).
    types = [e.type for e in zh.events]
    assert types[0] == "transcript-start" and types[-1] == "transcript" and "transcript-chunk" in types, types
    chunks = "".join(e.data["text"] for e in zh.events if e.type == "transcript-chunk")
    assert chunks == zh.text or cer(zh.text, chunks) < 0.3, (chunks, zh.text)


def test_audio_in_other_formats_is_converted(stack):
    """44.1 kHz stereo (and 8-bit) audio: resampled and mixed down to the daemon's format as it arrives."""
    import numpy as np

    from daemon.audio import resample

    x, sr = read_wav(str(FIX / "en" / "01.wav"))
    y = resample(x, sr, 44100)
    stereo = (np.stack([y, y], axis=1) * 32767).astype("<i2").tobytes()
    r = run(ha_transcribe(HOST, stack.asr_port, stereo, "en", rate=44100, width=2, channels=2))
    assert r.text is not None and "timer" in r.text.lower(), r
    u8 = (resample(x, sr, 22050) * 127 + 128).clip(0, 255).astype(np.uint8).tobytes()
    r = run(ha_transcribe(HOST, stack.asr_port, u8, "en", rate=22050, width=1, channels=1))
    assert r.text is not None and "timer" in r.text.lower(), r


def test_synthesis_is_heard_by_whisper(stack):
    r = run(ha_synthesize(HOST, stack.tts_port, "Please turn off the kitchen lights.", voice="s2s-en"))
    assert r.wav and r.error is None and r.events[0] == "audio-start" and r.events[-1] == "audio-stop", r.events
    text = heard(stack, r.wav, "en").lower()
    assert "kitchen" in text and "light" in text, text
    zh = run(ha_synthesize(HOST, stack.tts_port, "今天天气很好。", voice="s2s-zh"))
    assert zh.wav and zh.error is None
    assert cer("今天天气很好", heard(stack, zh.wav, "zh")) < 0.5


def test_streamed_synthesis_sentence_by_sentence(stack):
    pieces = ["Good ", "morning", ". The ", "weather today ", "is sunny", " and warm."]
    r = run(ha_stream_synthesize(HOST, stack.tts_port, pieces, voice="s2s-en", gap=0.05))
    assert r.wav and r.error is None, r
    assert r.events[0] == "audio-start" and r.events[-2:] == ["audio-stop", "synthesize-stopped"], r.events
    assert r.events.count("audio-start") == 1
    text = heard(stack, r.wav, "en").lower()
    assert "morning" in text and "weather" in text and "sunny" in text, text


def test_eight_clients_at_once(stack):
    m = manifest()
    ids = [f"zh_0{i}" for i in range(1, 9)]

    async def all_at_once():
        return await asyncio.gather(*(ha_transcribe(HOST, stack.asr_port, pcm16k(FIX / m[i]["path"]), "zh",
                                                    realtime=True) for i in ids))

    results = run(all_at_once())
    scores = [cer(m[i]["text"], r.text or "") for i, r in zip(ids, results)]
    print("8 clients: latency", [round(r.latency, 2) for r in results], "CER", [round(s, 2) for s in scores])
    assert all(r.text for r in results), [r.error for r in results]
    assert sum(scores) / len(scores) < 0.25, scores


# --- bad input: a clear `error` event, and the next request is served ----------------------


async def raw(port: int, data: bytes, read: bool = True, timeout: float = 30.0):
    """Send bytes, half-close, read events until the server closes: [(type, data)]."""
    from wyoming.event import async_read_event

    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(data)
    await writer.drain()
    out = []
    if read:
        while True:
            ev = await asyncio.wait_for(async_read_event(reader), timeout)
            if ev is None:
                break
            out.append((ev.type, ev.data))
    writer.close()
    return out


def line(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def test_not_audio_is_a_bad_audio_error(stack):
    events = run(raw(stack.asr_port, line({"type": "transcribe", "data": {"language": "zh"}})
                     + line({"type": "audio-start", "data": {"rate": 16000, "width": 3, "channels": 1}})))
    assert events[-1][0] == "error" and events[-1][1]["code"] == "bad_audio" and "width" in events[-1][1]["text"]
    events = run(raw(stack.asr_port, b"this is not a wyoming event\n"))
    assert events == [("error", {"text": "event header is not a JSON line", "code": "bad_request"})]
    served(stack)


def test_100_mb_event_refused_before_it_is_read(stack):
    t0 = time.monotonic()
    events = run(raw(stack.asr_port, line({"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1},
                                           "payload_length": 100 << 20})))
    assert events[-1][0] == "error" and events[-1][1]["code"] == "bad_audio", events
    assert "payload_length" in events[-1][1]["text"] and time.monotonic() - t0 < 5
    served(stack)


def test_text_of_1_mb_and_over_the_daemons_limit(stack):
    events = run(raw(stack.tts_port, line({"type": "synthesize", "data_length": 1 << 20})))
    assert events[-1][0] == "error" and events[-1][1]["code"] == "bad_text" and "max_text_chars" in events[-1][1]["text"]
    r = run(ha_synthesize(HOST, stack.tts_port, "a" * 2001))  # within the event bound: the daemon's own rule
    assert r.wav is None and r.error is not None and r.error.code == "bad_text" and "max_text_chars" in r.error.text
    r = run(ha_synthesize(HOST, stack.tts_port, "Fine.", voice="s2s-en"))
    assert r.wav and r.error is None


def test_unknown_voice_and_wrong_port(stack):
    r = run(ha_synthesize(HOST, stack.tts_port, "Hello.", voice="nobody"))
    assert r.wav is None and r.error is not None and r.error.code == "bad_request" and "s2s-en" in r.error.text
    r = run(ha_synthesize(HOST, stack.asr_port, "Hello."))
    assert r.error is not None and r.error.code == "unsupported"
    r = run(ha_synthesize(HOST, stack.tts_port, "Hello.", voice="s2s-en"))
    assert r.wav and r.error is None


def test_truncated_event_and_cut_stream_free_the_daemon_session(stack):
    pcm = pcm16k(FIX / "zh" / "01.wav")

    async def cut_mid_audio():
        reader, writer = await asyncio.open_connection(HOST, stack.asr_port)
        fmt = {"rate": 16000, "width": 2, "channels": 1}
        writer.write(line({"type": "transcribe", "data": {"language": "zh"}}) + line({"type": "audio-start", "data": fmt}))
        for off in range(0, len(pcm) // 2, CHUNK_SAMPLES * 2):
            writer.write(line({"type": "audio-chunk", "data": fmt, "payload_length": CHUNK_SAMPLES * 2})
                         + pcm[off:off + CHUNK_SAMPLES * 2])
        await writer.drain()
        await asyncio.sleep(0.5)
        assert stack.sessions() == 1
        # An event whose payload stops short, then the connection goes.
        writer.write(line({"type": "audio-chunk", "data": fmt, "payload_length": 3200}) + b"\0" * 100)
        await writer.drain()
        writer.close()

    run(cut_mid_audio())
    deadline = time.monotonic() + 10
    while stack.sessions() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stack.sessions() == 0
    served(stack)


def test_streamed_synthesis_cut_midway(stack):
    async def cut():
        reader, writer = await asyncio.open_connection(HOST, stack.tts_port)
        writer.write(line({"type": "synthesize-start", "data": {"voice": {"name": "s2s-en"}}})
                     + line({"type": "synthesize-chunk", "data": {"text": "This sentence is spoken. And this one "}}))
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.close()

    run(cut())
    r = run(ha_stream_synthesize(HOST, stack.tts_port, ["All ", "good."], voice="s2s-en"))
    assert r.wav and r.error is None
    assert "Traceback" not in stack.wy.text()


def test_connections_past_the_cap_are_told_busy(stack):
    async def many():
        conns = [await asyncio.open_connection(HOST, stack.asr_port) for _ in range(12)]
        await asyncio.sleep(0.3)
        extra = await raw(stack.asr_port, b"", read=True, timeout=10)
        for _, w in conns:
            w.close()
        return extra

    events = run(many())
    assert events and events[0][0] == "error" and events[0][1]["code"] == "busy", events
    time.sleep(0.5)
    served(stack)


def test_one_port_serves_both():
    """asr_port == tts_port: one listener whose info lists both (one Home Assistant entry)."""
    from bridge.wyoming.__main__ import port_services
    from daemon.config import parse_config

    cfg = parse_config({"wyoming": {"asr_port": 10300, "tts_port": 10300}}, env={})
    assert port_services(cfg) == {10300: frozenset({"asr", "tts"})}
    cfg = parse_config({}, env={})
    assert port_services(cfg) == {10300: frozenset({"asr"}), 10200: frozenset({"tts"})}


def test_transcript_deltas_only_append():
    """transcript-chunk / transcript.text.delta: finals add what they add, partials what two in a
    row agree on (whole Latin words), and a final that revises sent text resyncs."""
    from bridge.speech import TextDeltas, join_text

    d = TextDeltas()
    got = [d.partial("hel"), d.partial("hello wor"), d.partial("hello world"), d.final("hello world."),
           d.partial("how"), d.partial("how are"), d.final("how are you?")]
    assert got == ["", "", "hello", " world.", "", " how", " are you?"]
    assert "".join(got) == d.text == "hello world. how are you?"
    d = TextDeltas()
    got = [d.partial("提醒我"), d.partial("提醒我晚上"), d.final("提醒我晚上八点。"), d.final("好的")]
    assert got == ["", "提醒我", "晚上八点。", "好的"] and d.text == "提醒我晚上八点。好的"
    d = TextDeltas()
    assert [d.partial("abc def"), d.partial("abc def"), d.final("abd xyz"), d.final("next")] == ["", "abc def", "", " next"]
    assert d.text == "abd xyz next"
    # a revision: what the final has beyond what was sent still goes out (the tail was lost before)
    d = TextDeltas()
    got = [d.partial("倒行到最近"), d.partial("倒行到最近的加油站"), d.final("导航到最近的加油站，避开高速。")]
    assert got == ["", "倒行到最近", "的加油站，避开高速。"] and d.text == "导航到最近的加油站，避开高速。"
    assert join_text("你好。", "Hello") == "你好。Hello" and join_text("Hi.", "there") == "Hi. there"
