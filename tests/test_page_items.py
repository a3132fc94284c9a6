"""Issue 25, the page items from a new user's trial, each in headless Debian Chromium:

- 停止播放 shows only while a reply's audio plays, and also stops the reply's synthesis on the
  server: against a real daemon (REAL Piper voice, its `sentences_synthesized` counter in
  `describe`) and a real bridge, the counter stays put after the click and the next turn works;
- one "first audio" figure per turn (the bubble and the line below say the same);
- jargon (推测回复, 作废) only behind 详情; the raw English behind 详情 has the page's words beside it;
- the fallback banner is open the first time only (and folds away when the conversation begins);
- a page opened by a LAN name the bridge refuses (403) says why and what to set, and stops
  reconnecting; an allowed http LAN page says the microphone needs https before it is pressed;
- a denied microphone says, in Chinese, how to allow it again and that typing still works;
- `busy` while only silence was sent is not "speech dropped".

The fake-engine stack (tests/fake_engines.py: FAKE ASR and TTS) and the page's websocket answered by
the test (the bridge's events, as tests/test_page_ui.py does) are used where the test is about the
page, not the engines.
"""

from __future__ import annotations

import json
import re
import time
import wave

import pytest
import yaml

from bridge_procs import start_bridge, start_daemon, write_config
from helpers.browser import CHROMIUM, DESKTOP, announce, artifacts_dir, axe_serious, need_browser, new_page, page_errors

LAN = "s2s-lan.test"   # a LAN name: Chromium resolves it to 127.0.0.1 (--host-resolver-rules)


@pytest.fixture(scope="module")
def shots(pytestconfig):
    d = artifacts_dir("page-items")
    announce(pytestconfig, f"[page-items] screenshots: {d}")
    return d


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """FAKE engines, the echo agent standing in for an unreachable LangGraph (a banner to show)."""
    need_browser()
    d = tmp_path_factory.mktemp("page-items")
    cfg = write_config(d / "s2s.yaml", d / "models", d / "run",
                       agent={"kind": "langgraph", "url": "http://127.0.0.1:9", "timeout": 5.0},
                       limits={"max_asr_lag": 0.5, "max_session_lag": 1.0})
    daemon = start_daemon(cfg, d / "daemon.log", fake_engines=True, timeout=60)
    bridge = start_bridge(cfg, d / "bridge.log", agent="echo")
    yield d, bridge, cfg
    bridge.stop()
    daemon.stop()


def _silence_wav(path, seconds: float = 6.0):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * int(16000 * seconds))
    return path


def _launch(p, *extra):
    args = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--autoplay-policy=no-user-gesture-required", *extra]
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)


@pytest.fixture(scope="module")
def pw():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(stack, pw):
    """A microphone that hears only silence, and a LAN name for the bridge's address."""
    wav = _silence_wav(stack[0] / "silence.wav")
    b = _launch(pw, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}", f"--host-resolver-rules=MAP {LAN} 127.0.0.1")
    yield b
    b.close()


def _open(browser, url, context=None):
    page = context.new_page() if context is not None else new_page(browser, DESKTOP)
    if context is not None:
        page.s2s_logs = []
        page.on("pageerror", lambda e: page.s2s_logs.append(f"pageerror: {e}"))
    page.goto(url, wait_until="load")
    page.wait_for_function("window.s2sStats && window.s2sStats.connected", timeout=15000)
    page.wait_for_function("window.s2sStats.health !== undefined", timeout=15000)
    return page


# --- the page's websocket answered by the test -------------------------------------------------------

HELLO = {"type": "hello", "connection": "c1", "agent": {"kind": "langgraph", "echo_fallback": False},
         "auth_required": False, "input_sample_rate": 16000, "output_sample_rate": 24000}
READY = {"type": "ready", "session_id": "s1", "language": "zh", "agent": HELLO["agent"], "barge_in": True,
         "input_sample_rate": 16000, "output_sample_rate": 24000, "partials": True, "speculate": True,
         "hotwords": True}


class FakeBridgeSocket:
    """The page's /ws answered by the test: what the page sends is kept in `got`."""

    def __init__(self, page):
        self.sockets = []
        self.got = []
        page.route_web_socket("**/ws", self._on_ws)

    def _on_ws(self, ws):
        self.sockets.append(ws)
        ws.on_message(lambda m: self.got.append(json.loads(m)) if isinstance(m, str) else None)
        ws.send(json.dumps(HELLO))

    def send(self, *events):
        for e in events:
            self.sockets[-1].send(e if isinstance(e, bytes) else json.dumps(e, ensure_ascii=False))


