"""The page in headless Debian Chromium against a real bridge and a real daemon running the
FAKE engines (tests/fake_engines.py: energy endpointing, tone synthesis) and the built-in echo
agent: these tests are about the page (turn state, errors, accessibility, phone layout), not
about recognition or synthesis. Screenshots go to the folder the first test prints.
"""

from __future__ import annotations

import json
import re

import pytest

from bridge_procs import start_bridge, start_daemon, write_config
from helpers.browser import (DESKTOP, FIXTURES, PHONE, announce, artifacts_dir, axe_serious, launch, mic_wav,
                             need_browser, new_page, page_errors)

MAX_TEXT = 200


@pytest.fixture(scope="module")
def shots(pytestconfig):
    d = artifacts_dir("page-ui")
    announce(pytestconfig, f"[page-ui] screenshots: {d}")
    return d


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    need_browser()
    d = tmp_path_factory.mktemp("page-ui")
    # The configured agent is unreachable; the bridge runs on --agent echo (the echo fallback).
    cfg = write_config(d / "s2s.yaml", d / "models", d / "run",
                       agent={"kind": "langgraph", "url": "http://127.0.0.1:9", "timeout": 5.0},
                       limits={"max_asr_lag": 0.5, "max_session_lag": 1.0, "max_text_chars": MAX_TEXT})
    daemon = start_daemon(cfg, d / "daemon.log", fake_engines=True, timeout=60)
    bridge = start_bridge(cfg, d / "bridge.log", agent="echo")
    yield d, bridge
    bridge.stop()
    daemon.stop()


@pytest.fixture(scope="module")
def browser(stack):
    from playwright.sync_api import sync_playwright

    wav = mic_wav(stack[0] / "mic.wav", FIXTURES / "zh" / "01.wav", tail=8.0)
    with sync_playwright() as p:
        b = launch(p, wav)
        yield b
        b.close()


def _open(browser, bridge, viewport=DESKTOP, query=""):
    page = new_page(browser, viewport)
    page.s2s_bad = []
    page.on("response", lambda r: r.status >= 400 and page.s2s_bad.append(f"{r.status} {r.url}"))
    page.goto(bridge.http + "/" + query, wait_until="load")
    page.wait_for_function("window.s2sStats && window.s2sStats.connected", timeout=10000)
    page.wait_for_function("!document.getElementById('talk').disabled", timeout=5000)
    page.wait_for_function("window.s2sStats.health !== undefined", timeout=10000)  # the banner is in place
    return page


def test_turn_state_follows_the_protocol(stack, browser, shots):
    """listening → speaking → recognising → thinking → playing, a placeholder the final replaces."""
    _, bridge = stack
    page = _open(browser, bridge)
    try:
        page.click("#talk")
        assert page.get_attribute("#talk", "aria-pressed") == "true"
        page.wait_for_function("window.s2sStats.ready", timeout=10000)
        page.wait_for_selector("#log li.user.placeholder", timeout=10000)
        page.wait_for_function("window.s2sStats.finals.some(t => t.length > 0)", timeout=20000)
        page.wait_for_function("window.s2sStats.audioBytesReceived > 0", timeout=20000)
        page.wait_for_function("window.s2sStats.states.includes('playing')", timeout=10000)
        page.screenshot(path=str(shots / "turn-desktop.png"), full_page=True)
        page.click("#talk")  # stop
        assert page.get_attribute("#talk", "aria-pressed") == "false"
        states = page.evaluate("window.s2sStats.states")
        users = page.locator("#log li.user").all_inner_texts()
        agents = page.locator("#log li.agent").all_inner_texts()
        placeholders = page.locator("#log li.placeholder").count()
        lat_asr = page.inner_text("#lat-asr")
    finally:
        page.close()
    # (识别中… needs an engine slower than the fake's 0.5 s endpointing: test_browser sees it)
    want = ["listening", "speaking", "thinking", "playing"]
    order = [s for s in states if s in want]
    assert all(s in order for s in want), states
    assert [order.index(s) for s in want] == sorted(order.index(s) for s in want), states
    # the final replaced the placeholder: one user bubble with the fake engine's transcript
    assert placeholders == 0
    assert len(users) == 1 and re.search(r"utt0 bytes=\d+", users[0]), users
    assert users[0].startswith("你"), users  # speaker label
    assert agents and "utt0" in agents[0] and agents[0].startswith("助手"), agents
    assert lat_asr.endswith("ms")


