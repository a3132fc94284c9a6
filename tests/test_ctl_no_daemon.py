"""s2s-ctl against a daemon that is not running answers at once and says why (a missing ipc://
socket file), instead of waiting its full timeout on each socket."""

from __future__ import annotations

import subprocess
import sys
import time

from daemon_harness import ROOT


def test_health_without_a_daemon_says_so_at_once(tmp_path):
    asr, tts = f"ipc://{tmp_path}/asr.sock", f"ipc://{tmp_path}/tts.sock"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "daemon.tools.ctl", "--asr", asr, "--tts", tts, "--timeout", "30", "health"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    assert took < 15, f"took {took:.1f} s: the 30 s timeout was waited out"
    for ep in (asr, tts):
        assert f"{ep}: unavailable: no daemon at {ep}" in r.stdout and "does not exist" in r.stdout, r.stdout
    assert "Traceback" not in r.stderr


def test_speak_without_a_daemon_says_so_at_once(tmp_path):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "daemon.tools.ctl", "--asr", f"ipc://{tmp_path}/a.sock", "--tts",
                        f"ipc://{tmp_path}/t.sock", "speak", "你好", "-o", str(tmp_path / "x.wav")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "does not exist" in r.stderr, r.stdout + r.stderr
    assert time.monotonic() - t0 < 15