def _tone(seconds: float) -> bytes:
    return b"\x00\x10" * int(24000 * seconds)


def test_stop_shows_only_while_audio_plays_and_one_first_audio_figure(stack, browser, shots):
    """A spoken turn: while its first sentence is being synthesised 停止播放 is hidden; once its
    audio plays it shows; the click sends `stop_playback` for that turn. The turn's one
    speech end -> first audio figure is on its bubble and on the line below, the same text, and the
    speculative marker and the counts are behind 详情."""
    _, bridge, _ = stack
    page = new_page(browser, DESKTOP)
    fake = FakeBridgeSocket(page)
    try:
        page.goto(bridge.http + "/", wait_until="load")
        page.wait_for_function("window.s2sStats.connected && window.s2sStats.health !== undefined", timeout=10000)
        fake.send(READY, {"type": "speculation", "released": 0, "cancelled": 1, "turns": 0})
        fake.send({"type": "final", "text": "提醒我晚上八点给阳台的花浇水。", "utterance": 0, "start": 0.5, "end": 3.0,
                   "reason": "silence", "latency_ms": 810.0},
                  {"type": "speculation", "released": 1, "cancelled": 1, "turns": 1},
                  {"type": "agent_delta", "turn": 1, "text": "好的。我会提醒你。"},
                  {"type": "agent_done", "turn": 1, "text": "好的。我会提醒你。", "first_token_ms": 200.0},
                  {"type": "tts_start", "turn": 1, "sentence": 0, "text": "好的。", "sample_rate": 24000})
        page.wait_for_function("document.getElementById('turnstate').dataset.state === 'thinking'", timeout=5000)
        page.wait_for_timeout(700)  # the page's clock runs on: its own count would differ from the bridge's
        synthesising = page.is_visible("#stopplay")
        fake.send({"type": "first_audio", "turn": 1, "latency_ms": 4221.6, "speech_end_ms": 5031.6,
                   "speculative": True}, _tone(3.0))
        page.wait_for_function("document.getElementById('turnstate').dataset.state === 'playing'", timeout=5000)
        playing = page.is_visible("#stopplay")
        page.screenshot(path=str(shots / "playing-with-stop.png"), full_page=True)
        shown = page.evaluate("""() => ({e2e: document.getElementById('lat-e2e').textContent,
            tts: document.getElementById('lat-tts').textContent,
            bubble: document.querySelector('#log li.agent .meta').textContent,
            visible: document.body.innerText})""")
        violations = axe_serious(page)
        page.click("#stopplay")
        page.wait_for_function("document.getElementById('turnstate').dataset.state !== 'playing'", timeout=5000)
        after = page.evaluate("""() => ({stop: !document.getElementById('stopplay').hidden,
            bubble: document.querySelector('#log li.agent .meta').textContent})""")
        more = ""
        if page.locator("#stats-more summary").count():  # (the page before issue 25 had no 详情 here)
            page.click("#stats-more summary")
            more = page.inner_text("#stats-more")
        page.screenshot(path=str(shots / "stats-details-open.png"), full_page=True)
        errors = page_errors(page)
    finally:
        page.close()
    assert not synthesising, "停止播放 showed while nothing played"
    assert playing, "停止播放 did not show while the reply played"
    assert {"type": "stop_playback", "turn": 1} in fake.got, fake.got
    # one figure: the bubble says what the line says, nothing else about first audio
    assert shown["e2e"] == "5.03 s", shown
    assert "说完 → 首个语音 5.03 s" in shown["bubble"] and shown["bubble"].count("首个语音") == 1, shown
    assert shown["tts"] == "4222 ms", shown   # final -> first audio on the same (bridge) clock
    # the jargon is not on the page until 详情 is opened
    assert "推测" not in shown["visible"] and "作废" not in shown["visible"], shown["visible"]
    assert "推测回复" in more and "用上 1 · 作废 1" in more and "提前准备" in more, more
    assert not after["stop"] and "已停止播放" in after["bubble"], after
    assert not violations, json.dumps(violations, ensure_ascii=False, indent=1)
    assert not errors, errors