def test_a_burst_of_busy_errors_is_one_status_line(stack, browser, shots):
    """A slow engine (fake:rtf=3) makes the daemon refuse audio over and over: the page shows
    one status line in Chinese with a count, the raw messages behind a disclosure, and the
    talk button does not move."""
    _, bridge = stack
    page = _open(browser, bridge)
    try:
        page.fill("#hotwords", "fake:rtf=3")
        before = page.locator("#talk").bounding_box()
        page.screenshot(path=str(shots / "busy-before.png"), full_page=True)
        page.click("#talk")
        page.wait_for_function("window.s2sStats.errors.filter(e => e.code === 'busy').length >= 3", timeout=30000)
        page.wait_for_timeout(300)
        after = page.locator("#talk").bounding_box()
        got = page.evaluate("""() => ({
            busy: window.s2sStats.errors.filter(e => e.code === 'busy').length,
            lines: document.querySelectorAll('#errors').length,
            visible: !document.getElementById('errors').hidden,
            text: document.getElementById('error-text').textContent,
            details: document.getElementById('error-list').textContent })""")
        page.click("#error-details summary")
        page.screenshot(path=str(shots / "busy-desktop.png"), full_page=True)
        page.click("#talk")
    finally:
        page.close()
    assert got["visible"] and got["lines"] == 1, got
    m = re.search(r"识别跟不上.*（×(\d+)）", got["text"])
    assert m and int(m.group(1)) == got["busy"], got
    assert "session" not in got["text"] and "busy" not in got["text"], got   # no codes or ids on the line
    assert "behind real time" in got["details"], got                          # ...but behind the disclosure
    assert before == after, (before, after)


@pytest.mark.parametrize("name,viewport", [("desktop", DESKTOP), ("phone", PHONE)])
def test_accessibility_audit_and_layout(stack, browser, shots, name, viewport):
    """axe-core: no serious or critical violations with the banner, a typed conversation, an
    error line and its disclosure open; 44 px targets; on a phone talk + text sit in a bar at
    the bottom; the favicon and every asset load."""
    _, bridge = stack
    page = _open(browser, bridge, viewport)
    try:
        page.wait_for_selector("#banner", state="visible", timeout=10000)
        page.fill("#textinput", "你好，今天天气怎么样？")
        page.press("#textinput", "Enter")
        page.wait_for_function("window.s2sStats.replies.length >= 1", timeout=20000)
        page.wait_for_function("window.s2sStats.audioBytesReceived > 0", timeout=20000)
        page.fill("#textinput", "x" * (MAX_TEXT + 1))
        page.click("#send")
        page.wait_for_selector("#errors", state="visible", timeout=10000)
        page.click("#error-details summary")
        if not page.evaluate("document.getElementById('banner').open"):
            page.click("#banner summary")
        page.wait_for_timeout(200)
        page.screenshot(path=str(shots / f"a11y-{name}.png"), full_page=True)
        page.screenshot(path=str(shots / f"a11y-{name}-viewport.png"))
        violations = axe_serious(page)
        small = page.evaluate("""() => [...document.querySelectorAll(
              'button:not([hidden]), select, input, summary')]
            .filter(e => e.offsetParent !== null)
            .map(e => { const r = e.getBoundingClientRect();
                        return {id: e.id || e.textContent.trim().slice(0, 12), w: r.width, h: r.height}; })
            .filter(r => r.h < 44 || r.w < 44)""")
        bar = page.locator("#bar").bounding_box()
        talk = page.locator("#talk").bounding_box()
        text = page.locator("#textinput").bounding_box()
        banner_h = page.locator("#banner").bounding_box()["height"]
        favicon = page.request.get(bridge.http + "/favicon.ico")
        live = page.evaluate("""() => ({role: document.getElementById('log').parentElement.getAttribute('role'),
            live: document.getElementById('log').parentElement.getAttribute('aria-live'),
            textLabel: document.querySelector('label[for=textinput]').textContent,
            lang: document.documentElement.lang})""")
        bad = list(page.s2s_bad)
        errors = page_errors(page)
    finally:
        page.close()
    assert not violations, json.dumps(violations, ensure_ascii=False, indent=1)
    assert not small, small
    assert favicon.status == 200 and favicon.headers["content-type"] == "image/x-icon"
    assert not bad, bad
    assert not errors, errors
    assert live == {"role": "log", "live": "polite", "textLabel": "输入文字", "lang": "zh-CN"}, live
    if name == "phone":
        # talk and text in a bar fixed to the bottom of the screen
        assert abs(bar["y"] + bar["height"] - viewport["height"]) <= 1, bar
        for box in (talk, text):
            assert box["y"] >= bar["y"] and box["y"] + box["height"] <= viewport["height"], (box, bar)
    else:
        assert bar["y"] + bar["height"] < viewport["height"] / 2, bar
    assert banner_h < viewport["height"] / 2, banner_h


