"""scripts/start-s2s.sh, the README's first command, run for real on the bundled models:
the page and /healthz come up, a fixture streams through the websocket and gets a transcript
and reply audio, and Ctrl-C (SIGINT) stops both processes cleanly and removes the sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRUB = ("ASR_ENGINE", "TTS_ENGINE", "ASR_DEVICE", "TTS_DEVICE", "S2S_CONFIG", "S2S_MODELS", "S2S_TEST_ENGINES",
         "NOTIFY_SOCKET", "RUNTIME_DIRECTORY")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def procs_with_env(marker: str) -> list:
    """PIDs whose environment carries marker (our unique S2S_CONFIG path)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "environ").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def http(url: str, timeout: float = 5.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def started(tmp_path_factory, models_dir):
    tmp = tmp_path_factory.mktemp("start")
    port = free_port()
    data = yaml.safe_load((ROOT / "etc" / "s2s.yaml").read_text())
    data["daemon"]["runtime_dir"] = str(tmp / "run")
    data["bridge"]["port"] = port
    data["agent"]["url"] = f"http://127.0.0.1:{free_port()}"  # nothing listens: the echo fallback
    data["asr"]["ncpu"] = 1
    cfg = tmp / "s2s.yaml"
    cfg.write_text(yaml.safe_dump(data, allow_unicode=True))
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    # The bundled models only (no FunASR/MeloTTS weights): the default config falls back.
    bundled = tmp / "models"
    bundled.mkdir()
    for name in ("fsmn-vad", "whisper-base", "piper"):
        (bundled / name).symlink_to(models_dir / name)
    env.update(S2S_CONFIG=str(cfg), S2S_MODELS=str(bundled), ASR_DEVICE="cpu", TTS_DEVICE="cpu", PYTHONUNBUFFERED="1")
    log = open(tmp / "start.log", "wb")
    p = subprocess.Popen(["bash", str(ROOT / "scripts" / "start-s2s.sh")], cwd=ROOT, env=env,
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    status = None
    while time.monotonic() < deadline and p.poll() is None:
        try:
            status, body = http(base + "/healthz", timeout=2)
            if status == 200:
                break
        except OSError:
            pass
        time.sleep(1)
    text = lambda: (tmp / "start.log").read_text(errors="replace")  # noqa: E731
    if status != 200:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"start-s2s.sh did not bring up /healthz (status {status}):\n{text()[-4000:]}")
    yield {"proc": p, "port": port, "base": base, "cfg": cfg, "run": tmp / "run", "log": text}
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)


def test_page_and_health(started):
    status, body = http(started["base"] + "/")
    assert status == 200 and b"<html" in body.lower()
    status, body = http(started["base"] + "/healthz")
    h = json.loads(body)
    assert status == 200
    assert h["agent"]["echo_fallback"] is True
    assert "echo" in started["log"]()
    # the daemon fell back to the bundled models and said so
    assert "fallback" in started["log"]().lower()
    sockets = sorted(p.name for p in started["run"].iterdir())
    assert sockets == ["asr.sock", "tts.sock"]


def test_fixture_through_the_websocket(started, fixtures_dir):
    from websockets.sync.client import connect

    from daemon.audio import float_to_pcm16, read_wav

    # English: the bundled fallback voice (Piper en_US) speaks the echo agent's English reply
    x, sr = read_wav(fixtures_dir / "en" / "01.wav")
    pcm = float_to_pcm16(x)
    events, audio = [], 0
    with connect(f"ws://127.0.0.1:{started['port']}/ws", origin=started["base"], open_timeout=10) as ws:
        ws.send(json.dumps({"type": "start", "language": "en"}))
        step = 3200
        for i in range(0, len(pcm), step):
            ws.send(pcm[i:i + step])
        ws.send(b"\0\0" * 16000)  # 1 s of silence ends the utterance
        ws.send(json.dumps({"type": "stop"}))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = ws.recv(timeout=deadline - time.monotonic())
            if isinstance(msg, bytes):
                audio += len(msg)
                continue
            ev = json.loads(msg)
            events.append(ev)
            if ev["type"] == "error":
                pytest.fail(f"error event: {ev}")
            if ev["type"] == "tts_end" and audio:
                break
    finals = [e for e in events if e["type"] == "final" and e.get("text")]
    assert finals and "timer" in finals[0]["text"].lower(), events
    assert any(e["type"] == "agent_done" or e["type"] == "agent_delta" for e in events)
    assert audio > 24000  # over half a second of 24 kHz PCM16 reply audio


def test_sigint_stops_everything_cleanly(started):
    p = started["proc"]
    marker = str(started["cfg"])
    children = [pid for pid in procs_with_env(marker) if pid != p.pid]
    assert len(children) >= 2, children  # daemon and bridge (plus nothing else long-lived)
    os.kill(p.pid, signal.SIGINT)
    rc = p.wait(timeout=60)
    log = started["log"]()
    assert rc == 0, log[-3000:]
    assert "stopped cleanly" in log
    deadline = time.monotonic() + 5
    while procs_with_env(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert procs_with_env(marker) == []
    assert list(started["run"].glob("*.sock")) == []
