"""s2s-openai against the real daemon (bundled Whisper base, Kokoro + Piper), both started as
processes, driven by the openai Python SDK: transcriptions in every response format, as a file
of each common audio format, and streamed; speech in each audio format through
with_streaming_response, decoded back (stdlib wave, soundfile, PyAV) and heard by the bundled
Whisper; and bad input, each followed by a request that must be served."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from bridge_procs import Proc, _env, start_daemon, write_config
from daemon.audio import float_to_pcm16, read_wav, resample
from daemon.tools.metrics import cer

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
KEY = "test-key"
ZH_01 = "提醒我晚上八点给阳台的花浇水。"


class Stack:
    def __init__(self, tmp: Path, models: Path):
        import yaml

        cfg = write_config(tmp / "s2s.yaml", models, tmp / "run", asr="whisper", tts="kokoro+piper")
        data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
        data["openai_api"] = {"host": "127.0.0.1", "port": 0, "api_key": KEY, "max_upload_bytes": 4 << 20,
                              "max_concurrent_requests": 3}
        cfg.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        self.daemon = start_daemon(cfg, tmp / "daemon.log")
        self.proc = Proc("openai", [sys.executable, "-m", "bridge.openai_api", "--config", str(cfg)], tmp / "oa.log",
                         _env())
        deadline = time.monotonic() + 60
        while not (m := re.search(r"serving (http://([\d.]+):(\d+)/v1)", self.proc.text())):
            assert self.proc.alive() and time.monotonic() < deadline, self.proc.text()
            time.sleep(0.1)
        self.base, self.port = m.group(1), int(m.group(3))
        self.tts_endpoint = f"ipc://{tmp / 'run'}/tts.sock"

    def client(self, key: str = KEY):
        from openai import OpenAI

        return OpenAI(base_url=self.base, api_key=key, max_retries=0, timeout=120)

    def stop(self) -> None:
        self.proc.stop()
        self.daemon.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, models_dir):
    st = Stack(tmp_path_factory.mktemp("openai"), models_dir)
    yield st
    st.stop()
    assert "Traceback" not in st.proc.text(), st.proc.text()[-3000:]


def encode(path: Path, fmt: str, codec: str, rate: int) -> bytes:
    """A fixture in another container/codec (PyAV), as a client would upload it."""
    import av

    x, sr = read_wav(str(path))
    y = np.frombuffer(float_to_pcm16(resample(x, sr, rate)), dtype="<i2").reshape(1, -1)
    bio = io.BytesIO()
    with av.open(bio, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(y, format="s16", layout="mono")
        frame.sample_rate = rate
        for p in list(s.encode(frame)) + list(s.encode(None)):
            c.mux(p)
    return bio.getvalue()


def served(stack) -> None:
    r = stack.client().audio.transcriptions.create(model="whisper-1", file=(FIX / "en" / "01.wav").open("rb"))
    assert "timer" in r.text.lower(), r


def test_models_and_key(stack):
    from openai import AuthenticationError

    ids = [m.id for m in stack.client().models.list()]
    assert "whisper-1" in ids and "tts-1" in ids and "s2s-asr" in ids
    with pytest.raises(AuthenticationError) as e:
        stack.client("wrong").models.list()
    assert e.value.body["code"] == "invalid_api_key"


def test_transcription_in_every_response_format(stack):
    c = stack.client()
    wav = (FIX / "zh" / "01.wav").read_bytes()
    out = {fmt: c.audio.transcriptions.create(model="whisper-1", file=("01.wav", wav), language="zh",
                                              response_format=fmt) for fmt in ("json", "text", "verbose_json", "srt", "vtt")}
    text = out["json"].text
    assert cer(ZH_01, text) < 0.35, text
    assert out["text"].strip() == text
    v = out["verbose_json"]
    assert v.language == "chinese" and v.text == text and abs(v.duration - 3.256) < 0.05
    assert v.segments and v.segments[0].text == text and 0 <= v.segments[0].start < v.segments[0].end <= 3.3
    assert re.match(r"1\n00:00:0\d,\d{3} --> 00:00:0\d,\d{3}\n" + re.escape(text) + r"\n", out["srt"]), out["srt"]
    assert out["vtt"].startswith("WEBVTT\n\n00:00:0") and text in out["vtt"]


@pytest.mark.parametrize("name,fmt,codec,rate", [("en.mp3", "mp3", "libmp3lame", 24000), ("en.ogg", "ogg", "libopus", 48000),
                                                 ("en.flac", "flac", "flac", 16000), ("en.m4a", "ipod", "aac", 24000)])
def test_any_common_upload_format(stack, name, fmt, codec, rate):
    data = encode(FIX / "en" / "01.wav", fmt, codec, rate)
    r = stack.client().audio.transcriptions.create(model="whisper-1", file=(name, data), language="en")
    assert "timer" in r.text.lower() and "minutes" in r.text.lower(), r.text


def test_streamed_transcription(stack):
    m = json.loads((FIX / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[9])
    assert m["id"] == "zh_long"
    events = list(stack.client().audio.transcriptions.create(model="gpt-4o-transcribe", file=(FIX / m["path"]).open("rb"),
                                                             language="zh", stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert events[-1].type == "transcript.text.done" and len(deltas) >= 3, events
    assert "".join(deltas) == events[-1].text
    assert cer(m["text"], events[-1].text) < 0.3, events[-1].text


def decode(fmt: str, data: bytes) -> tuple:
    """Speech bytes -> (float32 mono, rate), by a decoder independent of the adapter's."""
    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768, 24000
    if fmt == "wav":
        with wave.open(io.BytesIO(data)) as w:  # the streamed header's sizes are "to the end"
            return np.frombuffer(w.readframes(10 ** 9), dtype="<i2").astype(np.float32) / 32768, w.getframerate()
    if fmt == "flac":
        import soundfile

        x, sr = soundfile.read(io.BytesIO(data), dtype="float32")
        return x, sr
    import av

    with av.open(io.BytesIO(data)) as c:
        frames = [f.to_ndarray().reshape(-1) for f in c.decode(audio=0)]
        sr = c.streams.audio[0].sample_rate
    x = np.concatenate(frames).astype(np.float32)
    return (x / 32768 if x.dtype.kind == "i" else x), sr


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_speech_in_each_format_is_heard(stack, fmt):
    c = stack.client()
    with c.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", response_format=fmt,
                                                       input="Please turn off the kitchen lights.") as r:
        assert r.headers["content-type"].startswith({"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
                                                     "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm"}[fmt])
        data = b"".join(r.iter_bytes())
    x, sr = decode(fmt, data)
    assert len(x) > sr, "under a second of speech"
    wav = io.BytesIO()
    with wave.open(wav, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(float_to_pcm16(resample(x, sr, 16000)))
    heard = c.audio.transcriptions.create(model="whisper-1", file=("speech.wav", wav.getvalue()), language="en").text
    assert "kitchen" in heard.lower() and "light" in heard.lower(), heard


def test_speech_streams_as_it_is_synthesized(stack):
    text = " ".join(["This is sentence number %s of a longer reply." % w for w in ("one", "two", "three", "four")])
    t0 = time.monotonic()
    first = None
    with stack.client().audio.speech.with_streaming_response.create(model="tts-1", voice="s2s-en", input=text,
                                                                    response_format="pcm") as r:
        n = 0
        for chunk in r.iter_bytes():
            first = first or time.monotonic() - t0
            n += len(chunk)
    total = time.monotonic() - t0
    assert n > 24000 * 2 * 5 and first < total / 2, (first, total)


def test_speech_sse(stack):
    with stack.client().audio.speech.with_streaming_response.create(model="gpt-4o-mini-tts", voice="s2s-en",
                                                                    input="Hello there.", response_format="pcm",
                                                                    extra_body={"stream_format": "sse"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["input_tokens"] == len("Hello there.")
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert len(audio) > 24000, len(audio)


def test_mandarin_speech(stack):
    c = stack.client()
    data = c.audio.speech.create(model="tts-1", voice="s2s-zh", input="今天天气很好。", response_format="wav").read()
    heard = c.audio.transcriptions.create(model="whisper-1", file=("zh.wav", data), language="zh").text
    assert cer("今天天气很好", heard) < 0.5, heard


# --- bad input: OpenAI's error body and status, and the next request is served --------------


def test_not_audio_and_truncated_files(stack):
    from openai import BadRequestError

    c = stack.client()
    with pytest.raises(BadRequestError) as e:
        c.audio.transcriptions.create(model="whisper-1", file=("notes.txt", b"just some text\n" * 100))
    assert e.value.body["param"] == "file" and e.value.body["code"] == "bad_audio"
    assert e.value.body["type"] == "invalid_request_error"
    m4a = encode(FIX / "en" / "01.wav", "ipod", "aac", 24000)
    with pytest.raises(BadRequestError) as e:  # its index is at the end: half of it cannot be read
        c.audio.transcriptions.create(model="whisper-1", file=("half.m4a", m4a[:len(m4a) // 2]))
    assert e.value.body["code"] == "bad_audio"
    wav = (FIX / "en" / "01.wav").read_bytes()
    r = c.audio.transcriptions.create(model="whisper-1", file=("half.wav", wav[:len(wav) * 2 // 3]), language="en")
    assert "timer" in r.text.lower()  # what there is of a cut WAV is transcribed
    served(stack)


async def http_raw(port: int, head: bytes, body: bytes, close_after: bool = True, timeout: float = 30.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    await writer.drain()
    if close_after:
        writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def multipart_head(port: int, length: int, boundary: str = "xyz") -> bytes:
    return (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {length}\r\n\r\n").encode()


def test_truncated_upload(stack):
    wav = (FIX / "en" / "01.wav").read_bytes()
    body = (b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\n" + wav + b"\r\n--xyz--\r\n")
    out = asyncio.run(http_raw(stack.port, multipart_head(stack.port, len(body)), body[:len(body) // 2]))
    assert out == b"" or b" 400 " in out.split(b"\r\n")[0], out[:300]
    served(stack)


def test_100_mb_upload_refused_before_it_is_read(stack):
    from openai import APIStatusError

    async def headers_only():
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
        t0 = time.monotonic()
        writer.write(multipart_head(stack.port, 100 << 20) + b"--xyz\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        n = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        body = await reader.readexactly(n)
        writer.close()
        return head, body, time.monotonic() - t0

    head, raw_body, took = asyncio.run(headers_only())
    assert head.startswith(b"HTTP/1.1 413 ") and took < 5, (head, took)
    body = json.loads(raw_body)
    assert body["error"]["code"] == "file_too_large" and "max_upload_bytes" in body["error"]["message"]
    # Without a Content-Length (the SDK's upload of a 5 MB file over the 4 MB limit): counted as it arrives.
    with pytest.raises(APIStatusError) as e:
        stack.client().audio.transcriptions.create(model="whisper-1", file=("big.wav", b"RIFF" + b"\0" * (5 << 20)))
    assert e.value.status_code == 413
    served(stack)


def test_text_of_1_mb_and_over_the_daemons_limit(stack):
    from openai import APIStatusError, BadRequestError

    c = stack.client()
    with pytest.raises(APIStatusError) as e:
        c.audio.speech.create(model="tts-1", voice="alloy", input="a" * (1 << 20))
    assert e.value.status_code == 413 and "max_text_chars" in e.value.body["message"]
    with pytest.raises(BadRequestError) as e:
        c.audio.speech.create(model="tts-1", voice="alloy", input="a" * 2001)
    assert e.value.body["code"] == "bad_text" and "max_text_chars" in e.value.body["message"]
    assert c.audio.speech.create(model="tts-1", voice="alloy", input="Fine.", response_format="wav").read()[:4] == b"RIFF"


def test_unknown_voice_model_and_format(stack):
    from openai import BadRequestError

    c = stack.client()
    for kw, param in ((dict(voice="nobody"), "voice"), (dict(voice="alloy", model="tts-9"), "model"),
                      (dict(voice="alloy", response_format="ogg"), "response_format"),
                      (dict(voice="alloy", speed=9.0), None)):
        with pytest.raises(BadRequestError) as e:
            c.audio.speech.create(**{"model": "tts-1", "input": "Hello.", **kw})
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(BadRequestError) as e:
        c.audio.transcriptions.create(model="whisper-1", file=(FIX / "en" / "01.wav").open("rb"), response_format="xml")
    assert e.value.body["param"] == "response_format"
    served(stack)


def test_speech_stream_cut_midway_cancels_the_daemon_request(stack):
    from daemon.wire.client import TTSClient

    text = " ".join(["Sentence %d is here to make this a long reply." % i for i in range(12)])

    async def cut():
        body = json.dumps({"model": "tts-1", "voice": "s2s-en", "input": text, "response_format": "pcm"}).encode()
        head = (f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
        writer.write(head + body)
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(1000)  # the first audio
        writer.transport.abort()

    asyncio.run(cut())
    deadline, cleared = time.monotonic() + 10, False
    while not cleared and time.monotonic() < deadline:
        with TTSClient(stack.tts_endpoint, timeout=5) as t:
            cleared = not t.describe()["queues"]["tts_requests"]
        time.sleep(0.2)
    assert cleared, "the daemon still synthesizes for a client that went away"
    assert "the client went away" in stack.proc.text()
    served(stack)


def test_too_many_at_once_get_429(stack):
    from openai import AsyncOpenAI, RateLimitError

    async def many():
        c = AsyncOpenAI(base_url=stack.base, api_key=KEY, max_retries=0, timeout=120)
        text = "This reply is long enough to keep the speech daemon busy for a while. " * 3

        async def one():
            try:
                r = await c.audio.speech.create(model="tts-1", voice="s2s-en", input=text, response_format="pcm")
                return len(r.read())
            except RateLimitError as e:
                return e

        return await asyncio.gather(*(one() for _ in range(6)))

    out = asyncio.run(many())
    limited = [o for o in out if isinstance(o, Exception)]
    assert limited and all(o.response.headers.get("retry-after") == "1" for o in limited), out
    assert any(isinstance(o, int) and o > 0 for o in out)
    served(stack)


def test_audio_longer_than_one_transcription_takes_is_refused_before_it_is_fed():
    """A small compressed upload can decode to hours of recognition: the decoded length is counted
    as it is fed, and what is past MAX_AUDIO_SECONDS never reaches the daemon (a fake
    Transcription records what it is fed; this is about the bound, not recognition)."""
    import asyncio

    from bridge.openai_api import handler as H
    from daemon.wire import protocol as P
    from daemon.wire.client_base import DaemonError
    from daemon.errors import ErrorCode

    class FakeTranscription:
        def __init__(self):
            self.fed, self.aborted = 0, False

        async def open(self):
            pass

        async def feed(self, block):
            self.fed += len(block)

        async def finish(self):
            return "done"

        async def abort(self):
            self.aborted = True

    second = b"\0" * (P.ASR_SAMPLE_RATE * 2)
    limit = H.MAX_AUDIO_SECONDS * len(second)

    def blocks(n):
        for _ in range(n):
            yield second

    tr = FakeTranscription()
    gen = blocks(H.MAX_AUDIO_SECONDS * 4)
    with pytest.raises(DaemonError) as e:
        asyncio.run(H.Api._transcribe(None, tr, next(gen), gen))
    assert e.value.code == ErrorCode.BAD_AUDIO and str(H.MAX_AUDIO_SECONDS) in e.value.message
    assert tr.fed == limit and tr.aborted
    tr = FakeTranscription()
    gen = blocks(H.MAX_AUDIO_SECONDS)
    assert asyncio.run(H.Api._transcribe(None, tr, next(gen), gen)) == "done" and tr.fed == limit
