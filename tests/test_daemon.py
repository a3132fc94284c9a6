"""The real daemon process (`python -m daemon`) on FAKE engines (tests/fake_engines.py): these
tests are about the daemon — systemd notify, protocol errors, routing, ownership, limits,
lifecycle — not about recognition quality. Real engines: tests/test_client_ctl.py."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid

import pytest
import zmq

from daemon.wire import protocol as P
from daemon.audio import float_to_pcm16, read_wav
from daemon.wire.client import ASRClient, DaemonError, TTSClient
from daemon.errors import ErrorCode
from daemon.serving.factory import StartupError, choose_engine
from daemon_harness import DaemonProcess
from helpers.describe_schema import check_describe
from fake_engines import FakeASRPool

MAX_SESSIONS = 12
IDLE = 2.0


@pytest.fixture(scope="module")
def d(tmp_path_factory, models_dir):
    p = DaemonProcess(tmp_path_factory.mktemp("fakedaemon"), {
        "models_root": str(models_dir),
        "limits": {"max_sessions": MAX_SESSIONS, "idle_timeout": IDLE, "max_chunk_seconds": 2.0},
    }, watchdog_usec=1_000_000)
    p.wait_ready(30)
    yield p
    p.stop()


def raw(ctx, endpoint):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, uuid.uuid4().hex.encode())
    s.connect(endpoint)
    return s


def recv_reply(sock, timeout=5.0):
    assert sock.poll(int(timeout * 1000)), "no reply"
    return P.decode_reply(P.split_dealer(sock.recv_multipart()))


def fixture_pcm(fixtures_dir, name):
    x, sr = read_wav(str(fixtures_dir / name))
    assert sr == 16000
    return float_to_pcm16(x)


def expected_finals(pcm, chunk):
    """What the fake engine says for this audio fed in these chunks (run in-process)."""
    from daemon.config import Config

    pool = FakeASRPool(Config())
    s = pool.open("x")
    out = []
    for off in range(0, len(pcm), chunk):
        out += s.feed(pcm[off:off + chunk])
    out += s.finalize_events()
    return [e["text"] for e in out if e["type"] == "final" and e["text"]]


# --- lifecycle -------------------------------------------------------------------------------


def test_ready_after_loading_then_watchdog_pings(d):
    ready = d.notify.times("READY=1")[0]
    ext = d.notify.times("EXTEND_TIMEOUT_USEC=")
    assert ext and ext[0] < ready, "EXTEND_TIMEOUT_USEC is sent while loading, before READY"
    assert any(line.startswith("STATUS=loading") for _t, line in d.notify.lines)
    assert d.notify.wait_for("WATCHDOG=1", 3.0, after=ready) is not None
    time.sleep(1.6)
    # WATCHDOG_USEC=1 s: pings every 0.5 s while healthy.
    assert len([t for t in d.notify.times("WATCHDOG=1") if t > ready]) >= 3
    assert any(line.startswith("STATUS=serving") for _t, line in d.notify.lines)


def test_socket_files_mode(d):
    import os
    import stat

    for ep in (d.asr, d.tts):
        mode = stat.S_IMODE(os.stat(ep[len("ipc://"):]).st_mode)
        assert mode == 0o660
    assert stat.S_IMODE(os.stat(d.tmp / "run").st_mode) == 0o750


def test_ping_and_describe(d):
    with ASRClient(d.asr) as c:
        assert c.ping() < 1.0
        info = c.describe()
    assert info["asr"]["engine"] == "fake" and info["tts"]["engine"] == "fake"
    assert info["daemon"]["protocol"] == P.PROTOCOL_VERSION and info["daemon"]["healthy"]
    assert info["limits"]["max_sessions"] == MAX_SESSIONS
    for key in ("capabilities", "fallbacks", "sessions", "queues", "counters"):
        assert key in info
    text = check_describe(info)  # the fake engines keep the same schema as the real ones
    assert "engine=fake (FAKE, tests only)" in text and "fallback none" in text
    with TTSClient(d.tts) as t:
        assert t.describe()["tts"]["sample_rate"] == 24000


# --- malformed input -------------------------------------------------------------------------


def test_malformed_frames_get_error_codes_and_daemon_keeps_serving(d):
    ctx = zmq.Context.instance()
    s = raw(ctx, d.asr)
    t = raw(ctx, d.tts)
    try:
        cases = [
            (s, [P.Ping(request_id="x").encode()[0]], ErrorCode.BAD_REQUEST),  # no delimiter
            (s, [b"", b"{oops"], ErrorCode.BAD_REQUEST),
            (s, [b"", json.dumps({"v": 1, "type": "frobnicate", "request_id": "u"}).encode()], ErrorCode.UNKNOWN_TYPE),
            (s, [b"", json.dumps({"v": 99, "type": "ping", "request_id": "v"}).encode()], ErrorCode.BAD_VERSION),
            (s, [b""] + P.Audio(session_id="nobody", seq=0, pcm=b"\0\0").encode(), ErrorCode.NO_SESSION),
            (s, [b""] + P.Synthesize(request_id="w", text="hi").encode(), ErrorCode.UNKNOWN_TYPE),
            (t, [b""] + P.Open(session_id="z").encode(), ErrorCode.UNKNOWN_TYPE),
            (t, [b""] + P.Synthesize(request_id="e", text="   ").encode(), ErrorCode.BAD_TEXT),
            (t, [b""] + P.Synthesize(request_id="l", text="x" * 5000).encode(), ErrorCode.BAD_TEXT),
            (t, [b""] + P.Cancel(request_id="never").encode(), ErrorCode.BAD_REQUEST),
        ]
        for sock, frames, code in cases:
            sock.send_multipart(frames)
            m = recv_reply(sock)
            assert isinstance(m, P.Error) and m.code == code.value, (frames, m)
        # Oversized and odd-length audio on an open session.
        s.send_multipart([b""] + P.Open(session_id="mal", request_id="o").encode())
        assert isinstance(recv_reply(s), P.Opened)
        for pcm, code in ((b"\0" * (16000 * 2 * 3), ErrorCode.BAD_AUDIO), (b"\0" * 3, ErrorCode.BAD_AUDIO)):
            s.send_multipart([b""] + P.Audio(session_id="mal", seq=1, pcm=pcm).encode())
            m = recv_reply(s)
            assert isinstance(m, P.Error) and m.code == code.value and m.session_id == "mal" and m.seq == 1
        s.send_multipart([b""] + P.Open(session_id="mal", request_id="o2").encode())
        m = recv_reply(s)
        assert m.code == ErrorCode.SESSION_EXISTS.value and m.request_id == "o2"
        s.send_multipart([b""] + P.Close(session_id="mal", request_id="c").encode())
        assert isinstance(recv_reply(s), P.Closed)
    finally:
        s.close()
        t.close()
    # A well-behaved client is still served.
    with ASRClient(d.asr) as c:
        st = c.open()
        st.send(b"\0\0" * 1600)
        evs = st.finalize()
        assert isinstance(evs[-1], P.Closed) and isinstance(evs[-2], P.Final)
        assert c.describe()["counters"]["protocol_errors"] >= 5


# --- sessions --------------------------------------------------------------------------------


def test_eight_concurrent_clients_get_their_own_finals(d, fixtures_dir):
    names = ["zh/01.wav", "zh/02.wav", "zh/03.wav", "zh/04.wav", "zh/05.wav", "zh/06.wav", "en/01.wav", "zh/long.wav"]
    chunk = 3200
    results, errors = {}, []

    def run(i, name):
        try:
            pcm = fixture_pcm(fixtures_dir, name)
            with ASRClient(d.asr) as c:
                st = c.open(session_id=f"conc-{i}")
                events = []
                t0 = time.monotonic()
                for k, off in enumerate(range(0, len(pcm), chunk)):
                    st.send(pcm[off:off + chunk])
                    events += st.poll(0)
                    # 4x real time
                    delay = t0 + (k + 1) * 0.1 / 4 - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                events += st.finalize(timeout=20)
                assert all(getattr(e, "session_id", st.session_id) == st.session_id for e in events)
                results[i] = (name, [e.text for e in events if isinstance(e, P.Final) and e.text])
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i, (name, finals) in results.items():
        assert finals == expected_finals(fixture_pcm(fixtures_dir, name), chunk), name
    assert len(results[7][1]) == 4  # long.wav: four utterances
    # The fake engines keep the step contract: the daemon fed them through its batched path
    # (daemon/asr/batch.py), the pool answering their model requests.
    with ASRClient(d.asr) as c:
        assert c.describe()["asr"]["details"]["request_rounds"] > 0


def test_not_owner(d):
    with ASRClient(d.asr) as a, ASRClient(d.asr) as b:
        st = a.open(session_id="owned-by-a")
        for m in (P.Audio(session_id="owned-by-a", seq=0, pcm=b"\0\0"), P.Finalize(session_id="owned-by-a", request_id="f"),
                  P.Close(session_id="owned-by-a", request_id="c"), P.Reset(session_id="owned-by-a", request_id="r")):
            b.send(m)
            reply = b.recv(5)
            assert isinstance(reply, P.Error) and reply.code == ErrorCode.NOT_OWNER.value
        st.reset()
        assert isinstance(st.close()[-1], P.Closed)


def test_busy_at_session_cap_and_retry_hint(d):
    with ASRClient(d.asr) as c:
        base = len(c.describe()["sessions"])
        streams = [c.open() for _ in range(MAX_SESSIONS - base)]
        with pytest.raises(DaemonError) as ei:
            c.open()
        assert ei.value.code == ErrorCode.BUSY and ei.value.retry_after and ei.value.retry_after > 0
        for s in streams:
            s.close()
        c.open().close()  # capacity is back


def test_idle_sessions_are_closed_with_an_event(d):
    with ASRClient(d.asr) as c:
        st = c.open(session_id="idler")
        t0 = time.monotonic()
        evs = st.poll(IDLE + 3)
        assert evs and isinstance(evs[-1], P.Closed) and evs[-1].reason == "idle"
        assert IDLE <= time.monotonic() - t0 < IDLE + 3
        assert "idler" not in [s["session_id"] for s in c.describe()["sessions"]]


def test_vanished_peer_sessions_are_freed(d, fixtures_dir):
    pcm = fixture_pcm(fixtures_dir, "zh/01.wav")
    gone = ASRClient(d.asr)
    # A slow engine step (fake knob) guarantees the peer is gone before events go out.
    st = gone.open(session_id="vanisher", hotwords=["fake:delay=0.2"])
    for off in range(0, 16000 * 2 * 2, 3200):
        st.send(pcm[off:off + 3200])
    gone.ping()  # answered after the audio was received (LINGER 0 would drop unsent audio)
    gone.close()
    with ASRClient(d.asr) as c:
        deadline = time.monotonic() + 10
        while "vanisher" in [s["session_id"] for s in c.describe()["sessions"]]:
            assert time.monotonic() < deadline, "vanished peer's session not freed"
            time.sleep(0.1)
        assert c.describe()["counters"]["peer_gone"] >= 1


def test_resampled_input(d, fixtures_dir):
    from daemon.audio import resample

    x, _ = read_wav(str(fixtures_dir / "zh/03.wav"))
    pcm48 = float_to_pcm16(resample(x, 16000, 48000))
    with ASRClient(d.asr) as c:
        st = c.open(sample_rate=48000)
        assert st.capabilities["sample_rate"] == 48000
        for off in range(0, len(pcm48), 9600):
            st.send(pcm48[off:off + 9600])
        finals = [m for m in st.finalize() if isinstance(m, P.Final) and m.text]
    assert len(finals) == 1


# --- TTS -------------------------------------------------------------------------------------


def test_tts_streams_sentences_then_done(d):
    with TTSClient(d.tts) as t:
        chunks = list(t.synthesize("Hello there. How are you? 你好。"))
    assert [c.sentence for c in chunks] == [0, 1, 2]
    assert all(c.sample_rate == 24000 and len(c.pcm) % 2 == 0 for c in chunks)
    assert chunks[0].text == "Hello there."


def test_tts_cancel_within_one_chunk(d):
    with TTSClient(d.tts) as t:
        rid = "slow-1"
        t.send(P.Synthesize(request_id=rid, text="[slow] " + "One. " * 10))
        first = t.recv(5)
        assert isinstance(first, P.SynthAudio)
        t.send(P.Cancel(request_id=rid))
        after = []
        while True:
            m = t.recv(3)
            assert m is not None
            after.append(m)
            if isinstance(m, P.Cancelled):
                break
        assert len([m for m in after if isinstance(m, P.SynthAudio)]) <= 1
        assert t.recv(1.0) is None  # nothing after cancelled
        # and the worker is free again
        assert list(t.synthesize("Done."))


def test_blocking_synthesize_left_early_cancels_in_the_daemon(d):
    """Breaking out of the blocking client's synthesize() sends `cancel`, as the asyncio client
    does (the two had drifted): the daemon stops at once instead of synthesising 10 slow sentences."""
    with TTSClient(d.tts) as t, ASRClient(d.asr) as c:
        for chunk in t.synthesize("[slow] " + "One. " * 10):
            assert isinstance(chunk, P.SynthAudio)
            break
        deadline = time.monotonic() + 2.0  # the whole request would take 3 s
        while c.describe()["queues"]["tts_requests"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.describe()["queues"]["tts_requests"] == 0
        assert list(t.synthesize("Done."))  # the client still works


def test_tts_does_not_starve_asr(d, fixtures_dir):
    pcm = fixture_pcm(fixtures_dir, "zh/01.wav")
    with TTSClient(d.tts) as t, ASRClient(d.asr) as c:
        t.send(P.Synthesize(request_id="long", text="[slow] " + "Sentence. " * 8))
        st = c.open()
        t0 = time.monotonic()
        for off in range(0, len(pcm), 3200):
            st.send(pcm[off:off + 3200])
        evs = st.finalize()
        took = time.monotonic() - t0
        assert isinstance(evs[-1], P.Closed) and took < 1.5, took
        t.send(P.Cancel(request_id="long"))


# --- reload and stop -------------------------------------------------------------------------


def test_sighup_reloads_limits(d):
    cfg = json.loads(json.dumps(d.config))
    cfg["limits"]["max_text_chars"] = 77
    cfg["asr"] = {"device": "cpu"}  # needs a restart: reported, not applied
    d.write_config(cfg)
    mark = time.monotonic()
    d.signal(signal.SIGHUP)
    assert d.notify.wait_for("STATUS=reloaded", 5, after=mark) is not None
    line = [l for t, l in d.notify.lines if t >= mark and l.startswith("STATUS=reloaded")][0]
    assert "limits.max_text_chars" in line and "asr.device" in line
    with TTSClient(d.tts) as t:
        assert t.describe()["limits"]["max_text_chars"] == 77
        with pytest.raises(DaemonError) as ei:
            list(t.synthesize("x" * 100))
        assert ei.value.code == ErrorCode.BAD_TEXT


def test_zz_sigterm_drains_and_exits_zero(d):
    c = ASRClient(d.asr)
    st = c.open(session_id="at-shutdown")
    mark = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.notify.wait_for("STOPPING=1", 5, after=mark) is not None
    rc = d.proc.wait(2.0 + 3.0)
    assert rc == 0
    evs = st.poll(2)
    assert any(isinstance(e, P.Closed) and e.reason == "shutdown" for e in evs)
    c.close()
    assert not (d.tmp / "run" / "asr.sock").exists()


# --- separate daemons ------------------------------------------------------------------------


def test_hung_engine_stops_watchdog(tmp_path, models_dir):
    p = DaemonProcess(tmp_path, {"models_root": str(models_dir)}, watchdog_usec=600_000)
    try:
        p.wait_ready(30)
        with ASRClient(p.asr) as c:
            st = c.open(hotwords=["fake:hang"])
            st.send(b"\0\0" * 1600)
            time.sleep(0.3)
            hung_at = time.monotonic()
            time.sleep(2.0)
            pings = [t for t in p.notify.times("WATCHDOG=1") if t > hung_at + 0.7]
            assert not pings, "WATCHDOG=1 must stop while an engine worker is hung"
            assert c.describe()["daemon"]["healthy"] is False
        mark = time.monotonic()
        p.signal(signal.SIGTERM)
        assert p.proc.wait(10) == 0
        assert time.monotonic() - mark < 2.0 + 3.0
    finally:
        p.stop()


def test_second_sigint_forces_exit(tmp_path, models_dir):
    p = DaemonProcess(tmp_path, {"models_root": str(models_dir), "daemon": {"drain_timeout": 30.0}})
    try:
        p.wait_ready(30)
        with TTSClient(p.tts) as t:
            t.send(P.Synthesize(request_id="h", text="[hang] forever."))
            time.sleep(0.3)
            p.signal(signal.SIGINT)
            assert p.notify.wait_for("STOPPING=1", 5) is not None
            p.signal(signal.SIGINT)
            assert p.proc.wait(5) == 130
    finally:
        p.stop()


def test_strict_refuses_to_start_without_weights(tmp_path):
    p = DaemonProcess(tmp_path, {"models_root": str(tmp_path / "empty")}, fake=False, strict=True)
    rc = p.proc.wait(60)
    log = p.log()
    p.stop()
    assert rc != 0
    assert "strict" in log and "asr engine funasr unavailable" in log


def test_choose_engine_decisions():
    assert choose_engine("asr", "funasr", "whisper", {}, False).engine == "funasr"
    c = choose_engine("asr", "funasr", "whisper", {"funasr": "absent"}, False)
    assert c.engine == "whisper" and [f.line() for f in c.fallbacks] == ["asr.engine: funasr -> whisper (startup): absent"]
    with pytest.raises(StartupError):
        choose_engine("asr", "funasr", "whisper", {"funasr": "absent"}, True)
    with pytest.raises(StartupError):
        choose_engine("tts", "melo", "none", {"melo": "absent"}, False)
    with pytest.raises(StartupError):
        choose_engine("tts", "melo", "piper", {"melo": "absent", "piper": "absent"}, False)
