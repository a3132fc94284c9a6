"""The newcomer test: the README's first command exactly as a new user runs it.

The repository is cloned into a temporary directory and `scripts/start-s2s.sh` runs there in a
terminal (a real pty), with every S2S_*, ASR_*, TTS_* and CUDA_* variable scrubbed: the default
config asks for FunASR + MeloTTS on cuda:1, and this GPU-less machine without those weights must
fall back, say so, and serve. The only thing reused is the installed venv (S2S_VENV), so the
test does not reinstall torch; the clone's own code runs (the script puts the checkout first).

Checked: the page and /healthz answer and name every fallback; `s2s-ctl health` exits 0 and
prints them; one spoken round trip through the websocket (speech in, a final, reply audio out);
Ctrl-C in the terminal stops both processes cleanly; a second start reuses everything and is up
in under 60 s; SIGTERM stops it cleanly too.

The clone is of the committed tree (HEAD): uncommitted changes are not part of what a newcomer
gets, so they are not tested here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRUB_PREFIXES = ("S2S_", "ASR_", "TTS_", "CUDA_")
# The test harness's network guard (tests/offline) is not user configuration: it stays on.
KEEP = ("S2S_OFFLINE_GUARD", "S2S_OFFLINE_LOG")
START_DEADLINE = 420.0     # first start: the clone assembles its bundled models
SECOND_START_LIMIT = 60.0  # the bar for a start that reuses everything


def newcomer_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k in KEEP or not k.startswith(SCRUB_PREFIXES)}
    for k in ("NOTIFY_SOCKET", "RUNTIME_DIRECTORY", "WATCHDOG_USEC", "WATCHDOG_PID", "VIRTUAL_ENV"):
        env.pop(k, None)
    # conftest puts this checkout on PYTHONPATH; a newcomer has only the guard (tests/offline) there.
    env["PYTHONPATH"] = str(ROOT / "tests" / "offline")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix))
    env["S2S_VENV"] = sys.prefix  # the one thing reused: the installed venv
    env["TERM"] = "xterm"
    return env


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the bridge binds: TIME_WAIT is fine
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def http(url: str, timeout: float = 5.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Terminal:
    """`bash scripts/start-s2s.sh` on a pty that is its controlling terminal, as in a shell:
    writing ^C to the master sends SIGINT to the whole foreground process group."""

    def __init__(self, cwd: Path, env: dict, log: Path):
        self.cwd = Path(cwd)
        self.log_path = log
        self.master, slave = os.openpty()

        def own_terminal() -> None:  # runs in the child, after setsid (start_new_session)
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            # As an interactive shell starts a command: ^C and ^\ at their defaults, whatever the
            # test runner inherited (a job started with & by a non-interactive shell ignores both,
            # and bash cannot trap a signal ignored when it starts).
            for sig in (signal.SIGINT, signal.SIGQUIT):
                signal.signal(sig, signal.SIG_DFL)

        self.proc = subprocess.Popen(["bash", "scripts/start-s2s.sh"], cwd=cwd, env=env, stdin=slave,
                                     stdout=slave, stderr=slave, start_new_session=True,
                                     preexec_fn=own_terminal)
        os.close(slave)
        self._out = open(log, "ab")
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self._out.write(data)
            self._out.flush()

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        # What the script started in sessions of their own (setsid) outlives its group: a test that
        # failed before the script stopped them must not leave them on the default ports.
        for pid in children(self.cwd):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait(10)
        try:
            os.close(self.master)
        except OSError:
            pass


def wait_for_page(term: Terminal, base: str, deadline_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if term.proc.poll() is not None:
            pytest.fail(f"start-s2s.sh exited with {term.proc.returncode} before serving:\n{term.text()[-5000:]}")
        try:
            status, _ = http(base + "/healthz", timeout=2)
            if status == 200:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.5)
    term.kill()
    pytest.fail(f"start-s2s.sh did not serve /healthz within {deadline_s:.0f} s:\n{term.text()[-5000:]}")


def children(clone: Path) -> list:
    """Processes started from the clone (their command line or cwd is in it)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(d / "cwd")
        except OSError:
            continue
        if any(f"s2s-{x}" in cmd for x in ("speechd", "bridge", "wyoming", "openai")) and cwd.startswith(str(clone)):
            found.append(int(d.name))
    return found


