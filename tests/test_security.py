"""Access control and secrets.

Extends tests/test_bridge.py (origin 403, token 401/1008, 18 traversal paths over HTTP) and
tests/test_daemon.py (ipc sockets 0660 in a 0750 directory), without repeating them:
- static files: a property test over arbitrary URL paths, symlinks out of the directory, and
  more encoded variants over HTTP;
- origins a browser can present that are not the page's own: "null", look-alike hosts,
  userinfo tricks, and DNS rebinding (a foreign name that resolves to 127.0.0.1, so that
  Origin and Host agree);
- tokens: wrong types, empty, prefixes, a first message that is not start/text;
- secrets: daemon + bridge at DEBUG with bridge.token and agent.api_key set, both used (the
  FAKE OpenAI-compatible agent checks the key arrives), refused attempts, an agent failure,
  then every log, console output, /healthz, describe, s2s-ctl output and websocket event is
  searched for the two secrets.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from typing import Any, List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import InvalidStatus

from bridge.server import STATIC_DIR, CONTENT_TYPES, static_path
from bridge_procs import ROOT, start_bridge, start_daemon, write_config
from fake_langgraph import FakeAgentServer
from helpers.ws import WSClient, http_get, read_pcm, silence

TOKEN = "tok-7f3a9c1e5b2d4f60a8e1"
API_KEY = "sk-test-2b7e151628aed2a6abf71589"


def run(coro, timeout: float = 120.0):
    async def guarded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(guarded())


# --- static files ------------------------------------------------------------------------------

path_chars = st.sampled_from(list("/.%\\:;?#~ab") + ["..", "%2e", "%2E", "%2f", "%2F", "%5c", "%00", "%25",
                                                      "%c0%ae", "%ff", "index.html", "app.js", "static",
                                                      "etc", "passwd", "__init__.py", "server.py"])


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(path_chars, max_size=12).map(lambda parts: "/" + "".join(parts)))
def test_static_path_never_leaves_the_directory(path):
    root = STATIC_DIR.resolve()
    try:
        f = static_path(path)
    except UnicodeDecodeError:
        return  # the server answers 404 for these (bridge.server.process_request)
    if f is not None:
        assert f.is_file() and f.resolve().is_relative_to(root) and f.suffix in CONTENT_TYPES, (path, f)
        assert not any(p.startswith(".") for p in f.relative_to(root).parts)


def test_static_path_refuses_symlinks_out(tmp_path):
    root = tmp_path / "static"
    root.mkdir()
    (root / "ok.js").write_text("ok")
    secret = tmp_path / "secret.js"
    secret.write_text("secret")
    (root / "evil.js").symlink_to(secret)
    (root / "up").symlink_to(tmp_path)
    (root / "etc").symlink_to("/etc")
    assert static_path("/ok.js", root) == (root / "ok.js").resolve()
    for p in ("/evil.js", "/up/secret.js", "/etc/hostname", "/%65vil.js"):
        assert static_path(p, root) is None, p


# --- live bridge ---------------------------------------------------------------------------------


class _KeyCheckingAgent(FakeAgentServer):
    """The FAKE OpenAI-compatible agent, recording the Authorization header of every request."""

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.auth: List[str] = []
        base = self.httpd.RequestHandlerClass
        outer = self

        class Handler(base):  # type: ignore[misc, valid-type]
            def do_GET(self) -> None:
                outer.auth.append(self.headers.get("Authorization", ""))
                super().do_GET()

            def do_POST(self) -> None:
                outer.auth.append(self.headers.get("Authorization", ""))
                super().do_POST()

        self.httpd.RequestHandlerClass = Handler


@pytest.fixture(scope="module")
def agent():
    with _KeyCheckingAgent(script=["好的，没问题。"]) as a:
        yield a


@pytest.fixture(scope="module")
def secure(tmp_path_factory, models_dir, agent):
    """FAKE-engine daemon + bridge, both logging at DEBUG, token and API key configured."""
    d = tmp_path_factory.mktemp("secure")
    cfg = write_config(d / "s2s.yaml", models_dir, d / "run",
                       bridge={"token": TOKEN},
                       agent={"kind": "openai", "url": agent.url, "api_key": API_KEY, "model": "fake-model",
                              "timeout": 3.0})
    text = cfg.read_text().replace("level: INFO", "level: DEBUG")
    assert "level: DEBUG" in text
    cfg.write_text(text)
    daemon = start_daemon(cfg, d / "daemon.log", fake_engines=True, timeout=60)
    bridge = start_bridge(cfg, d / "bridge.log")
    yield {"dir": d, "cfg": cfg, "daemon": daemon, "bridge": bridge}
    bridge.stop()
    daemon.stop()


EXTRA_TRAVERSAL = ["/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/..;/server.py", "/static%2f..%2fserver.py",
                   "/%c0%ae%c0%ae/server.py", "/index.html/..", "/index.html/../../server.py",
                   "/%5c..%5cserver.py", "/.%2e/server.py", "/%2e%2e", "/app.js%2f..%2f..%2fserver.py",
                   "/..%00/server.py", "/%u002e%u002e/server.py", "/....//server.py", "/..\\server.py"]


@pytest.mark.parametrize("path", EXTRA_TRAVERSAL)
def test_more_traversal_variants(secure, path):
    status, _, body = http_get(secure["bridge"].port, path)
    assert status in (400, 404), (path, status, body[:200])


def _origin_cases(port: int) -> List[str]:
    return ["null", f"http://127.0.0.1:{port}.evil.example", f"http://evil.example@127.0.0.1:{port}",
            f"ws://127.0.0.1:{port}", f"file://127.0.0.1:{port}", f"http://127.0.0.1:{port}/../x",
            f"http://127.0.0.2:{port}", f"https://127.0.0.1:{port + 1}"]


def test_foreign_origins_refused(secure):
    b = secure["bridge"]

    async def go():
        own = await WSClient.open(b.ws, origin=f"http://127.0.0.1:{b.port}")
        await own.wait_event("hello")
        await own.close()
        for origin in _origin_cases(b.port):
            with pytest.raises(InvalidStatus) as e:
                await WSClient.open(b.ws, origin=origin)
            assert e.value.response.status_code == 403, origin

    run(go())


def test_dns_rebinding_refused(secure):
    """evil.example resolves to 127.0.0.1 in the victim's browser: its page's Origin and the
    Host header agree, so "same origin" alone would let it in."""
    b = secure["bridge"]

    def as_browser(host: str):
        # What the browser does after the rebinding: connect to 127.0.0.1, say Host: <name>.
        s = socket.create_connection(("127.0.0.1", b.port))
        return WSClient.open(f"ws://{host}/ws", origin=f"http://{host}", sock=s)

    async def go():
        for host in (f"evil.example:{b.port}", f"127.0.0.1.nip.io:{b.port}", f"localhost.evil.example:{b.port}"):
            with pytest.raises(InvalidStatus) as e:
                await as_browser(host)
            assert e.value.response.status_code == 403, host
        # the machine's own names still work
        for host in (f"localhost:{b.port}", f"127.0.0.1:{b.port}", f"app.localhost:{b.port}",
                     f"{socket.gethostname()}:{b.port}"):
            c = await as_browser(host)
            await c.wait_event("hello")
            await c.close()

    run(go())


def test_token_variants_refused(secure):
    b = secure["bridge"]

    async def go():
        for q in (f"?token={TOKEN[:-1]}", f"?token={TOKEN}x", f"?token={TOKEN.upper()}",
                  f"?token=%20{TOKEN}", f"?token={TOKEN}", "?token="):
            with pytest.raises(InvalidStatus) as e:
                await WSClient.open(b.ws + q)
            assert e.value.response.status_code == 400, q  # never in the URL, right or wrong
        for first in ({"type": "stop", "token": TOKEN}, {"type": "start", "token": 12345},
                      {"type": "start", "token": [TOKEN]}, {"type": "text", "text": "hi", "token": TOKEN + " "},
                      {"type": "start"}):
            c = await WSClient.open(b.ws)
            await c.send_json(first)
            await c.wait(lambda: c.closed is not None, 5, "close")
            assert c.closed.rcvd.code == 1008 and c.closed.rcvd.reason == "unauthorized", first
            assert [e["code"] for e in c.of("error")] == ["unauthorized"]
            assert not c.of("ready") and not c.of("agent_done")

    run(go())


def test_secrets_never_logged_or_shown(secure, agent, fixtures_dir):
    b, dmn, cfg = secure["bridge"], secure["daemon"], secure["cfg"]
    seen: List[str] = []

    async def go():
        # token in the start message; speech and typed turns reach the agent with the key
        c = await WSClient.open(b.ws)
        await c.send_json({"type": "start", "language": "zh", "token": TOKEN})
        await c.wait_event("ready")
        await c.stream(silence(0.3) + read_pcm(fixtures_dir / "zh" / "01.wav") + silence(1.0))
        await c.wait_event("agent_done", 1, 20)
        await c.send_json({"type": "text", "text": "你好"})
        await c.wait_event("agent_done", 2, 20)
        await c.wait(lambda: c.audio(), 10, "audio")
        await c.close()
        # token in the first message
        c2 = await WSClient.open(b.ws)
        await c2.send_json({"type": "text", "text": "再来一次", "token": TOKEN})
        await c2.wait_event("agent_done", 1, 20)
        await c2.close()
        # refused attempts with near-miss tokens
        with pytest.raises(InvalidStatus):
            await WSClient.open(b.ws + f"?token={TOKEN[:-2]}")
        c3 = await WSClient.open(b.ws)
        await c3.send_json({"type": "start", "token": TOKEN[:-3]})
        await c3.wait(lambda: c3.closed is not None, 5, "close")
        # the agent fails mid-reply
        agent.reset(script=["第一句。第二句永远不会说完"], fail_mode="http500")
        c4 = await WSClient.open(b.ws)
        await c4.send_json({"type": "text", "text": "出错吧", "token": TOKEN})
        await c4.wait_event("error", 1, 10)
        await c4.close()
        agent.reset(script=["好的，没问题。"])
        for cl in (c, c2, c3, c4):
            seen.extend(json.dumps(e, ensure_ascii=False) for _, e in cl.events if isinstance(e, dict))

    run(go(), 120)
    assert agent.auth and all(a == f"Bearer {API_KEY}" for a in agent.auth), set(agent.auth)
    assert len(agent.auth) >= 4
    status, _, body = http_get(b.port, "/healthz")
    seen.append(body.decode())
    asr, tts = (f"ipc://{secure['dir']}/run/asr.sock", f"ipc://{secure['dir']}/run/tts.sock")
    outputs = []
    for args in (["-m", "daemon.tools.ctl", "--asr", asr, "--tts", tts, "health", "--json"],
                 ["-m", "daemon.tools.ctl", "--asr", asr, "--tts", tts, "health"],
                 ["-m", "daemon", "--config", str(cfg), "--check-config"],
                 ["-m", "bridge", "--config", str(cfg), "--probe-agent", "-v"]):
        r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={k: v for k, v in os.environ.items() if k not in ("S2S_CONFIG",)})
        outputs.append(r.stdout + r.stderr)
    assert "engine=fake" in outputs[1] and "config:" in outputs[2]
    logs = {"daemon.log": dmn.text(), "bridge.log": b.text()}
    assert "DEBUG" in logs["daemon.log"] and "DEBUG" in logs["bridge.log"]
    everything = {**logs, "events": "\n".join(seen), **{f"output{i}": o for i, o in enumerate(outputs)}}
    for name, text in everything.items():
        for secret in (TOKEN, API_KEY, TOKEN[:12], API_KEY[:12]):
            assert secret not in text, f"{secret[:6]}... appears in {name}: " + \
                text[max(0, text.find(secret) - 200):text.find(secret) + 60]