def test_english_page_and_closed_banner_on_a_phone(stack, browser, shots):
    """?ui=en: every string in English; on a phone the banner starts as one line."""
    _, bridge = stack
    page = _open(browser, bridge, PHONE, "?ui=en")
    try:
        page.wait_for_selector("#banner", state="visible", timeout=10000)
        got = page.evaluate("""() => ({lang: document.documentElement.lang,
            talk: document.getElementById('talk').textContent,
            state: document.getElementById('turnstate').textContent,
            summary: document.getElementById('banner-summary').textContent,
            open: document.getElementById('banner').open,
            notice: document.getElementById('banner-list').textContent})""")
        banner_h = page.locator("#banner").bounding_box()["height"]
        page.screenshot(path=str(shots / "english-phone.png"))
        violations = axe_serious(page)
    finally:
        page.close()
    assert got["lang"] == "en" and got["talk"] == "Start talking" and got["state"] == "Idle", got
    assert "echo" in got["summary"] and not got["open"], got
    # English first, Chinese beside it
    assert got["notice"].index("The configured assistant") < got["notice"].index("配置的智能助手"), got
    assert banner_h <= 60, banner_h
    assert not violations, violations


def test_stop_keeps_the_last_transcript(stack, browser, shots):
    """Stop while speaking: the page waits for the flushed final (talk disabled with a hint)
    instead of letting a new start drop it; then talk comes back."""
    _, bridge = stack
    page = _open(browser, bridge)
    try:
        page.fill("#hotwords", "fake:delay=0.3")  # a slow engine: the flushed final takes a while
        page.click("#talk")
        page.wait_for_selector("#log li.user.placeholder", timeout=15000)
        page.click("#talk")  # stop mid-utterance
        waited = page.evaluate("""() => ({disabled: document.getElementById('talk').disabled,
            hint: document.getElementById('talk-hint').textContent,
            state: document.getElementById('turnstate').dataset.state})""")
        page.wait_for_function("!document.getElementById('talk').disabled", timeout=15000)
        finals = page.evaluate("window.s2sStats.finals")
        users = page.locator("#log li.user:not(.placeholder)").all_inner_texts()
    finally:
        page.close()
    assert waited == {"disabled": True, "hint": "正在识别上一句，稍候再开始…", "state": "recognising"}, waited
    assert any(f for f in finals) and users and "utt0" in users[-1], (finals, users)


def test_reconnects_on_the_next_action_after_an_idle_close(stack, browser, tmp_path):
    """The bridge closes a connection idle for bridge.idle_timeout: the page does not call that
    an error; typing reconnects and the message goes through."""
    d, _ = stack
    import yaml

    data = yaml.safe_load((d / "s2s.yaml").read_text(encoding="utf-8"))
    data["bridge"]["idle_timeout"] = 2.0
    cfg = tmp_path / "idle.yaml"
    cfg.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    b = start_bridge(cfg, tmp_path / "bridge-idle.log", agent="echo")
    page = _open(browser, b)
    try:
        page.wait_for_function("!window.s2sStats.connected", timeout=10000)
        page.wait_for_timeout(300)
        dormant = page.evaluate("""() => ({talk: document.getElementById('talk').disabled,
            errors: !document.getElementById('errors').hidden, conn: document.getElementById('conn').textContent,
            state: document.getElementById('turnstate').dataset.state})""")
        page.fill("#textinput", "hello again.")
        page.press("#textinput", "Enter")
        page.wait_for_function("window.s2sStats.replies.includes('You said: hello again.')", timeout=15000)
    finally:
        page.close()
        b.stop()
    assert dormant == {"talk": False, "errors": False, "conn": "空闲断开 · 操作时自动重连", "state": "idle"}, dormant