def test_details_say_it_in_the_pages_words_beside_the_raw_english(stack, browser, shots):
    """The status line's 详情 and a bubble's 详情: each raw English line has its meaning in Chinese
    beside it."""
    _, bridge, _ = stack
    page = new_page(browser, DESKTOP)
    fake = FakeBridgeSocket(page)
    try:
        page.goto(bridge.http + "/", wait_until="load")
        page.wait_for_function("window.s2sStats.connected && window.s2sStats.health !== undefined", timeout=10000)
        fake.send({"type": "error", "code": "unavailable", "source": "asr",
                   "message": "daemon at ipc:///run/s2s/asr.sock is not reading (send queue full)"})
        page.fill("#textinput", "你好")
        page.press("#textinput", "Enter")
        fake.send({"type": "user_text", "text": "你好"},
                  {"type": "error", "code": "timeout", "source": "agent", "turn": 1,
                   "message": "agent: no token within 10 s (agent.timeout)"},
                  {"type": "agent_done", "turn": 1, "text": "", "error": "timeout"})
        page.wait_for_selector("#log li.agent .note.error details", timeout=5000)
        page.click("#error-details summary")
        page.click("#log li.agent .note.error details summary")
        page.screenshot(path=str(shots / "details-bilingual.png"), full_page=True)
        got = page.evaluate("""() => ({line: document.getElementById('error-list').innerText,
            bubble: document.querySelector('#log li.agent .note.error details').innerText})""")
    finally:
        page.close()
    assert "语音服务暂时不可用" in got["line"] and "not reading" in got["line"], got
    assert "助手没有按时回答" in got["bubble"] and "no token within" in got["bubble"], got


# --- the banner ----------------------------------------------------------------------------------------

def test_banner_is_open_the_first_time_only(stack, browser, shots):
    """Desktop: the fallback banner opens the first time; reloaded, it is one line; it also folds
    away when the first turn begins."""
    _, bridge, _ = stack
    ctx = browser.new_context(bypass_csp=True, viewport=DESKTOP)
    try:
        page = _open(browser, bridge.http + "/", ctx)
        page.wait_for_selector("#banner", state="visible", timeout=10000)
        first = page.evaluate("document.getElementById('banner').open")
        page.fill("#textinput", "你好。")
        page.press("#textinput", "Enter")
        page.wait_for_function("window.s2sStats.replies.length >= 1", timeout=20000)
        after_turn = page.evaluate("document.getElementById('banner').open")
        page.reload(wait_until="load")
        page.wait_for_function("window.s2sStats.health !== undefined", timeout=15000)
        page.wait_for_selector("#banner", state="visible", timeout=10000)
        page.wait_for_timeout(300)
        second = page.evaluate("document.getElementById('banner').open")
        height = page.locator("#banner").bounding_box()["height"]
        page.screenshot(path=str(shots / "banner-second-visit.png"))
        page.click("#banner summary")  # the user can still open it
        reopened = page.evaluate("document.getElementById('banner').open")
        errors = page_errors(page)
    finally:
        ctx.close()
    assert first is True, "the banner was not open the first time"
    assert after_turn is False, "the banner stayed open after the first turn"
    assert second is False and height <= 60, (second, height)
    assert reopened is True
    assert not errors, errors


# --- a LAN name the bridge refuses; an allowed http LAN page -----------------------------------------

def test_lan_name_refused_says_why_and_stops_reconnecting(stack, browser, shots):
    """http://<LAN name>:port/: the bridge answers the websocket with 403 (origin not allowed). The
    page says so, names the origin and bridge.allowed_origins, says the microphone needs https,
    and does not loop on 已断开."""
    _, bridge, _ = stack
    page = new_page(browser, DESKTOP)
    try:
        page.goto(f"http://{LAN}:{bridge.port}/", wait_until="load")
        page.wait_for_selector("#access", state="visible", timeout=15000)
        page.wait_for_timeout(4000)  # the old page retried after 1 s, 2 s, ...
        got = page.evaluate("""() => ({access: document.getElementById('access').innerText,
            conn: document.getElementById('conn').textContent,
            hint: document.getElementById('talk-hint').textContent,
            reconnects: window.s2sStats.reconnects, connected: window.s2sStats.connected})""")
        page.screenshot(path=str(shots / "lan-refused.png"), full_page=True)
        violations = axe_serious(page)
        errors = page_errors(page)
    finally:
        page.close()
    origin = f"http://{LAN}:{bridge.port}"
    assert not got["connected"] and got["reconnects"] == 0, got
    assert got["conn"] == "服务拒绝了连接" and "不在允许的来源" in got["hint"], got
    a = got["access"]
    assert "403" in a and origin in a and f'bridge.allowed_origins: ["{origin}"]' in a, a
    assert "https" in a and "麦克风" in a and "bridge.tls_cert" in a, a
    assert not violations, json.dumps(violations, ensure_ascii=False, indent=1)
    assert not errors, errors


