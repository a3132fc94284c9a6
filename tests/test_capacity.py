"""ASR capacity in the daemon: merging queued audio into fewer engine calls, and `busy` past
capacity instead of silent lateness.

The real daemon process (`python -m daemon`) on FAKE engines (tests/fake_engines.py): these
tests are about how the daemon schedules audio, not about recognition. The fake logs every
feed() it gets (S2S_FAKE_FEED_LOG) and can cost time per second of audio (`fake:rtf=`), which
makes its capacity known: 1 / rtf real-time streams.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import numpy as np
import pytest

from daemon.wire import protocol as P
from daemon.audio import float_to_pcm16, read_wav
from daemon.wire.client import ASRClient, DaemonError
from daemon.errors import ErrorCode
from daemon_harness import DaemonProcess
from fake_engines import FakeASRPool

MSG_SAMPLES = 320  # 20 ms messages: many small ones, as a browser bridge sends


def fixture_pcm(fixtures_dir: Path, name: str) -> bytes:
    x, sr = read_wav(str(fixtures_dir / name))
    assert sr == 16000
    return float_to_pcm16(x)


def chunks(pcm: bytes, samples: int) -> List[bytes]:
    return [pcm[off:off + samples * 2] for off in range(0, len(pcm), samples * 2)]


def fake_finals(*parts: bytes) -> List[tuple]:
    """(text, start, end) of the fake engine's finals for these parts, with a reset between
    parts, fed in one call each (the fake's output does not depend on chunking)."""
    from daemon.config import Config

    s = FakeASRPool(Config()).open("x")
    out: List[Dict] = []
    for i, pcm in enumerate(parts):
        if i:
            s.reset()
        out += s.feed(pcm)
    out += s.finalize_events()
    return [(e["text"], e["start"], e["end"]) for e in out if e["type"] == "final" and e["text"]]


def feeds(log: Path, session_id: str) -> List[int]:
    if not log.exists():
        return []
    rows = [line.split() for line in log.read_text().splitlines()]
    return [int(n) for sid, n in rows if sid == session_id]


@pytest.fixture(scope="module")
def merging(tmp_path_factory, models_dir):
    tmp = tmp_path_factory.mktemp("capacity-merge")
    log = tmp / "feeds.log"
    p = DaemonProcess(tmp, {"models_root": str(models_dir), "limits": {"max_chunk_seconds": 1.0}},
                      env={"S2S_FAKE_FEED_LOG": str(log)})
    p.wait_ready(30)
    yield p, log
    p.stop()


def test_queued_audio_is_fed_in_fewer_larger_calls_with_the_same_finals(merging, fixtures_dir):
    d, log = merging
    pcm = fixture_pcm(fixtures_dir, "zh/01.wav") + fixture_pcm(fixtures_dir, "zh/03.wav")
    msgs = chunks(pcm, MSG_SAMPLES)
    with ASRClient(d.asr, timeout=20) as c:
        before = c.describe()["counters"]
        # Each feed() costs 50 ms, so messages sent at once pile up behind the first one.
        s = c.open(session_id="merge", hotwords=["fake:delay=0.05"])
        for m in msgs:
            s.send(m, ack=True)
        events = s.finalize(timeout=20)
        after = c.describe()["counters"]
    acks = [m.seq for m in events if isinstance(m, P.Ack) and m.of == "audio"]
    assert acks == list(range(len(msgs))), "one ack per audio message, in order"
    assert not [m for m in events if isinstance(m, P.Error)]
    got = [(m.text, m.start, m.end) for m in events if isinstance(m, P.Final) and m.text]
    assert got and got == fake_finals(pcm)
    sizes = feeds(log, "merge")
    assert sum(sizes) == len(pcm) // 2, "every sample fed exactly once"
    assert len(sizes) <= len(msgs) // 5, f"{len(msgs)} messages took {len(sizes)} feed() calls"
    assert max(sizes) <= 16000, "a merged chunk stays within limits.max_chunk_seconds"
    assert after["asr_feeds"] - before["asr_feeds"] == len(sizes)
    assert after["asr_audio_messages"] - before["asr_audio_messages"] == len(msgs)


def test_merging_keeps_reset_and_finalize_in_order(merging, fixtures_dir):
    d, log = merging
    part1 = fixture_pcm(fixtures_dir, "zh/02.wav")
    part2 = fixture_pcm(fixtures_dir, "zh/04.wav")
    m1, m2 = chunks(part1, MSG_SAMPLES), chunks(part2, MSG_SAMPLES)
    with ASRClient(d.asr, timeout=20) as c:
        s = c.open(session_id="ordered", hotwords=["fake:delay=0.05"])
        for m in m1:
            s.send(m, ack=True)
        rid = "reset-1"
        c.send(P.Reset(session_id=s.session_id, request_id=rid))
        for m in m2:
            s.send(m, ack=True)
        events = s.finalize(timeout=20)
    order = []
    for m in events:
        if isinstance(m, P.Ack):
            order.append("reset" if m.of == "reset" else m.seq)
    n1 = len(m1)
    assert order == list(range(n1)) + ["reset"] + list(range(n1, n1 + len(m2)))
    # No engine call straddles the reset: the feeds before it add up to exactly part 1.
    sizes = feeds(log, "ordered")
    assert n1 // len(sizes) >= 2, "the audio was merged"
    cum = np.cumsum(sizes)
    assert len(part1) // 2 in cum
    assert cum[-1] == (len(part1) + len(part2)) // 2
    got = [(m.text, m.start, m.end) for m in events if isinstance(m, P.Final) and m.text]
    # After the reset the session timeline starts again at 0.
    assert got == fake_finals(part1, part2)
    assert isinstance(events[-1], P.Closed) and events[-1].reason == "finalized"


# --- admission ---------------------------------------------------------------------------------

RTF = 0.4  # the fake spends 0.4 s per second of audio: 2.5 real-time streams fill the worker
MAX_LAG = 0.5
MAX_SESSION_LAG = 1.5
STEP = 0.1


class Streamer(threading.Thread):
    """One real-time sender (100 ms of quiet audio every 100 ms) on its own client."""

    def __init__(self, endpoint: str, name: str):
        super().__init__(daemon=True, name=name)
        self.client = ASRClient(endpoint, timeout=10)
        self.session = self.client.open(session_id=name, hotwords=[f"fake:rtf={RTF}"])
        self.stop = threading.Event()
        self.errors: List[P.Error] = []
        self.sent = 0

    def run(self) -> None:
        pcm = float_to_pcm16(np.full(int(16000 * STEP), 1e-4, dtype=np.float32))
        t0 = time.monotonic()
        while not self.stop.is_set():
            self.session.send(pcm)
            self.sent += 1
            self.errors += [m for m in self.session.poll(0) if isinstance(m, P.Error)]
            time.sleep(max(0.0, t0 + self.sent * STEP - time.monotonic()))

    def finish(self) -> None:
        self.stop.set()
        self.join(5)
        try:
            self.session.close(timeout=10)
        finally:
            self.client.close()


@pytest.fixture(scope="module")
def slow(tmp_path_factory, models_dir):
    p = DaemonProcess(tmp_path_factory.mktemp("capacity-admit"), {
        "models_root": str(models_dir),
        # The lag rule alone (admission by predicted cost off): this fixture overloads on purpose.
        "limits": {"max_asr_lag": MAX_LAG, "max_session_lag": MAX_SESSION_LAG, "max_chunk_seconds": 1.0,
                   "max_asr_load": 0},
    })
    p.wait_ready(30)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, models_dir):
    """The defaults of admission (limits.max_asr_load 0.9): the lag bound is not what refuses."""
    p = DaemonProcess(tmp_path_factory.mktemp("capacity-predict"), {
        "models_root": str(models_dir),
        "limits": {"max_asr_lag": MAX_LAG, "max_session_lag": MAX_SESSION_LAG, "max_chunk_seconds": 1.0},
    })
    p.wait_ready(30)
    yield p
    p.stop()


