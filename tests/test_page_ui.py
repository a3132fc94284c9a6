"""The page in headless Debian Chromium against a real bridge and a real daemon running the
FAKE engines (tests/fake_engines.py: energy endpointing, tone synthesis) and the built-in echo
agent: these tests are about the page (turn state, errors, accessibility, phone layout), not
about recognition or synthesis. Screenshots go to the folder the first test prints.
"""

from __future__ import annotations

import json
import re
import wave
from types import SimpleNamespace

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
        lat_e2e = page.inner_text("#lat-e2e")
        spec = None if page.evaluate("document.getElementById('spec-row').hidden") else page.text_content("#spec")
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
    # speech end -> first audio from the bridge's `first_audio` (the fake engine has no tentatives:
    # speculation is on, nothing was prepared early, so no marker and nothing released or wasted)
    assert re.fullmatch(r"\d+\.\d\d s", lat_e2e), lat_e2e
    assert spec and re.fullmatch(r"用上 0 · 作废 0（每轮作废 0\.00）", spec), spec


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
            busy: window.s2sStats.errors.filter(e => e.code === 'busy' && !e.silence).length,
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


# --- speech end -> first audio and speculative replies, from the bridge's events --------------------

HELLO = {"type": "hello", "connection": "c1", "agent": {"kind": "langgraph", "echo_fallback": False},
         "auth_required": False, "input_sample_rate": 16000, "output_sample_rate": 24000}
READY = {"type": "ready", "session_id": "s1", "language": "zh", "agent": {"kind": "langgraph", "echo_fallback": False},
         "barge_in": True, "input_sample_rate": 16000, "output_sample_rate": 24000, "partials": True,
         "speculate": True, "hotwords": True}


def _spoken_turn(no: int, text: str, reply: str, first_audio: dict) -> list:
    """What the bridge sends for one spoken turn, from the final to the reply's end."""
    return [{"type": "final", "text": text, "utterance": no - 1, "start": 0.5, "end": 3.0, "reason": "silence",
             "latency_ms": 810.0},
            *first_audio.pop("before", []),
            {"type": "agent_delta", "turn": no, "text": reply},
            {"type": "tts_start", "turn": no, "sentence": 0, "text": reply, "sample_rate": 24000},
            {"type": "first_audio", "turn": no, **first_audio},
            b"\0\0" * 2400,
            {"type": "tts_end", "turn": no, "sentence": 0},
            {"type": "agent_done", "turn": no, "text": reply, "first_token_ms": 200.0}]


@pytest.mark.parametrize("ui", ["zh", "en"])
def test_speech_end_latency_and_speculation_counts(stack, browser, shots, ui):
    """The page's websocket answered by the test with the bridge's events (as test_bridge checks
    them): a speculative turn dropped at a pause, the reply prepared on the whole sentence released
    (0.82 s · speculative), a reply that was not prepared early (1.53 s), counts of released and
    wasted speculative replies summed over a reconnect; unknown fields and events change nothing;
    axe finds nothing serious."""
    _, bridge = stack
    page = new_page(browser, DESKTOP)
    sockets = []

    def on_ws(ws):
        sockets.append(ws)
        ws.on_message(lambda m: None)  # the page's start / audio: nothing to answer
        ws.send(json.dumps(HELLO))

    page.route_web_socket("**/ws", on_ws)

    def send(*events):
        for e in events:
            sockets[-1].send(e if isinstance(e, bytes) else json.dumps(e, ensure_ascii=False))

    def shown():
        return page.evaluate("""() => ({e2e: document.getElementById('lat-e2e').textContent,
            spec: document.getElementById('spec-row').hidden ? null : document.getElementById('spec').textContent,
            label: document.querySelector('#spec-row span').textContent,
            marks: [...document.querySelectorAll('#log li.agent')].map(li => li.dataset.speculative || '')})""")

    try:
        page.goto(bridge.http + "/" + ("?ui=en" if ui == "en" else ""), wait_until="load")
        page.wait_for_function("window.s2sStats.connected && window.s2sStats.health !== undefined", timeout=10000)
        before_ready = shown()
        send(READY)
        page.wait_for_function("window.s2sStats.speculation !== null", timeout=5000)
        at_ready = shown()
        # the user pauses mid-sentence and goes on: the reply prepared on the first half is dropped
        send({"type": "speech_start", "utterance": 0, "start": 0.5},
             {"type": "speculation", "released": 0, "cancelled": 1, "turns": 0})
        page.wait_for_function("window.s2sStats.speculation.cancelled === 1", timeout=5000)
        after_drop = shown()
        # the final: the reply prepared on the whole sentence is released
        send(*_spoken_turn(1, "提醒我晚上八点给阳台的花浇水。", "好的。", {
            "before": [{"type": "speculation", "released": 1, "cancelled": 1, "turns": 1}],
            "latency_ms": 2.1, "speech_end_ms": 815.4, "speculative": True, "some_future_field": {"x": 1}}))
        page.wait_for_function("window.s2sStats.speechEndLatencies.length === 1", timeout=5000)
        page.wait_for_function("window.s2sStats.replies.length === 1", timeout=5000)
        released = shown()
        page.screenshot(path=str(shots / f"speculative-{ui}.png"), full_page=True)
        violations = axe_serious(page)
        # an event the page does not know, then a reply that was not prepared before the final
        send({"type": "some_future_event", "n": 1},
             *_spoken_turn(2, "明天呢？", "明天也提醒你。", {
                 "before": [{"type": "speculation", "released": 1, "cancelled": 1, "turns": 2}],
                 "latency_ms": 480.0, "speech_end_ms": 1530.2}))
        page.wait_for_function("window.s2sStats.speechEndLatencies.length === 2", timeout=5000)
        page.wait_for_function("window.s2sStats.speculation.turns === 2", timeout=5000)
        plain = shown()
        # the bridge counts per connection; after a reconnect the page adds the new connection's
        sockets[-1].close(code=1001, reason="going away")
        page.wait_for_function("window.s2sStats.reconnects >= 1 && window.s2sStats.connected", timeout=10000)
        page.wait_for_function("document.getElementById('conn').classList.contains('ok')", timeout=5000)
        send({"type": "speculation", "released": 0, "cancelled": 1, "turns": 0})
        page.wait_for_function("window.s2sStats.speculation.cancelled === 2", timeout=5000)
        reconnected = shown()
        stats = page.evaluate("window.s2sStats")
        errors = page_errors(page)
    finally:
        page.close()
    zh = ui == "zh"
    assert before_ready["spec"] is None and before_ready["e2e"] == "–", before_ready  # nothing until told
    assert at_ready["spec"] == ("用上 0 · 作废 0" if zh else "0 released / 0 wasted"), at_ready
    assert at_ready["label"] == ("推测回复" if zh else "Speculative replies"), at_ready
    assert after_drop["spec"] == ("用上 0 · 作废 1" if zh else "0 released / 1 wasted"), after_drop
    assert after_drop["e2e"] == "–" and after_drop["marks"] == [], after_drop  # nothing of the dropped reply
    # (that it was prepared early is said behind 详情 only: test_page_items)
    assert released == {"e2e": "0.82 s",
                        "spec": "用上 1 · 作废 1（每轮作废 1.00）" if zh else "1 released / 1 wasted (1.00 wasted per turn)",
                        "label": at_ready["label"], "marks": ["true"]}, released
    assert plain["e2e"] == "1.53 s" and plain["marks"] == ["true", "false"], plain
    assert plain["spec"] == ("用上 1 · 作废 1（每轮作废 0.50）" if zh else "1 released / 1 wasted (0.50 wasted per turn)")
    assert reconnected["spec"] == ("用上 1 · 作废 2（每轮作废 1.00）" if zh else "1 released / 2 wasted (1.00 wasted per turn)")
    assert stats["speechEndLatencies"] == [{"ms": 815.4, "speculative": True}, {"ms": 1530.2, "speculative": False}]
    assert stats["speculation"] == {"released": 1, "cancelled": 2, "turns": 2}, stats["speculation"]
    assert not violations, json.dumps(violations, ensure_ascii=False, indent=1)
    assert not errors, errors


