"""Regression tests for the daemon-core defects of issue 13, each on a real daemon process
(`python -m daemon`) with the FAKE engines (tests/fake_engines.py): they are about the
daemon's transport, admission and bookkeeping, not about speech.

Every test here failed on the daemon before the reshaping (server.py as one class)."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
import zmq

from daemon.wire import protocol as P
from daemon.asr.capacity import MAX_QUEUED_COMMANDS
from daemon.wire.client import ASRClient, DaemonError, TTSClient
from daemon.errors import ErrorCode
from daemon_harness import DaemonProcess
from helpers.zmq_raw import drain, gaps, header, ping, raw, recv_reply, send_json


def start(tmp_path, models_dir, limits=None, daemon=None, watchdog_usec=1_000_000, env=None, asr=None):
    cfg = {"models_root": str(models_dir), "limits": {"idle_timeout": 30.0, **(limits or {})}}
    if daemon:
        cfg["daemon"] = daemon
    if asr:
        cfg["asr"] = asr
    p = DaemonProcess(tmp_path, cfg, watchdog_usec=watchdog_usec, env=env)
    p.wait_ready(30)
    return p


@pytest.fixture
def d(tmp_path, models_dir):
    p = start(tmp_path, models_dir, limits={"max_sessions": 2})
    yield p
    p.stop()


# 1 --------------------------------------------------------------------------------------------


def test_lone_surrogate_ids_get_an_error_and_the_socket_keeps_answering(d):
    ctx = zmq.Context.instance()
    a, t = raw(ctx, d.asr), raw(ctx, d.tts)
    try:
        send_json(a, '{"v":1,"type":"audio","session_id":"\\ud800"}', b"\0\0")
        send_json(a, '{"v":1,"type":"open","session_id":"ok","request_id":"\\udfff"}')
        send_json(t, '{"v":1,"type":"cancel","request_id":"\\udc80"}')
        send_json(t, '{"v":1,"type":"synthesize","request_id":"r","text":"\\ud83d."}')
        for sock in (a, a, t, t):
            m = recv_reply(sock, 3.0)
            assert isinstance(m, P.Error) and m.code == ErrorCode.BAD_REQUEST.value, m
        # The same sockets are still served (liveness by a round trip, not by the pid).
        ping(a)
        ping(t)
    finally:
        a.close()
        t.close()


# 2 --------------------------------------------------------------------------------------------


def test_failed_opens_never_leak_session_slots(d):
    ctx = zmq.Context.instance()
    a = raw(ctx, d.asr)
    try:
        for i in range(4):  # max_sessions is 2
            send_json(a, header(type="open", request_id=f"r{i}") [:-1] + ', "session_id": "\\ud800%d"}' % i)
        drain(a, 0.5)
    finally:
        a.close()
    with ASRClient(d.asr, timeout=5) as c:
        s1, s2 = c.open(), c.open()
        s1.close()
        s2.close()


def test_an_engine_bug_while_opening_answers_the_open_at_once(d):
    with ASRClient(d.asr, timeout=5) as c:
        t0 = time.monotonic()
        with pytest.raises(DaemonError) as ei:
            c.open(hotwords=["fake:open_error"], timeout=3)
        assert ei.value.code == ErrorCode.ENGINE_ERROR and time.monotonic() - t0 < 2.0
        c.open().close()  # and the slot is free again


# 3 --------------------------------------------------------------------------------------------


def test_a_flood_does_not_starve_the_loop_or_the_log(tmp_path, models_dir):
    p = start(tmp_path, models_dir)
    try:
        stop = threading.Event()
        sent = [0]

        def flood(endpoint: str) -> None:
            ctx = zmq.Context()
            socks = [raw(ctx, endpoint) for _ in range(2)]
            junk = [b"", b"not json at all"]
            while not stop.is_set():
                for s in socks:
                    try:
                        s.send_multipart(junk, flags=zmq.DONTWAIT)
                        sent[0] += 1
                    except zmq.Again:
                        pass
            for s in socks:
                s.close()
            ctx.term()

        threads = [threading.Thread(target=flood, args=(ep,)) for ep in (p.asr, p.tts)]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        slowest = 0.0
        try:
            with TTSClient(p.tts, timeout=5) as c:
                while time.monotonic() - t0 < 3.0:
                    slowest = max(slowest, c.ping())
                    time.sleep(0.1)
        finally:
            stop.set()
            for th in threads:
                th.join()
        t1 = time.monotonic()
        assert sent[0] > 10000, sent
        assert slowest < 1.0, f"a ping took {slowest:.2f} s during the flood"
        # WATCHDOG_USEC=1 s: pings every 0.5 s, never a gap the watchdog would punish.
        assert gaps(p.notify.times("WATCHDOG=1"), t0 + 0.5, t1) < 1.0
        bad = [l for l in p.log().splitlines() if "bad message" in l or "high-water" in l]
        assert len(bad) < 30, f"{len(bad)} log lines for the flood"
        with ASRClient(p.asr, timeout=5) as c:
            assert c.describe()["counters"]["protocol_errors"] > 1000
    finally:
        p.stop()


# 4 --------------------------------------------------------------------------------------------


def test_watchdog_keeps_pinging_through_a_long_non_streamed_synthesis(tmp_path, models_dir):
    p = start(tmp_path, models_dir, watchdog_usec=600_000)
    try:
        text = " ".join(f"[slow] sentence {i}." for i in range(10))  # 10 x 0.3 s of worker time
        with TTSClient(p.tts, timeout=20) as t:
            t0 = time.monotonic()
            pcm, _rate = t.speak(text, stream=False)
            t1 = time.monotonic()
            assert pcm and t1 - t0 > 2.5
            assert t.describe()["daemon"]["healthy"] is True
        assert gaps(p.notify.times("WATCHDOG=1"), t0, t1) < 0.8
    finally:
        p.stop()


# 5 --------------------------------------------------------------------------------------------


def test_cancelled_synthesis_counts_until_its_work_has_left_the_worker(tmp_path, models_dir):
    p = start(tmp_path, models_dir, limits={"max_tts_queue": 4})
    try:
        ctx = zmq.Context.instance()
        s = raw(ctx, p.tts)
        text = "[slow] one. two. three."  # 0.9 s of worker time each
        for i in range(20):
            s.send_multipart([b""] + P.Synthesize(request_id=f"j{i}", text=text, stream=False).encode())
            s.send_multipart([b""] + P.Cancel(request_id=f"j{i}").encode())
        drain(s, 0.3)
        s.close()
        with TTSClient(p.tts, timeout=10) as t:
            assert t.describe()["queues"]["tts_requests"] <= 4
            t0 = time.monotonic()
            t.speak("hello.")
            assert time.monotonic() - t0 < 3.0, "work of cancelled requests is still queued on the worker"
    finally:
        p.stop()


# 6 --------------------------------------------------------------------------------------------


def test_a_sessions_command_queue_is_bounded(tmp_path, models_dir):
    p = start(tmp_path, models_dir)
    try:
        ctx = zmq.Context.instance()
        s = raw(ctx, p.asr)
        s.send_multipart([b""] + P.Open(session_id="q", request_id="o", hotwords=("fake:delay=3.0",)).encode())
        assert isinstance(recv_reply(s), P.Opened)
        s.send_multipart([b""] + P.Audio(session_id="q", seq=0, pcm=b"\0\0" * 160).encode())
        for i in range(10000):
            s.send_multipart([b""] + P.Reset(session_id="q", request_id=f"r{i}").encode())
            s.send_multipart([b""] + P.Audio(session_id="q", seq=i + 1, pcm=b"").encode())
        busy = 0
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and s.poll(300):
            m = P.decode_reply(P.split_dealer(s.recv_multipart()))
            busy += isinstance(m, P.Error) and m.code == ErrorCode.BUSY.value
        with ASRClient(p.asr, timeout=5) as c:
            info = c.describe()
        sess = [x for x in info["sessions"] if x["session_id"] == "q"][0]
        assert sess["queued"] <= MAX_QUEUED_COMMANDS, sess
        # Each refusal is counted; the flooder gets `busy` replies up to its error budget.
        assert info["counters"]["busy"] > 10000 and busy > 100, (info["counters"], busy)
        s.close()
    finally:
        p.stop()


# 7 --------------------------------------------------------------------------------------------


def test_tts_audio_at_the_high_water_mark_is_delivered_or_ends_in_an_error(tmp_path, models_dir):
    p = start(tmp_path, models_dir, daemon={"hwm": 2})
    try:
        ctx = zmq.Context.instance()
        s = raw(ctx, p.tts, rcvhwm=1)
        text = " ".join(f"sentence number {i:02d} of a long reply that does go on." for i in range(30))
        s.send_multipart([b""] + P.Synthesize(request_id="big", text=text).encode())
        time.sleep(2.0)  # not reading: the daemon's sends meet the high-water mark
        got = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and s.poll(5000):
            m = P.decode_reply(P.split_dealer(s.recv_multipart()))
            got.append(m)
            if isinstance(m, (P.Done, P.Error)):
                break
        s.close()
        assert got and isinstance(got[-1], (P.Done, P.Error)), "the client never hears how the request ended"
        seqs = [m.seq for m in got if isinstance(m, P.SynthAudio)]
        assert seqs == list(range(len(seqs)))
        if isinstance(got[-1], P.Done):
            assert got[-1].chunks == len(seqs)
        warnings = [l for l in p.log().splitlines() if "high-water" in l]
        assert len(warnings) <= 3, warnings
    finally:
        p.stop()


# 8 --------------------------------------------------------------------------------------------


def _partials(endpoint: str) -> int:
    with ASRClient(endpoint, timeout=10) as c:
        st = c.open(partials=True)
        tone = (b"\x00\x40" * 1600)  # 0.1 s of loud square-ish PCM
        for _ in range(30):  # 3 s of speech
            st.send(tone)
        evs = st.finalize()
    return len([e for e in evs if isinstance(e, P.Partial)])


def test_sighup_hands_reloaded_values_to_the_engine_and_says_what_changed(tmp_path, models_dir):
    p = start(tmp_path, models_dir, asr={"partial_interval": 0.5})
    try:
        before = _partials(p.asr)
        cfg = json.loads(json.dumps(p.config))
        cfg["asr"]["partial_interval"] = 1.5
        p.write_config(cfg)
        mark = time.monotonic()
        p.signal(signal.SIGHUP)
        assert p.notify.wait_for("STATUS=reloaded", 5, after=mark) is not None
        line = [l for t, l in p.notify.lines if t >= mark and l.startswith("STATUS=reloaded")][0]
        assert "asr.partial_interval 0.5 -> 1.5" in line, line
        after = _partials(p.asr)
        assert before >= 5 and after <= 2, (before, after)
    finally:
        p.stop()


def test_sighup_while_loading_models_does_not_kill_the_daemon(tmp_path, models_dir):
    cfg = {"models_root": str(models_dir)}
    p = DaemonProcess(tmp_path, cfg, env={"S2S_FAKE_LOAD_SECONDS": "2.0"})
    try:
        assert p.notify.wait_for("STATUS=loading", 10) is not None
        time.sleep(0.3)
        p.signal(signal.SIGHUP)
        p.wait_ready(20)
        with ASRClient(p.asr, timeout=5) as c:
            c.ping()
        assert p.proc.poll() is None
    finally:
        p.stop()


# supervision ----------------------------------------------------------------------------------


def test_a_dead_engine_worker_makes_the_daemon_exit_non_zero(tmp_path, models_dir):
    p = start(tmp_path, models_dir, watchdog_usec=600_000)
    try:
        with ASRClient(p.asr, timeout=5) as c:
            st = c.open(hotwords=["fake:die"])
            st.send(b"\0\0" * 1600)
            died = time.monotonic()
            rc = p.proc.wait(10)
        assert rc == 1, p.log()[-2000:]
        assert not [t for t in p.notify.times("WATCHDOG=1") if t > died + 0.5]
        assert "engine worker is gone" in p.log()
    finally:
        p.stop()