def test_the_stream_one_too_many_is_refused_before_anyone_falls_behind(predicted):
    """Two fake streams at 0.4 of the worker each: one more is predicted at 1.2 and refused with
    `busy`, while the two keep up; with one of them gone a new stream fits again."""
    streams: List[Streamer] = []
    with ASRClient(predicted.asr, timeout=10) as c:
        try:
            # One stream, then a second, as users arrive: two loads measured at two stream counts
            # give the cost of one more stream (one count alone cannot).
            streams = [Streamer(predicted.asr, "p0")]
            streams[0].start()
            wait_for(c, lambda i: i["queues"]["asr_streams"] == 1 and i["queues"]["asr_worker_load"] > 0.3, 15)
            time.sleep(2.5)  # one whole window with the one stream
            streams.append(Streamer(predicted.asr, "p1"))
            streams[1].start()
            info = wait_for(c, lambda i: i["queues"]["asr_streams"] == 2 and i["queues"]["asr_worker_load"] > 0.6
                            and i["queues"]["asr_stream_capacity"] == 2, 20)
            q = info["queues"]
            assert q["asr_worker_load"] > 0.6 and q["asr_stream_capacity"] == 2, q
            assert 0.15 < q["asr_stream_cost"] < 0.55, q  # ~0.4 of the worker each, some of it shared
            with pytest.raises(DaemonError) as e:
                c.open(session_id="third")
            assert e.value.code == ErrorCode.BUSY and "predicted" in str(e.value)
            assert e.value.retry_after is not None and e.value.retry_after >= 1.0
            info = c.describe()
            assert info["counters"]["busy_open_load"] >= 1
            assert info["counters"]["busy_open_lag"] == 0
            assert info["queues"]["asr_max_lag"] < MAX_LAG, info["queues"]
            assert not any(s.errors for s in streams), "the admitted streams were never refused audio"

            streams.pop().finish()
            # The gone stream stops counting at once; the load falls within a window.
            open_when_admitted(c, "fits-again", 15).close()
        finally:
            finish_all(streams)


