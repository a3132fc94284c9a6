"""The real page in headless Debian Chromium (driven by Python playwright, never
`playwright install`): the fake microphone plays a Mandarin WAV, the page streams it through
its AudioWorklet as 16 kHz PCM16, shows the transcript and the agent's reply, and receives the
reply audio. Real daemon (Whisper base + Piper), real bridge, FAKE agent server.

Chromium comes from Debian's `chromium` package (.ci/run installs it). Without it the test
fails under CI (CI=true) and is skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import wave
from pathlib import Path

import pytest

from bridge_procs import start_bridge, start_daemon, write_config
from fake_langgraph import FakeAgentServer

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
REPLY = "Sure, I will remind you. Anything else?"


def _need_browser():
    if CHROMIUM is None:
        msg = "Debian chromium is not installed (apt-get install chromium); .ci/run installs it"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the playwright package is missing (requirements-speech.txt pins it)")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, models_dir):
    _need_browser()
    d = tmp_path_factory.mktemp("browser")
    agent = FakeAgentServer(script=[REPLY], token_delay=0.05).start()
    cfg = write_config(d / "s2s.yaml", models_dir, d / "run", asr="whisper", tts="piper",
                       agent={"kind": "langgraph", "url": agent.url, "timeout": 10.0})
    daemon = start_daemon(cfg, d / "daemon.log", timeout=240)
    bridge = start_bridge(cfg, d / "bridge.log")
    yield d, bridge, agent, cfg
    bridge.stop()
    daemon.stop()
    agent.stop()


@pytest.fixture(scope="module")
def browser(stack):
    from playwright.sync_api import sync_playwright

    d = stack[0]
    # One utterance, then silence long enough for the reply before Chromium loops the file.
    wav = d / "mic.wav"
    src = Path(__file__).parent / "fixtures" / "zh" / "01.wav"
    with wave.open(str(src)) as r:
        params, frames = r.getparams(), r.readframes(r.getnframes())
    with wave.open(str(wav), "wb") as w:
        w.setparams(params)
        w.writeframes(b"\0\0" * 8000 + frames + b"\0\0" * 16000 * 12)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            "--autoplay-policy=no-user-gesture-required"])
        yield b
        b.close()


def test_page_streams_speech_and_plays_the_reply(stack, browser):
    d, bridge, agent, _ = stack
    page = browser.new_page(bypass_csp=True)  # our CSP forbids the eval wait_for_function uses
    logs = []
    page.on("console", lambda m: logs.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: logs.append(f"pageerror: {e}"))
    try:
        page.goto(bridge.http + "/", wait_until="load")
        page.wait_for_function("window.s2sStats && window.s2sStats.connected", timeout=10000)
        page.click("#talk")
        page.wait_for_function("window.s2sStats.ready", timeout=15000)
        # the transcript of the fake microphone's utterance
        page.wait_for_function("window.s2sStats.finals.some(t => t.length > 0)", timeout=45000)
        # the reply audio arrives and is scheduled
        page.wait_for_function("window.s2sStats.audioBytesReceived > 24000 * 2", timeout=45000)
        page.wait_for_function(f"window.s2sStats.replies.includes({json.dumps(REPLY)})", timeout=20000)
        stats = page.evaluate("window.s2sStats")
        page.screenshot(path=str(d / "page.png"), full_page=True)
        user_lines = page.locator("#log li.user").all_inner_texts()
        agent_lines = page.locator("#log li.agent").all_inner_texts()
        lat_tts = page.inner_text("#lat-tts")
        lat_asr = page.inner_text("#lat-asr")
    finally:
        page.close()
    assert stats["audioBytesSent"] > 16000 * 2 * 2, stats    # > 2 s of 16 kHz PCM16 went up
    assert stats["audioBytesReceived"] % 2 == 0 and stats["audioChunksReceived"] >= 1
    text = next(t for t in stats["finals"] if t)
    # Whisper base on the reference sentence 提醒我晚上八点给阳台的花浇水。
    assert sum(ch in text for ch in "提醒我晚上八点给阳台的花浇水") >= 7, text
    assert any(text in line for line in user_lines), user_lines
    assert any(REPLY in line for line in agent_lines), agent_lines
    assert agent.runs and agent.runs[0].user_text == text
    assert lat_tts.endswith("ms") and lat_asr.endswith("ms"), (lat_tts, lat_asr)
    assert not stats["errors"], (stats["errors"], logs)
    assert not [line for line in logs if line.startswith("pageerror")], logs


def test_page_shows_the_echo_fallback_and_typed_text(stack, browser, tmp_path):
    """Bridge started on --agent echo while langgraph is configured: the page says so; typing works."""
    d, _, _, cfg = stack
    b = start_bridge(cfg, tmp_path / "bridge-echo.log", agent="echo")
    page = browser.new_page(bypass_csp=True)  # our CSP forbids the eval wait_for_function uses
    try:
        page.goto(b.http + "/", wait_until="load")
        page.wait_for_function("window.s2sStats && window.s2sStats.connected", timeout=10000)
        notice = page.locator("#notice")
        notice.wait_for(state="visible", timeout=10000)
        assert "echo" in notice.inner_text()
        page.fill("#textinput", "hello there")
        page.click("#textform button")
        page.wait_for_function("window.s2sStats.replies.includes('You said: hello there')", timeout=20000)
        page.wait_for_function("window.s2sStats.audioBytesReceived > 0", timeout=20000)
        assert "You said: hello there" in page.locator("#log li.agent").all_inner_texts()
    finally:
        page.close()
        b.stop()
