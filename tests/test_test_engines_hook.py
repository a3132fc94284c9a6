"""S2S_TEST_ENGINES is a test hook: the daemon loads fake engines from it only when it names a
file inside this checkout's tests/ directory. Any other file named there (a production
process's environment is not a place to execute code from) stops startup with one clear line,
and the file is never executed."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from daemon_harness import ROOT


def run_daemon(tmp_path, hook: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "s2s.yaml"
    cfg.write_text(yaml.safe_dump({"daemon": {"runtime_dir": str(tmp_path / "run")}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASR_", "TTS_", "NOTIFY_", "WATCHDOG_"))}
    env["S2S_TEST_ENGINES"] = hook
    return subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_file_outside_tests_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('pwned')\n"
                    "def build_asr(cfg):\n    raise SystemExit(3)\n")
    for hook in (str(evil), os.path.relpath(evil, ROOT), "os"):
        r = run_daemon(tmp_path, hook)
        assert r.returncode == 1, (hook, r.stdout, r.stderr)
        assert "test engines may only come from" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not marker.exists(), hook


def test_the_checkout_fakes_still_load(tmp_path):
    from daemon.serving.factory import TESTS_DIR, test_engines_module

    assert test_engines_module({}) == ""
    assert test_engines_module({"S2S_TEST_ENGINES": str(ROOT / "tests" / "fake_engines.py")}) == \
        str(TESTS_DIR / "fake_engines.py")
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        assert test_engines_module({"S2S_TEST_ENGINES": "tests.fake_engines"}) == str(TESTS_DIR / "fake_engines.py")
    finally:
        os.chdir(cwd)