def describe(pids: list) -> list:
    out = []
    for pid in pids:
        try:
            out.append((pid, Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")))
        except OSError:
            pass
    return out


@pytest.fixture(scope="module")
def clone(tmp_path_factory, models_dir):
    dest = tmp_path_factory.mktemp("newcomer") / "s2s"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True, timeout=120)
    # What `s2s-models bundled` fetches from the registries (npm kokoro-js, PyPI's pipecat-ai wheel)
    # was fetched and checked by scripts/test.sh's own `bundled`: the clone gets that download cache,
    # so its first start assembles the same models offline (the offline guard fails any test whose
    # processes reach past loopback, and this one is about the start, not the registries).
    cache = models_dir / ".cache"
    if cache.is_dir():
        shutil.copytree(cache, dest / ".models" / ".cache", ignore=shutil.ignore_patterns("tmp*"))
    # The clone reuses this venv (S2S_VENV). If its install stamp does not match the clone's pins,
    # install.sh would reinstall into the shared venv and point its editable install at the
    # (temporary) clone: refuse instead. In CI the clone is this checkout's HEAD, so they match.
    stamp = Path(sys.prefix) / ".s2s-installed"
    want = hashlib.sha256(b"".join((dest / f).read_bytes() for f in
                                   ("requirements-speech.txt", "requirements-nodeps.txt", "setup.cfg"))).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != want:
        pytest.fail(f"the venv {sys.prefix} was installed from other requirement files than the committed ones "
                    f"(HEAD); run scripts/install.sh on a committed tree first")
    cfg = yaml.safe_load((dest / "etc" / "s2s.yaml").read_text())
    port = int(cfg["bridge"]["port"])
    if not port_free(port):
        pytest.fail(f"the default bridge port {port} is in use on this machine: the README's command cannot "
                    f"serve its page here (stop what listens there)")
    return {"dir": dest, "port": port, "base": f"http://127.0.0.1:{port}"}


@pytest.fixture(scope="module")
def first_start(clone):
    term = Terminal(clone["dir"], newcomer_env(), clone["dir"].parent / "start-1.log")
    try:
        took = wait_for_page(term, clone["base"], START_DEADLINE)
        yield {"term": term, "took": took, **clone}
    finally:
        term.kill()


def test_page_and_healthz_name_the_fallbacks(first_start):
    status, body = http(first_start["base"] + "/")
    assert status == 200 and b"<html" in body.lower()
    status, body = http(first_start["base"] + "/healthz")
    h = json.loads(body)
    assert status == 200, h
    assert h["daemon"]["reachable"] and h["agent"]["echo_fallback"] is True  # nothing on :8000 here
    fbs = {(f["component"], f["from"], f["to"]) for f in h["daemon"]["fallbacks"]}
    assert ("asr.engine", "funasr", "whisper") in fbs, fbs
    assert ("tts.engine", "melo", "kokoro+piper") in fbs, fbs  # the bundled Mandarin voice
    assert h["daemon"]["engines"]["tts"]["engine"] == "kokoro+piper"
    assert "zh" in h["daemon"]["engines"]["tts"]["languages"]
    # the default config asks for cuda:1; this machine has no GPU
    assert ("asr.device", "cuda:1", "cpu") in fbs and ("tts.device", "cuda:1", "cpu") in fbs, fbs
    assert h["daemon"]["engines"]["asr"]["engine"] == "whisper"


def test_s2s_ctl_health_exits_0_and_prints_every_fallback(first_start):
    venv_bin = Path(sys.prefix) / "bin"
    env = newcomer_env()
    env["PYTHONPATH"] = f"{first_start['dir']}{os.pathsep}{env['PYTHONPATH']}"
    env["RUNTIME_DIRECTORY"] = str(first_start["dir"] / ".run")
    r = subprocess.run([str(venv_bin / "s2s-ctl"), "--config", str(first_start["dir"] / "etc" / "s2s.yaml"),
                        "health"], cwd=first_start["dir"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    for line in ("fallback asr.engine: funasr -> whisper", "fallback tts.engine: melo -> ",
                 "fallback asr.device: cuda:1 -> cpu", "fallback tts.device: cuda:1 -> cpu"):
        assert line in r.stdout, r.stdout


def test_the_printed_s2s_ctl_line_reaches_this_daemon(first_start):
    """The start script says how to reach its daemon from another terminal (its runtime directory
    is not /run/s2s); the line works as printed, in a shell with nothing else set."""
    lines = [l for l in first_start["term"].text().splitlines() if "this daemon from another terminal:" in l]
    assert lines, first_start["term"].text()[-3000:]
    command = lines[-1].split("this daemon from another terminal:", 1)[1].strip()
    env = newcomer_env()
    env["PYTHONPATH"] = f"{first_start['dir']}{os.pathsep}{env['PYTHONPATH']}"
    env.pop("RUNTIME_DIRECTORY", None)
    r = subprocess.run(["bash", "-c", command], cwd="/", env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "engine=kokoro+piper" in r.stdout, (command, r.stdout + r.stderr)


def test_one_spoken_round_trip_in_mandarin(first_start, fixtures_dir):
    """A Mandarin sentence in, its transcript, and the reply spoken back (the bundled Mandarin voice)."""
    from websockets.sync.client import connect

    from daemon.audio import float_to_pcm16, read_wav

    x, _sr = read_wav(fixtures_dir / "zh" / "01.wav")  # 提醒我晚上八点给阳台的花浇水。
    pcm = float_to_pcm16(x)
    events, audio = [], 0
    with connect(f"ws://127.0.0.1:{first_start['port']}/ws", origin=first_start["base"], open_timeout=10) as ws:
        ws.send(json.dumps({"type": "start", "language": "zh"}))
        for i in range(0, len(pcm), 3200):
            ws.send(pcm[i:i + 3200])
        ws.send(b"\0\0" * 16000)  # 1 s of silence ends the utterance
        ws.send(json.dumps({"type": "stop"}))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            msg = ws.recv(timeout=deadline - time.monotonic())
            if isinstance(msg, bytes):
                audio += len(msg)
                continue
            ev = json.loads(msg)
            events.append(ev)
            if ev["type"] == "error":
                pytest.fail(f"error event: {ev}")
            if ev["type"] == "tts_end" and audio > 2 * 24000 * 1.0:  # (a first piece may be a short clause)
                break
    finals = [e for e in events if e["type"] == "final" and e.get("text")]
    cjk = lambda s: any("\u4e00" <= ch <= "\u9fff" for ch in s)  # noqa: E731
    assert finals and cjk(finals[0]["text"]), events
    spoken = [e["text"] for e in events if e["type"] == "tts_start"]
    assert spoken and any(cjk(t) for t in spoken), events  # the echo agent's Chinese reply was spoken
    assert not [e for e in events if e["type"] == "error"], events
    assert audio > 2 * 24000 * 1.0, events  # over a second of 24 kHz PCM16 reply audio


def test_ctrl_c_in_the_terminal_stops_everything_cleanly(first_start):
    term, clone_dir = first_start["term"], first_start["dir"]
    assert len(children(clone_dir)) >= 2, (describe(children(clone_dir)), term.text()[-3000:])  # daemon and bridge
    term.ctrl_c()
    rc = term.wait(60)
    log = term.text()
    assert rc == 0, log[-3000:]
    assert "stopped cleanly" in log and "exited with status" not in log, log[-3000:]
    deadline = time.monotonic() + 10
    while children(clone_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert children(clone_dir) == [], (describe(children(clone_dir)), log[-3000:])
    assert list((clone_dir / ".run").glob("*.sock")) == [], log[-3000:]


def test_second_start_reuses_everything_then_sigterm(first_start):
    clone_dir = first_start["dir"]
    assert first_start["term"].proc.poll() is not None, "the first start must be stopped first"
    term = Terminal(clone_dir, newcomer_env(), clone_dir.parent / "start-2.log")
    try:
        took = wait_for_page(term, first_start["base"], START_DEADLINE)
        log = term.text()
        assert "up to date" in log, log[-3000:]  # no reinstall
        assert took < SECOND_START_LIMIT, f"second start took {took:.1f} s:\n{log[-3000:]}"
        os.kill(term.proc.pid, signal.SIGTERM)
        rc = term.wait(60)
        log = term.text()
        assert rc == 0 and "stopped cleanly" in log, log[-3000:]
        deadline = time.monotonic() + 10
        while children(clone_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert children(clone_dir) == [], (describe(children(clone_dir)), log[-3000:])
    finally:
        term.kill()
