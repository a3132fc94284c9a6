"""Partials on the bundled Whisper (issue 25, "Words while you speak"): a real daemon with
Whisper base (faster-whisper int8 on the CPU) and fsmn-vad, fed a Mandarin recording in real
time over its ZeroMQ socket. While the user speaks, partials of the utterance so far arrive
before its final; a session that asks for none gets none; the final is not later than with
partials off (same daemon, same audio); at 4 concurrent streams partials are thinned (skipped
while the worker is busy) and finals keep their latency. Plus the page: on a fresh machine's
engines (the fallback to Whisper) the user's words appear in the browser, from a fake
microphone, before the final.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from daemon.wire import protocol as P
from daemon.audio import float_to_pcm16, read_wav
from daemon.wire.client import ASRClient
from daemon_harness import DaemonProcess

CHUNK_S = 0.1
TAIL_S = 1.5  # silence after the recording: its last utterance ends by the VAD, not finalize
# What partials may add to a final's latency (a partial decode is ~0.2 CPU s; the box is shared).
# Whisper's final decodes on a shared 2-core box vary from 1 to 10 s of wall time from one
# utterance to the next whatever partials do, so "not later" is judged with this much slack.
MARGIN_ALONE_S = 0.5
MARGIN_LOADED_S = 1.0
NOISE = 1.5  # x the median latency with partials off
IDLE_S = 3.0  # the worker idle before each run, as between two people's turns

Timed = List[Tuple[float, P.Message]]


def _pcm(fixtures_dir: Path, name: str) -> bytes:
    x, sr = read_wav(str(fixtures_dir / name))
    assert sr == 16000
    return float_to_pcm16(x) + b"\0\0" * int(TAIL_S * sr)


def stream_realtime(endpoint: str, pcm: bytes, partials: bool, sid: str) -> Timed:
    """Send pcm in CHUNK_S chunks on an absolute real-time schedule, then finalize; every event
    with its arrival time in seconds of audio sent (t=0: the first chunk)."""
    events: Timed = []
    n = int(16000 * CHUNK_S) * 2
    time.sleep(IDLE_S)
    with ASRClient(endpoint, timeout=120) as c:
        st = c.open(session_id=sid, language="zh", partials=partials)
        t0 = time.monotonic()
        for k, off in enumerate(range(0, len(pcm), n)):
            st.send(pcm[off:off + n])
            due = t0 + (k + 1) * CHUNK_S
            while True:
                left = due - time.monotonic()
                for m in st.poll(max(left, 0.0)):
                    events.append((time.monotonic() - t0, m))
                if left <= 0:
                    break
        for m in st.finalize(timeout=120):
            events.append((time.monotonic() - t0, m))
    return events


def finals(events: Timed) -> List[Tuple[float, P.Final]]:
    return [(t, m) for t, m in events if isinstance(m, P.Final) and m.text]


def partials(events: Timed) -> List[Tuple[float, P.Partial]]:
    return [(t, m) for t, m in events if isinstance(m, P.Partial)]


def latencies(events: Timed) -> List[float]:
    """Each final's arrival after its speech ended (the VAD's end silence included)."""
    return [t - f.end for t, f in finals(events)]


def overlap(partial: str, final: str) -> float:
    """The share of a partial's characters its final has (order aside): prefix-like, not equal."""
    chars = [ch for ch in partial if not ch.isspace() and ch not in "，。,.!?？！"]
    return sum(ch in final for ch in chars) / max(len(chars), 1)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, models_dir):
    if not (models_dir / "whisper-base" / "model.bin").is_file():
        pytest.skip("bundled whisper-base not installed")
    d = tmp_path_factory.mktemp("whisper-partials")
    p = DaemonProcess(d, {
        "models_root": str(models_dir),
        "asr": {"engine": "whisper", "device": "cpu", "fallback_engine": "none",
                "whisper": {"model": "whisper-base", "vad": "fsmn-vad", "partial_interval": 1.0}},
        "tts": {"engine": "piper", "device": "cpu", "fallback_engine": "none",
                "piper": {"voice": "piper/en_US-joe-medium.onnx"}},
        # Admission and shedding off: these tests are about partials, not about who is let in or
        # what audio a lagging session loses (on a shared box Whisper alone may lag seconds).
        "limits": {"idle_timeout": 120.0, "max_asr_load": 0.0, "max_asr_lag": 120.0, "max_session_lag": 120.0},
        "logging": {"level": "DEBUG"},
    }, fake=False, watchdog_usec=60_000_000)
    try:
        p.wait_ready(300)
        with ASRClient(p.asr, timeout=120) as c:  # warm-up: the first decodes are slow
            st = c.open(language="zh", partials=True)
            pcm = _pcm(Path(__file__).parent / "fixtures", "zh/01.wav")
            for off in range(0, len(pcm), 32000):
                st.send(pcm[off:off + 32000])
            st.finalize(timeout=120)
        yield p
    finally:
        p.stop()