def finish_all(streams: List[Streamer]) -> None:
    for s in streams:
        if s.is_alive() or not s.session.closed:
            try:
                s.finish()
            except DaemonError:
                pass


def open_when_admitted(c: ASRClient, session_id: str, timeout: float):
    """Open as a client honouring retry_after would (at most 1 s between tries)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return c.open(session_id=session_id)
        except DaemonError as e:
            if e.code != ErrorCode.BUSY or time.monotonic() > deadline:
                raise
            time.sleep(min(e.retry_after or 0.5, 1.0))


def wait_for(c: ASRClient, pred, timeout: float) -> Dict:
    deadline = time.monotonic() + timeout
    while True:
        info = c.describe()
        if pred(info) or time.monotonic() > deadline:
            return info
        time.sleep(0.1)


def test_busy_past_capacity_and_sessions_within_capacity_unaffected(slow):
    streams: List[Streamer] = []
    with ASRClient(slow.asr, timeout=10) as c:
        try:
            # Within capacity (0.8 of the worker): no lag, and a new session is welcome.
            streams = [Streamer(slow.asr, f"rt{i}") for i in range(2)]
            for s in streams:
                s.start()
            time.sleep(2.5)
            info = c.describe()
            assert info["queues"]["asr_max_lag"] < MAX_LAG, info["queues"]
            assert info["queues"]["asr_at_capacity"] is False
            extra = c.open(session_id="welcome")
            extra.close()
            assert not any(s.errors for s in streams)

            # Past capacity (1.6 of the worker): the daemon falls behind real time ...
            more = [Streamer(slow.asr, f"rt{i}") for i in range(2, 4)]
            streams += more
            for s in more:
                s.start()
            info = wait_for(c, lambda i: i["queues"]["asr_max_lag"] > MAX_LAG + 0.2, 15)
            assert info["queues"]["asr_max_lag"] > MAX_LAG, info["queues"]
            assert info["queues"]["asr_queued_seconds"] > 0
            assert all("lag" in s for s in info["sessions"])
            # ... and says so to a new client instead of queueing it.
            with pytest.raises(DaemonError) as e:
                c.open(session_id="refused")
            assert e.value.code == ErrorCode.BUSY
            assert e.value.retry_after is not None and 1.0 <= e.value.retry_after <= 30.0
            assert "behind real time" in str(e.value)
            assert c.describe()["counters"]["busy_open_lag"] >= 1

            # Sessions far behind get `busy` for their audio (dropped) rather than late finals;
            # their lag stays bounded instead of growing without limit.
            info = wait_for(c, lambda i: i["counters"]["audio_shed"] > 0, 15)
            assert info["counters"]["audio_shed"] > 0
            worst = 0.0
            for _ in range(15):
                worst = max(worst, c.describe()["queues"]["asr_max_lag"])
                time.sleep(0.2)
            assert worst < MAX_SESSION_LAG + 1.5, f"lag {worst:.1f} s grew past the shedding bound"
            shed = [m for s in streams for m in s.errors]
            assert shed and all(m.code == ErrorCode.BUSY.value and m.retry_after for m in shed)
            assert any(m.seq is not None for m in shed), "the refused audio message is named by seq"

            # Back within capacity: new sessions are admitted again.
            for s in more:
                s.finish()
            streams = streams[:2]
            info = wait_for(c, lambda i: i["queues"]["asr_max_lag"] < MAX_LAG, 15)
            assert info["queues"]["asr_max_lag"] < MAX_LAG, info["queues"]
            # As a client honouring retry_after would: the two remaining streams keep the lag near
            # the bound on a busy machine, so one open may still land a moment before it drops.
            open_when_admitted(c, "again", 15).close()
        finally:
            finish_all(streams)


# --- the VAD's cost per call -------------------------------------------------------------------


def test_vad_block_in_one_forward_gives_the_same_segments(models_dir, fixtures_dir, manifest):
    """daemon/asr/vad.py hands fsmn-vad a whole block (up to 1 s, what merged audio produces) as one
    model forward instead of one per 200 ms step: the segments must not change."""
    from daemon.asr.vad import FsmnVAD

    vad = FsmnVAD(models_dir / "fsmn-vad", ncpu=1)
    vad.load()
    row = next(r for r in manifest if r["kind"] == "long")
    x, sr = read_wav(str(fixtures_dir / row["path"]))
    assert sr == 16000

    def old_run(audio, cache, is_final):
        # The previous behaviour: one model forward per 200 ms step, whatever the block.
        res = vad._model.generate(input=audio, cache=cache, is_final=is_final, chunk_size=vad.step_ms,
                                  max_end_silence_time=vad.max_end_silence_ms, disable_pbar=True)
        return list(res[0]["value"]) if res else []

    def segments(piece: int, steps_only: bool) -> List[tuple]:
        seg = vad.segmenter()
        if steps_only:
            seg.vad = SimpleNamespace(run=old_run, step_ms=vad.step_ms, tail_step_ms=vad.tail_step_ms,
                                      frame_ms=vad.frame_ms)
        events = []
        for off in range(0, len(x), piece):
            events += seg.push(x[off:off + piece])
        events += seg.flush()
        return [(e.kind, e.start, e.end, e.reason) for e in events]

    model = vad._model.model
    calls = {"n": 0}
    forward = model.forward

    def counted(*a, **kw):
        calls["n"] += 1
        return forward(*a, **kw)

    model.forward = counted
    whole = segments(16000, steps_only=False)
    fast = calls["n"]
    assert len([e for e in whole if e[0] == "end"]) == 4
    assert whole == segments(16000, steps_only=True)
    slow_calls = calls["n"] - fast
    assert fast * 3 <= slow_calls, f"{fast} model forwards for 1 s blocks vs {slow_calls} in 200 ms steps"
    del model.forward
    assert whole == segments(640, steps_only=False)