def test_allowed_http_lan_page_says_the_microphone_needs_https(stack, browser, shots, tmp_path):
    """bridge.allowed_origins names the LAN origin: the page connects, typing works, and talk is off
    with the reason (http on a LAN name is not a secure context) before anyone presses it."""
    d, _, cfg = stack
    data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    b = start_bridge(cfg, tmp_path / "probe.log", agent="echo")  # learn a free port's number
    port = b.port
    b.stop()
    data["bridge"].update(port=port, allowed_origins=[f"http://{LAN}:{port}"])
    lan_cfg = tmp_path / "lan.yaml"
    lan_cfg.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    b = start_bridge(lan_cfg, tmp_path / "bridge-lan.log", agent="echo")
    page = new_page(browser, DESKTOP)
    try:
        page.goto(f"http://{LAN}:{port}/", wait_until="load")
        page.wait_for_function("window.s2sStats.connected", timeout=15000)
        page.fill("#textinput", "hello.")
        page.press("#textinput", "Enter")
        page.wait_for_function("window.s2sStats.replies.length >= 1", timeout=20000)
        got = page.evaluate("""() => ({talk: document.getElementById('talk').disabled,
            hint: document.getElementById('talk-hint').textContent,
            access: !document.getElementById('access').hidden})""")
        page.screenshot(path=str(shots / "lan-http-allowed.png"), full_page=True)
    finally:
        page.close()
        b.stop()
    assert got["talk"] is True and not got["access"], got
    assert "https" in got["hint"] and "bridge.tls_cert" in got["hint"] and "文字输入仍可使用" in got["hint"], got


# --- the microphone ------------------------------------------------------------------------------------

def test_denied_microphone_says_how_to_allow_it_and_typing_works(stack, pw, shots):
    """Chromium without the fake permission UI denies the microphone: the status line says, in
    Chinese, how to allow it again and that typing still works; a typed turn goes through."""
    _, bridge, _ = stack
    b = _launch(pw, "--use-fake-device-for-media-stream", "--deny-permission-prompts")
    try:
        page = new_page(b, DESKTOP)
        page.goto(bridge.http + "/", wait_until="load")
        page.wait_for_function("window.s2sStats.connected && window.s2sStats.health !== undefined", timeout=15000)
        page.click("#talk")
        page.wait_for_selector("#errors", state="visible", timeout=10000)
        line = page.inner_text("#error-text")
        code = page.evaluate("window.s2sStats.errors.map(e => e.code)")
        page.screenshot(path=str(shots / "microphone-denied.png"), full_page=True)
        page.fill("#textinput", "你好。")
        page.press("#textinput", "Enter")
        page.wait_for_function("window.s2sStats.replies.length >= 1", timeout=20000)
        talk = page.evaluate("document.getElementById('talk').getAttribute('aria-pressed')")
        errors = page_errors(page)
        page.close()
    finally:
        b.close()
    assert "mic_denied" in code, code
    assert "麦克风权限被拒绝" in line and "允许" in line and "刷新" in line and "文字输入仍可使用" in line, line
    assert talk == "false"
    assert not errors, errors


def test_busy_while_silent_is_not_speech_dropped(stack, browser, shots):
    """A slow engine (fake:rtf=3) makes the daemon refuse audio `busy`; the microphone hears only
    silence: the page does not say that speech was dropped."""
    _, bridge, _ = stack
    page = _open(browser, bridge.http + "/")
    try:
        page.fill("#hotwords", "fake:rtf=3")
        page.click("#talk")
        page.wait_for_function("window.s2sStats.errors.filter(e => e.code === 'busy').length >= 3", timeout=30000)
        page.wait_for_timeout(300)
        got = page.evaluate("""() => ({line: document.getElementById('errors').hidden ? ''
                                        : document.getElementById('error-text').textContent,
            busy: window.s2sStats.errors.filter(e => e.code === 'busy').map(e => !!e.silence)})""")
        page.screenshot(path=str(shots / "busy-silence.png"), full_page=True)
        page.click("#talk")
    finally:
        page.close()
    assert got["busy"] and all(got["busy"]), got
    assert "丢弃" not in got["line"], got