def _details(p: DaemonProcess) -> Dict[str, Any]:
    with ASRClient(p.asr, timeout=30) as c:
        return dict(c.describe()["asr"]["details"])


def test_partials_arrive_before_the_final_without_delaying_it(daemon, fixtures_dir):
    pcm = _pcm(fixtures_dir, "zh/long.wav")
    off = stream_realtime(daemon.asr, pcm, False, "off")
    on = stream_realtime(daemon.asr, pcm, True, "on")
    assert partials(off) == [], "a session that asks for no partials gets none"
    assert len(finals(on)) == len(finals(off)) == 4, (finals(on), finals(off))

    # Words while the user speaks: a partial before the final (the first utterance, which meets
    # an idle worker, always; the later ones while the worker keeps up, i.e. on a quiet machine).
    shown = []
    for t_final, f in finals(on):
        before = [(t, m) for t, m in partials(on) if m.utterance == f.utterance and t < t_final]
        if f.utterance == 0:
            assert before, f"no partial before the final {f.text!r} ({f.start}-{f.end} s): {on}"
        shown += [(m.text, f.text) for _, m in before]
        assert all(m.start == f.start and m.end <= f.end + 0.3 for _, m in before), (before, f)
    # ... and they say (roughly) what the final says.
    assert statistics.mean(overlap(p, f) for p, f in shown) >= 0.7, shown
    assert any(p[:2] == f[:2] for p, f in shown), shown

    lat_on, lat_off = statistics.median(latencies(on)), statistics.median(latencies(off))
    print(f"final latency p50: partials on {lat_on:.2f} s, off {lat_off:.2f} s; "
          f"{len(partials(on))} partials: {[m.text for _, m in partials(on)]}")
    assert lat_on <= NOISE * lat_off + MARGIN_ALONE_S, (latencies(on), latencies(off))


def _streams(endpoint: str, pcm: bytes, partials_on: bool, n: int) -> List[Timed]:
    out: List[Timed] = [[] for _ in range(n)]
    errors: List[BaseException] = []

    def one(i: int) -> None:
        time.sleep(0.25 * i)  # staggered, as people start talking
        try:
            out[i] = stream_realtime(endpoint, pcm, partials_on, f"{'on' if partials_on else 'off'}-{i}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return out


def test_four_streams_thin_partials_rather_than_delay_finals(daemon, fixtures_dir):
    pcm = _pcm(fixtures_dir, "zh/03.wav")
    off = _streams(daemon.asr, pcm, False, 4)
    before = _details(daemon)
    on = _streams(daemon.asr, pcm, True, 4)
    after = _details(daemon)
    for ev in off + on:
        assert len(finals(ev)) == 1, finals(ev)
    lat_on = statistics.median(x for ev in on for x in latencies(ev))
    lat_off = statistics.median(x for ev in off for x in latencies(ev))
    decoded = after["partials_decoded"] - before["partials_decoded"]
    skipped = after["partials_skipped"] - before["partials_skipped"]
    print(f"4 streams: final latency p50 partials on {lat_on:.2f} s, off {lat_off:.2f} s; "
          f"partials decoded {decoded}, skipped {skipped}, sent {sum(len(partials(ev)) for ev in on)}")
    assert skipped > 0, "under load some partials are skipped"
    assert lat_on <= NOISE * lat_off + MARGIN_LOADED_S, (lat_on, lat_off)


# --- the page: words before the final, on a fresh machine's engines ---------------------------

from test_browser import _open, browser, shots, stack  # noqa: E402,F401 - the same stack and Chromium


def test_words_appear_on_the_page_before_the_final(stack, browser):  # noqa: F811
    """FunASR configured but absent: the daemon falls back to the bundled Whisper with the default
    asr.whisper.partial_interval; Chromium's fake microphone says 提醒我晚上八点给阳台的花浇水."""
    _, bridge, _, _ = stack
    page = _open(browser, bridge.http + "/")
    try:
        page.click("#talk")
        page.wait_for_function("window.s2sStats.ready", timeout=15000)
        # The first of: the user's bubble shows some of the sentence's words, or a final arrived.
        seen = page.wait_for_function("""() => {
            const s = window.s2sStats;
            if (s.finals.some(t => t.length > 0)) return "final first: " + JSON.stringify(s.finals);
            const li = document.querySelector('#log li.user.placeholder');
            const t = li ? li.textContent : "";
            return [..."提醒我晚上八点给阳台的花浇水"].filter(ch => t.includes(ch)).length >= 2 ? "partial: " + t : null;
        }""", timeout=60000).json_value()
        partial_count = page.evaluate("window.s2sStats.partials")
        page.wait_for_function("window.s2sStats.finals.some(t => t.length > 0)", timeout=60000)
        final = page.evaluate("window.s2sStats.finals.find(t => t.length > 0)")
        page.click("#talk")
    finally:
        page.close()
    assert seen.startswith("partial: "), seen
    assert partial_count >= 1
    print(f"page: {seen!r} before the final {final!r}")
