"""The real daemon on real engines, driven through daemon.wire.client and s2s-ctl:
bundled Whisper base + fsmn-vad and the Kokoro + Piper voices (reached through the fallback from
the default funasr/melo config, whose weights are absent here), and the tiny FunASR/Melo models."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import wave

import pytest

from daemon.wire import protocol as P
from daemon.audio import float_to_pcm16, read_wav
from daemon.wire.client import ASRClient, AsyncASRClient, AsyncTTSClient, TTSClient
from daemon_harness import ROOT, DaemonProcess
from helpers.describe_schema import check_describe


def ctl(d, *args, timeout=120):
    r = subprocess.run([sys.executable, "-m", "daemon.tools.ctl", "--asr", d.asr, "--tts", d.tts, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    return r


def simplified(text):
    import opencc

    return opencc.OpenCC("t2s").convert(text)


def overlap(a, b):
    sa, sb = set(a), set(b)
    return len(sa & sb) / max(1, len(sb))


@pytest.fixture(scope="module")
def wd(tmp_path_factory, models_dir):
    """Default engines (funasr, melo) are absent: the daemon falls back to whisper + kokoro+piper."""
    p = DaemonProcess(tmp_path_factory.mktemp("whisperd"), {
        "models_root": str(models_dir),
        "asr": {"device": "cpu"}, "tts": {"device": "cpu"},
        "limits": {"max_sessions": 16},
    }, fake=False, watchdog_usec=6_000_000)
    p.wait_ready(300)
    yield p
    p.stop()


def test_ready_and_watchdog_on_bundled_models(wd):
    ready = wd.notify.times("READY=1")[0]
    assert wd.notify.times("EXTEND_TIMEOUT_USEC=")[0] < ready
    assert wd.notify.wait_for("WATCHDOG=1", 8, after=ready) is not None
    statuses = [l for _t, l in wd.notify.lines if l.startswith("STATUS=")]
    assert any("loading ASR" in s for s in statuses) and any("fallback" in s for s in statuses)


def test_health_shows_engines_and_fallbacks(wd):
    r = ctl(wd, "health")
    assert r.returncode == 0, r.stderr
    assert "engine=whisper" in r.stdout and "engine=kokoro+piper" in r.stdout
    assert "fallback asr.engine: funasr -> whisper (startup)" in r.stdout
    assert "fallback tts.engine: melo -> kokoro+piper (startup)" in r.stdout
    assert "tts.voice" not in r.stdout  # Kokoro's Mandarin voice is bundled; routing to Piper is no fallback
    # the real engines' model paths are shown, whole
    assert "model whisper: " in r.stdout and "model vad: " in r.stdout and "model voice: " in r.stdout
    assert "model kokoro: " in r.stdout
    j = json.loads(ctl(wd, "health", "--json").stdout)
    assert j["asr"]["info"]["asr"]["engine"] == "whisper"
    check_describe(j["asr"]["info"])  # the bundled engines' describe, through the schema
    assert len(j["tts"]["info"]["fallbacks"]) >= 2
    # fallbacks are reported, not failures; --strict makes them one
    strict = ctl(wd, "health", "--strict")
    assert strict.returncode == 1 and "fallback(s) taken" in strict.stderr


def test_ctl_transcribe_long_prints_four_finals(wd, fixtures_dir, manifest):
    r = ctl(wd, "transcribe", str(fixtures_dir / "zh/long.wav"), "--lang", "zh")
    assert r.returncode == 0, r.stderr
    finals = [l for l in r.stdout.splitlines() if l.startswith("final")]
    assert len(finals) == 4, r.stdout
    segs = [m for m in manifest if m["id"] == "zh_long"][0]["segments"]
    for line, seg in zip(finals, segs):
        assert overlap(simplified(line.split(None, 3)[3]), seg["text"]) > 0.4, (line, seg["text"])


def test_ctl_speak_writes_24k_pcm16(wd, tmp_path):
    out = tmp_path / "x.wav"
    r = ctl(wd, "speak", "Hello there", "-o", str(out))
    assert r.returncode == 0, r.stderr
    with wave.open(str(out)) as w:
        assert w.getframerate() == 24000 and w.getsampwidth() == 2 and w.getnchannels() == 1
        assert w.getnframes() > 24000 * 0.3


def test_ctl_sessions(wd):
    with ASRClient(wd.asr) as c:
        st = c.open(session_id="listed")
        r = ctl(wd, "sessions")
        st.close()
    assert r.returncode == 0 and "listed" in r.stdout


def test_eight_concurrent_whisper_clients(wd, fixtures_dir, manifest):
    items = [m for m in manifest if m["kind"] == "utt" and m["lang"] == "zh"][:8]
    got, errors = {}, []

    def run(m):
        try:
            x, _ = read_wav(str(fixtures_dir / m["path"]))
            pcm = float_to_pcm16(x)
            with ASRClient(wd.asr, timeout=120) as c:
                st = c.open(language="zh")
                t0 = time.monotonic()
                evs = []
                for k, off in enumerate(range(0, len(pcm), 3200)):
                    st.send(pcm[off:off + 3200])
                    evs += st.poll(0)
                    delay = t0 + (k + 1) * 0.1 / 2 - time.monotonic()  # 2x real time
                    if delay > 0:
                        time.sleep(delay)
                evs += st.finalize(timeout=120)
                assert all(getattr(e, "session_id", st.session_id) == st.session_id for e in evs)
                got[m["id"]] = simplified("".join(e.text for e in evs if isinstance(e, P.Final)))
        except Exception as e:
            errors.append(f"{m['id']}: {e!r}")

    threads = [threading.Thread(target=run, args=(m,)) for m in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    refs = {m["id"]: m["text"] for m in items}
    for mid, text in got.items():
        best = max(refs, key=lambda r: overlap(text, refs[r]))
        assert best == mid, (mid, text)


def test_async_clients(wd, fixtures_dir):
    x, _ = read_wav(str(fixtures_dir / "en/01.wav"))
    pcm = float_to_pcm16(x)

    async def go():
        async with AsyncASRClient(wd.asr, timeout=60) as a, AsyncTTSClient(wd.tts, timeout=60) as t:
            assert await a.ping() < 1.0
            st = await a.open(language="en")
            for off in range(0, len(pcm), 3200):
                await st.send(pcm[off:off + 3200])
            evs = await st.finalize()
            audio, rate = await t.speak("Set a timer. Then stop.")
            return evs, audio, rate

    evs, audio, rate = asyncio.run(go())
    assert isinstance(evs[-1], P.Closed)
    text = " ".join(e.text for e in evs if isinstance(e, P.Final)).lower()
    assert "timer" in text, text
    assert rate == 24000 and len(audio) > 24000


def test_zz_sigterm_exit_zero(wd):
    mark = time.monotonic()
    wd.signal(signal.SIGTERM)
    assert wd.notify.wait_for("STOPPING=1", 5, after=mark) is not None
    assert wd.proc.wait(15) == 0


# --- tiny FunASR + Melo ---------------------------------------------------------------------


def test_tiny_funasr_melo_daemon(tmp_path, models_dir, fixtures_dir):
    recorded = json.loads((models_dir / "s2s-models.json").read_text())["components"]
    need = ["tiny/paraformer", "tiny/ct-punc", "tiny/melo-zh", "tiny/hf", "tiny/nltk_data"]
    if not all(n in recorded for n in need):
        pytest.skip(f"tiny models not built ({need} in s2s-models.json)")
    cfg = {
        "models_root": str(models_dir),
        "asr": {"engine": "funasr", "device": "cpu",
                "funasr": {"paraformer": "tiny/paraformer", "vad": "fsmn-vad", "punc": "tiny/ct-punc",
                           "streaming": "tiny/paraformer-streaming" if "tiny/paraformer-streaming" in recorded else ""}},
        "tts": {"engine": "melo", "device": "cpu",
                "melo": {"model": "tiny/melo-zh", "hf_home": "tiny/hf", "nltk_data": "tiny/nltk_data"}},
    }
    p = DaemonProcess(tmp_path, cfg, fake=False, watchdog_usec=10_000_000, strict=True)
    try:
        p.wait_ready(300)
        with ASRClient(p.asr, timeout=60) as c:
            info = c.describe()
            assert info["asr"]["engine"] == "funasr" and info["tts"]["engine"] == "melo"
            assert all(f["component"].endswith(".device") for f in info["fallbacks"]), info["fallbacks"]
            check_describe(info)  # the tiny FunASR/Melo engines' describe, through the schema
            x, _ = read_wav(str(fixtures_dir / "zh/long.wav"))
            pcm = float_to_pcm16(x)
            st = c.open()
            evs = []
            for off in range(0, len(pcm), 3200):
                st.send(pcm[off:off + 3200])
                evs += st.poll(0)
            evs += st.finalize(timeout=60)
        finals = [e for e in evs if isinstance(e, P.Final)]
        assert len(finals) >= 4  # fsmn-vad splits the four utterances (+ the finalize flush)
        with TTSClient(p.tts, timeout=60) as t:
            chunks = list(t.synthesize("你好。今天天气很好。"))
        assert {c.sentence for c in chunks} == {0, 1} and all(c.sample_rate == 24000 for c in chunks)
        mark = time.monotonic()
        p.signal(signal.SIGTERM)
        assert p.notify.wait_for("STOPPING=1", 5, after=mark) is not None
        assert p.proc.wait(15) == 0
    finally:
        p.stop()