# --- 停止播放 stops the synthesis: the real bridge and daemon, the REAL Piper voice ----------------------

@pytest.fixture(scope="module")
def piper_stack(tmp_path_factory, models_dir):
    need_browser()
    d = tmp_path_factory.mktemp("page-stop")
    cfg = write_config(d / "s2s.yaml", models_dir, d / "run", asr="funasr", tts="piper")
    data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    data["asr"]["funasr"] = {"paraformer": "tiny/paraformer", "vad": "fsmn-vad", "punc": "tiny/ct-punc",
                             "streaming": "tiny/paraformer-streaming"}
    data["tts"]["piper"] = {"voice": "piper/en_US-joe-medium.onnx"}
    cfg.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    daemon = start_daemon(cfg, d / "daemon.log", timeout=240)
    bridge = start_bridge(cfg, d / "bridge.log", agent="echo")
    yield bridge, cfg, d
    bridge.stop()
    daemon.stop()


def _synthesized(cfg) -> int:
    from daemon.wire.client import TTSClient
    from daemon.config import load_config

    with TTSClient(load_config(str(cfg), env={}).daemon.endpoint("tts")) as c:
        return int(c.describe()["tts"]["details"]["sentences_synthesized"])


SENTENCES = ["The first sentence of a long reply is spoken here.", "The second one follows it.",
             *[f"Sentence number {n} keeps the voice busy for a while longer." for n in range(3, 15)]]


def test_stop_playback_stops_the_synthesis_on_the_server(piper_stack, browser, shots):
    """A typed turn whose echoed reply has 14 sentences: 停止播放 once its audio plays. The daemon's
    sentence counter stays put (the sentence being synthesised at the click may finish), the whole
    text still arrives, and the next turn is spoken."""
    bridge, cfg, _ = piper_stack
    page = _open(browser, bridge.http + "/")
    try:
        page.fill("#textinput", " ".join(SENTENCES))
        page.press("#textinput", "Enter")
        page.wait_for_selector("#stopplay", state="visible", timeout=60000)
        at_click = _synthesized(cfg)
        page.click("#stopplay")
        t0 = time.monotonic()
        page.wait_for_function("window.s2sStats.replies.length >= 1", timeout=30000)
        page.wait_for_function("document.getElementById('turnstate').dataset.state === 'idle'", timeout=30000)
        page.wait_for_timeout(3000)
        after = _synthesized(cfg)
        reply = page.evaluate("window.s2sStats.replies[0]")
        bubble = page.inner_text("#log li.agent")
        page.screenshot(path=str(shots / "stopped-reply.png"), full_page=True)
        before_next = page.evaluate("window.s2sStats.audioBytesReceived")
        page.fill("#textinput", "Hello again.")
        page.press("#textinput", "Enter")
        page.wait_for_function(f"window.s2sStats.audioBytesReceived > {before_next}", timeout=60000)
        page.wait_for_function("window.s2sStats.replies.length >= 2", timeout=30000)
        page.wait_for_function("document.getElementById('turnstate').dataset.state === 'idle'", timeout=30000)
        next_turn = _synthesized(cfg)
        errors = page_errors(page)
        page_errs = page.evaluate("window.s2sStats.errors")
    finally:
        page.close()
    print(f"stop: {at_click} sentences synthesised at the click, {after} {time.monotonic() - t0:.1f} s later, "
          f"{next_turn} after the next turn")
    # The daemon speaks a streamed reply's sentences back to back: one may finish between reading
    # the counter and the click, and the one in flight at the click may finish; nothing after
    # that (before the fix the counter rose to the reply's 14).
    assert after - at_click <= 2, (at_click, after)
    assert reply.endswith(SENTENCES[-1]) and SENTENCES[-1] in bubble and "已停止播放" in bubble, (reply, bubble)
    assert next_turn > after, (after, next_turn)
    assert not [e for e in page_errs if e["code"] not in ("busy",)], page_errs
    assert not errors, errors
    assert re.search(r"文字 → 首个语音 \d+ ms", bubble), bubble