@pytest.fixture(scope="module")
def spec_stack(tmp_path_factory, models_dir):
    """Speculation for real: the speculation tests' daemon (tiny FunASR + fsmn-vad + the Piper
    voice, `turn.early_silence` 0.2 s) and bridge, an English-speaking fake LangGraph agent."""
    need_browser()
    from fake_langgraph import FakeAgentServer
    from test_speculation import _config, _reply

    d = tmp_path_factory.mktemp("page-spec")
    with FakeAgentServer(script=_reply, token_delay=0.01) as agent:
        cfg = _config(d, models_dir, agent.url, True, "on")
        daemon = start_daemon(cfg, d / "daemon.log", timeout=240)
        bridge = start_bridge(cfg, d / "bridge.log")
        yield d, bridge, agent
        bridge.stop()
        daemon.stop()


def test_a_real_speculative_turn_on_the_page(spec_stack, browser, shots):
    """The microphone says a sentence with a 0.4 s pause in it: the reply prepared on the first half
    is dropped unseen (counted as wasted), the one prepared on the whole sentence is released at the
    final; the page shows its speech end -> first audio marked speculative, and the counts."""
    from test_speculation import FIX, _pcm16, _split_with_pause

    d, bridge, agent = spec_stack
    audio, _cut = _split_with_pause(FIX / "01.wav", 0.4)
    src = d / "paused.wav"
    with wave.open(str(src), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(_pcm16(audio))
    # A Chromium of its own for this microphone, from the module's playwright (one per process).
    b = launch(SimpleNamespace(chromium=browser.browser_type), mic_wav(d / "mic.wav", src, lead=0.5, tail=12.0))
    page = _open(b, bridge)
    try:
        page.click("#talk")
        page.wait_for_function("window.s2sStats.speechEndLatencies.length >= 1", timeout=40000)
        page.wait_for_function("window.s2sStats.replies.length >= 1", timeout=20000)
        page.click("#talk")
        page.screenshot(path=str(shots / "speculative-real.png"), full_page=True)
        got = page.evaluate("""() => ({e2e: document.getElementById('lat-e2e').textContent,
            spec: document.getElementById('spec').textContent,
            agents: [...document.querySelectorAll('#log li.agent')].map(li => li.textContent),
            stats: window.s2sStats})""")
        errors = page_errors(page)
    finally:
        page.close()
        b.close()
    stats = got["stats"]
    finals = [f for f in stats["finals"] if f]
    # one sentence, one reply: the half-sentence reply never reached the page
    assert len(finals) == 1 and len(stats["replies"]) == 1 and len(got["agents"]) == 1, got
    kept = [r for r in agent.runs if not r.cancelled]
    assert [r.user_text for r in kept] == finals and stats["replies"] == [kept[0].reply], \
        [(r.user_text, r.cancelled) for r in agent.runs]
    first = stats["speechEndLatencies"][0]
    assert first["speculative"] is True, stats["speechEndLatencies"]
    assert got["e2e"] == f"{first['ms'] / 1000:.2f} s", got["e2e"]
    spec = stats["speculation"]
    assert spec["released"] == 1 and spec["cancelled"] >= 1 and spec["turns"] == 1, spec
    assert got["spec"] == f"用上 1 · 作废 {spec['cancelled']}（每轮作废 {spec['cancelled']:.2f}）", got["spec"]
    assert not errors, errors
