"""Beyond one daemon (issue 29), the daemon's part: a daemon that is stopping (SIGTERM) refuses
new ASR sessions and syntheses with `shutting_down` and a `retry_after` while it drains what it
has, so a front end with another daemon places them there and a rolling restart costs no new
session. Real processes: `python -m daemon` on the FAKE engines (tests/fake_engines.py: this is
about the lifecycle, not speech)."""

from __future__ import annotations

import signal
import time

import zmq

from daemon.wire import protocol as P
from daemon_harness import DaemonProcess
from helpers.zmq_raw import raw, recv_reply


def test_a_stopping_daemon_refuses_new_work_with_retry_after_while_it_drains(tmp_path, models_dir):
    p = DaemonProcess(tmp_path, {"models_root": str(models_dir), "daemon": {"drain_timeout": 3.0}},
                      watchdog_usec=10_000_000)
    ctx = zmq.Context()
    try:
        p.wait_ready(60)
        tts, asr = raw(ctx, p.tts), raw(ctx, p.asr)
        # In flight: eight slow sentences (0.3 s each) keep the daemon draining for ~2.4 s.
        tts.send_multipart(P.dealer_frames(P.Synthesize(request_id="long", text="[slow]一。" * 8)))
        first = recv_reply(tts, 5)
        assert isinstance(first, P.SynthAudio), first
        p.signal(signal.SIGTERM)
        time.sleep(0.3)
        asr.send_multipart(P.dealer_frames(P.Open(session_id="late", request_id="o1")))
        refused = recv_reply(asr, 2)
        assert isinstance(refused, P.Error) and refused.code == "shutting_down", refused
        assert refused.retry_after == 3.0, refused
        tts.send_multipart(P.dealer_frames(P.Synthesize(request_id="late", text="晚了。")))
        late = None
        done = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (late is None or done is None):
            m = recv_reply(tts, 5)
            if isinstance(m, P.Error) and m.request_id == "late":
                late = m
            elif isinstance(m, P.Done) and m.request_id == "long":
                done = m
        assert late is not None and late.code == "shutting_down" and late.retry_after == 3.0, late
        assert done is not None, "the synthesis in flight was not finished while draining"
        assert p.proc.wait(10) == 0
    finally:
        ctx.destroy(linger=0)
        p.stop()
