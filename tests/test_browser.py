"""The real page in headless Debian Chromium (driven by Python playwright, never
`playwright install`) on a fresh machine's engines: FunASR and MeloTTS are configured but
their weights are absent, so the real daemon falls back to the bundled Whisper base and the
English-only Piper voice. The fake microphone plays a Mandarin WAV through the page's
AudioWorklet; the bridge is real; the agent is a FAKE LangGraph server (or the built-in echo).

Flows: a spoken Mandarin turn (listening → recognising → transcript → reply → playing, the
fallbacks named, the Chinese half of the reply marked unspoken), typed Mandarin with the
English voice (not spoken / partly spoken on the bubble, the typed-turn latency label),
hotwords on an engine without them, and the server stopping. Screenshots go to the folder
the first test prints; an axe-core audit runs on the page as a user sees it.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from bridge_procs import start_bridge, start_daemon, write_config
from fake_langgraph import FakeAgentServer
from helpers.browser import (DESKTOP, FIXTURES, PHONE, announce, artifacts_dir, axe_serious, launch, mic_wav,
                             need_browser, new_page, page_errors)

REPLY_ZH = "好的，我会提醒你。"
REPLY_EN = "Sure, I will remind you."
REPLY = REPLY_ZH + REPLY_EN


@pytest.fixture(scope="module")
def shots(pytestconfig):
    d = artifacts_dir("browser")
    announce(pytestconfig, f"[browser] screenshots: {d}")
    return d


@pytest.fixture(scope="module")
def stack(tmp_path_factory, models_dir):
    need_browser()
    d = tmp_path_factory.mktemp("browser")
    agent = FakeAgentServer(script=[REPLY], token_delay=0.05).start()
    cfg = write_config(d / "s2s.yaml", models_dir, d / "run", asr="funasr", tts="melo",
                       agent={"kind": "langgraph", "url": agent.url, "timeout": 10.0})
    # A fresh machine: FunASR and MeloTTS weights absent, the bundled fallbacks present.
    data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    data["asr"]["fallback_engine"] = "whisper"
    data["tts"]["fallback_engine"] = "piper"
    cfg.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    daemon = start_daemon(cfg, d / "daemon.log", timeout=240)
    bridge = start_bridge(cfg, d / "bridge.log")
    yield d, bridge, agent, cfg
    bridge.stop()
    daemon.stop()
    agent.stop()


@pytest.fixture(scope="module")
def browser(stack):
    from playwright.sync_api import sync_playwright

    # One utterance, then silence long enough for the reply before Chromium loops the file.
    wav = mic_wav(stack[0] / "mic.wav", FIXTURES / "zh" / "01.wav", lead=0.5, tail=12.0)
    with sync_playwright() as p:
        b = launch(p, wav)
        yield b
        b.close()


def _open(browser, url, viewport=DESKTOP):
    page = new_page(browser, viewport)
    page.goto(url, wait_until="load")
    page.wait_for_function("window.s2sStats && window.s2sStats.connected", timeout=10000)
    page.wait_for_function("window.s2sStats.health !== undefined", timeout=10000)
    return page


def test_spoken_mandarin_turn_on_the_fallback_engines(stack, browser, shots):
    _, bridge, agent, _ = stack
    page = _open(browser, bridge.http + "/")
    try:
        banner = page.inner_text("#banner")
        page.click("#talk")
        page.wait_for_function("window.s2sStats.ready", timeout=15000)
        page.wait_for_selector("#log li.user.placeholder", timeout=20000)
        page.wait_for_function("window.s2sStats.states.includes('recognising')", timeout=20000)
        page.screenshot(path=str(shots / "recognising-desktop.png"), full_page=True)
        page.wait_for_function("window.s2sStats.finals.some(t => t.length > 0)", timeout=60000)
        page.wait_for_function("window.s2sStats.audioBytesReceived > 24000 * 2 * 0.5", timeout=45000)
        page.wait_for_function(f"window.s2sStats.replies.includes({json.dumps(REPLY)})", timeout=20000)
        page.wait_for_selector("#log li.agent[data-spoken]", timeout=20000)
        page.screenshot(path=str(shots / "spoken-turn-desktop.png"), full_page=True)
        page.click("#talk")
        stats = page.evaluate("window.s2sStats")
        user_lines = page.locator("#log li.user").all_inner_texts()
        agent_li = page.locator("#log li.agent").first
        agent_text = agent_li.inner_text()
        spoken = agent_li.get_attribute("data-spoken")
        recv = page.inner_text("#recv")
        lat_tts, lat_asr, lat_text = page.inner_text("#lat-tts"), page.inner_text("#lat-asr"), page.inner_text("#lat-text")
        errors = page_errors(page)
    finally:
        page.close()
    # the banner names each fallback, Chinese first, with what it means
    assert "识别：Whisper（后备，原为 FunASR）" in banner and "合成：Piper（后备，原为 MeloTTS）" in banner, banner
    assert "Recognition: Whisper (fallback" in banner, banner
    states = [s for s in stats["states"] if s in ("listening", "speaking", "recognising", "thinking", "playing")]
    for a, b in (("listening", "recognising"), ("recognising", "thinking"), ("thinking", "playing")):
        assert states.index(a) < states.index(b), states
    assert stats["audioBytesSent"] > 16000 * 2 * 2, stats["audioBytesSent"]
    text = next(t for t in stats["finals"] if t)
    # Whisper base on the reference sentence 提醒我晚上八点给阳台的花浇水。
    assert sum(ch in text for ch in "提醒我晚上八点给阳台的花浇水") >= 7, text
    assert any(text in line for line in user_lines), user_lines
    assert agent.runs and agent.runs[0].user_text == text
    # the English voice said the English sentence; the Chinese one is marked on the bubble
    assert spoken == "partly" and "部分未朗读" in agent_text and "不会说中文" in agent_text, agent_text
    assert float(recv.split()[0]) > 0.5, recv
    assert lat_tts.endswith("ms") and lat_asr.endswith("ms") and lat_text == "–", (lat_tts, lat_asr, lat_text)
    assert not [e for e in stats["errors"] if e["source"] != "tts"], stats["errors"]
    assert not errors, errors


def test_typed_mandarin_with_the_english_voice(stack, browser, shots, tmp_path):
    """Echo agent: a Chinese-only reply is not spoken, a mixed one only partly; both say so on
    their bubbles for good; typed turns have their own latency label; axe finds nothing serious."""
    _, _, _, cfg = stack
    b = start_bridge(cfg, tmp_path / "bridge-echo.log", agent="echo")
    page = _open(browser, b.http + "/")
    try:
        page.wait_for_selector("#banner", state="visible", timeout=10000)
        banner = page.inner_text("#banner")
        page.fill("#textinput", "今天天气怎么样")
        page.press("#textinput", "Enter")
        page.wait_for_selector("#log li.agent[data-spoken='none']", timeout=30000)
        page.fill("#textinput", "提醒我明天早上8点开会")
        page.press("#textinput", "Enter")
        page.wait_for_function("document.querySelectorAll('#log li.agent[data-spoken]').length >= 2", timeout=30000)
        page.wait_for_timeout(16000)  # the marks outlast the old 15 s error boxes
        bubbles = page.locator("#log li.agent").all_inner_texts()
        marks = [page.locator("#log li.agent").nth(i).get_attribute("data-spoken") for i in range(len(bubbles))]
        status_line = page.locator("#errors").is_visible()
        lat_text, lat_tts = page.inner_text("#lat-text"), page.inner_text("#lat-tts")
        hint = page.inner_text("#language-hint")
        page.screenshot(path=str(shots / "typed-mandarin-desktop.png"), full_page=True)
        violations = axe_serious(page)
        page.set_viewport_size(PHONE)
        page.wait_for_timeout(200)
        page.screenshot(path=str(shots / "typed-mandarin-phone.png"))
        violations_phone = axe_serious(page)
        errors = page_errors(page)
    finally:
        page.close()
        b.stop()
    assert "回声" in banner and banner.index("配置的智能助手") < banner.index("The configured assistant"), banner
    assert marks == ["none", "partly"], (marks, bubbles)
    assert "未朗读" in bubbles[0] and "不会说中文" in bubbles[0], bubbles
    # the refused reply was over when the next was typed: not interrupted (its TTS task had hung on)
    assert "已打断" not in bubbles[0], bubbles
    assert "部分未朗读" in bubbles[1], bubbles
    # the tts errors sit on their bubbles, not in the status line
    assert not status_line
    assert "文字 → 首个语音" in bubbles[1] and lat_text.endswith("ms") and lat_tts == "–", (bubbles, lat_text, lat_tts)
    assert "不会说中文" in hint, hint  # learnt from the voice's refusal
    assert not violations, json.dumps(violations, ensure_ascii=False, indent=1)
    assert not violations_phone, json.dumps(violations_phone, ensure_ascii=False, indent=1)
    assert not errors, errors


def test_hotwords_on_an_engine_without_them(stack, browser, shots):
    """Whisper cannot use hotwords: the field is disabled with the reason before anything is
    said, and no session is refused. Without the capability in /healthz (an older bridge), the
    page opens the session without them and disables the field when `ready` says no."""
    _, bridge, _, _ = stack
    page = _open(browser, bridge.http + "/")
    try:
        disabled = page.is_disabled("#hotwords")
        hint = page.inner_text("#hotwords-hint")
        page.click("#talk")
        page.wait_for_function("window.s2sStats.ready", timeout=15000)
        page.click("#talk")
        first = page.evaluate("window.s2sStats")
    finally:
        page.close()
    assert disabled and "Whisper" in hint and "不支持热词" in hint, hint
    assert first["starts"] == [{"language": "zh", "hotwords": []}], first["starts"]
    assert not [e for e in first["errors"] if e["code"] == "unsupported"], first["errors"]

    page = new_page(browser)

    def healthz_without_caps(route):
        h = json.loads(route.fetch().text())
        for e in (h.get("daemon", {}).get("engines") or {}).values():
            e.pop("hotwords", None)
        route.fulfill(json=h)

    page.route("**/healthz", healthz_without_caps)
    try:
        page.goto(bridge.http + "/", wait_until="load")
        page.wait_for_function("window.s2sStats.connected && window.s2sStats.health !== undefined", timeout=10000)
        assert page.is_enabled("#hotwords")
        page.fill("#hotwords", "阳台, 浇水")
        page.click("#talk")
        page.wait_for_function("window.s2sStats.ready", timeout=15000)
        page.wait_for_function("document.getElementById('hotwords').disabled", timeout=5000)
        page.screenshot(path=str(shots / "hotwords-unsupported-desktop.png"), full_page=True)
        page.click("#talk")
        second = page.evaluate("window.s2sStats")
        hint = page.inner_text("#hotwords-hint")
    finally:
        page.close()
    assert second["starts"] == [{"language": "zh", "hotwords": []}], second["starts"]
    assert not [e for e in second["errors"] if e["code"] == "unsupported"], second["errors"]
    assert "不支持热词" in hint, hint


def test_server_stopped_disables_talk_and_shows_reconnect(stack, browser, shots, tmp_path):
    _, _, _, cfg = stack
    b = start_bridge(cfg, tmp_path / "bridge-stop.log", agent="echo")
    page = _open(browser, b.http + "/")
    try:
        assert page.is_enabled("#talk")
        b.stop()
        page.wait_for_function("document.getElementById('talk').disabled", timeout=10000)
        page.wait_for_function("window.s2sStats.reconnects >= 2", timeout=15000)
        conn = page.inner_text("#conn")
        got = page.evaluate("""() => ({send: document.getElementById('send').disabled,
            text: document.getElementById('textinput').disabled,
            reconnect: !document.getElementById('reconnect').hidden,
            hint: document.getElementById('talk-hint').textContent,
            state: document.getElementById('turnstate').dataset.state,
            pressed: document.getElementById('talk').getAttribute('aria-pressed')})""")
        page.screenshot(path=str(shots / "server-stopped-desktop.png"), full_page=True)
        page.set_viewport_size(PHONE)
        page.wait_for_timeout(200)
        page.screenshot(path=str(shots / "server-stopped-phone.png"))
    finally:
        page.close()
    assert re.search(r"已断开 · \d+ 秒后重连（第 \d+ 次）|正在重连（第 \d+ 次）", conn), conn
    assert got == {"send": True, "text": True, "reconnect": True, "hint": "未连接到语音服务，暂时不能说话或发送文字。",
                   "state": "offline", "pressed": "false"}, got
