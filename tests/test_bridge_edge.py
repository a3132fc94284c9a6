"""The bridge's edge against hostile browsers and agents (issue 14): each defect reproduced on
the old bridge has its regression test here.

Real processes: `python -m daemon` on the FAKE engines (tests/fake_engines.py; this is about
the bridge, not speech), `python -m bridge` subprocesses, the FAKE agent server
(tests/fake_langgraph.py) on loopback HTTP and websockets clients.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

import pytest
from websockets.exceptions import InvalidStatus

from bridge_procs import ROOT, start_bridge, start_daemon, write_config
from fake_langgraph import FakeAgentServer
from helpers.ws import WSClient, http_get, metrics, read_pcm, silence

TOKEN = "edge-token-0123456789"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def run(coro, timeout: float = 120.0):
    async def guarded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(guarded())


@pytest.fixture(scope="module")
def agent_srv():
    with FakeAgentServer(script=["好的。"]) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset_agent(agent_srv):
    agent_srv.reset(script=["好的。"], token_delay=0.0, first_token_delay=0.0)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, models_dir):
    d = tmp_path_factory.mktemp("edge")
    # 100+ connections at once, each an ASR stream: past what admission by predicted cost lets in
    # at one instant (tests/test_capacity.py), so it is off here; these tests are about the bridge.
    cfg = write_config(d / "daemon.yaml", models_dir, d / "run", limits={"max_sessions": 160, "max_asr_load": 0})
    proc = start_daemon(cfg, d / "daemon.log", fake_engines=True, timeout=60)
    yield d, proc
    proc.stop()


def _bridge(daemon, models_dir, name: str, bridge: Dict[str, Any], agent: Dict[str, Any]):
    d, _ = daemon
    cfg = write_config(d / f"{name}.yaml", models_dir, d / "run", bridge=bridge, agent=agent)
    return start_bridge(cfg, d / f"{name}.log")


@pytest.fixture(scope="module")
def open_bridge(daemon, models_dir, agent_srv):
    """No token; tight per-connection limits; openai agent (fake) with a small reply cap."""
    b = _bridge(daemon, models_dir, "open", {"max_connections": 160, "max_connections_per_ip": 150,
                                             "idle_timeout": 2.0, "max_turns_per_minute": 3,
                                             "max_reply_chars": 40, "max_reply_tokens": 64},
                {"kind": "openai", "url": agent_srv.url, "model": "edge-model", "timeout": 3.0})
    yield b
    assert b.stop() == 0, b.text()[-3000:]


@pytest.fixture(scope="module")
def token_bridge(daemon, models_dir, agent_srv):
    """Token required, 1.5 s login window, two connections per address, langgraph agent (fake)."""
    b = _bridge(daemon, models_dir, "token", {"token": TOKEN, "login_timeout": 1.5, "max_connections_per_ip": 2},
                {"kind": "langgraph", "url": agent_srv.url, "assistant_id": "secret-assistant", "timeout": 3.0,
                 "api_key": "sk-edge-key"})
    yield b
    assert b.stop() == 0, b.text()[-3000:]


def _no_errors_logged(b) -> None:
    text = b.text()
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]


# --- 1. lone surrogates --------------------------------------------------------------------------


def test_lone_surrogates_are_bad_messages_and_the_connection_lives(open_bridge, token_bridge):
    """`\\ud800` in JSON is valid JSON but no valid Unicode: it used to crash the websockets send
    (1006), the daemon client's encoder (1011) and the token check (ERROR traceback before login)."""
    async def go():
        c = await WSClient.open(open_bridge.ws)
        await c.wait_event("hello")
        # json.dumps escapes a lone surrogate as \ud800: exactly what a hostile page can send.
        await c.ws.send(json.dumps({"type": "text", "text": "hi \ud800"}))
        await c.ws.send(json.dumps({"type": "start", "language": "zh", "hotwords": ["\udc00abc"]}))
        await c.ws.send(json.dumps({"type": "start", "language": "zh\udfff"}))
        await c.ws.send(json.dumps({"type": "text", "\ud83d": "key"}))
        await c.ws.send(json.dumps({"type": "dance\ud800"}))
        await c.wait(lambda: len(c.of("error")) >= 5, 5, "5 errors")
        assert [e["code"] for e in c.of("error")] == ["bad_message"] * 5, c.of("error")
        assert not c.of("agent_done") and not c.of("ready")
        # still alive: a start with good hotwords and a typed turn work on the same connection
        await c.send_json({"type": "start", "language": "zh", "hotwords": ["你好"]})
        await c.wait_event("ready")
        await c.send_json({"type": "text", "text": "还在吗"})
        await c.wait_event("agent_done", 1, 10)
        assert c.closed is None
        await c.close()

        # before login: a surrogate token is a bad message, not a traceback; the login goes on
        t = await WSClient.open(token_bridge.ws)
        await t.wait_event("hello")
        await t.ws.send(json.dumps({"type": "start", "token": "\ud800" + TOKEN}))
        err = await t.wait_event("error")
        assert err["code"] == "bad_message", err
        await t.send_json({"type": "start", "language": "zh", "token": TOKEN})
        await t.wait_event("ready")
        await t.close()

    run(go())
    _no_errors_logged(open_bridge)
    _no_errors_logged(token_bridge)


# --- 2. open by default, global caps only ---------------------------------------------------------


def test_per_address_connection_cap(token_bridge):
    async def go():
        # The cap counts logged-in connections (issue 23: those waiting to log in have their own
        # budget, tests/test_reliability3_bridge.py); the third login from the address is refused.
        a = await WSClient.open(token_bridge.ws)
        b = await WSClient.open(token_bridge.ws)
        for c in (a, b):
            await c.send_json({"type": "text", "text": "你好", "token": TOKEN})
            await c.wait_event("agent_done", 1, 10)
        extra = await WSClient.open(token_bridge.ws)
        await extra.send_json({"type": "text", "text": "你好", "token": TOKEN})
        await extra.wait(lambda: extra.closed is not None, 5, "close")
        assert extra.closed.rcvd.code == 1013 and "address" in extra.closed.rcvd.reason
        assert not extra.of("agent_done")
        await a.close()
        await asyncio.sleep(0.3)
        again = await WSClient.open(token_bridge.ws)
        await again.send_json({"type": "text", "text": "你好", "token": TOKEN})
        await again.wait_event("agent_done", 1, 10)
        await again.close()
        await b.close()

    run(go())
    assert metrics(token_bridge.port)['s2s_bridge_refused_total{reason="per_address"}'] >= 1


def test_login_window_is_configured_and_short(token_bridge):
    async def go():
        t0 = time.monotonic()
        c = await WSClient.open(token_bridge.ws)
        await c.wait(lambda: c.closed is not None, 5, "close")
        took = time.monotonic() - t0
        assert 1.2 < took < 4.0, took
        assert c.closed.rcvd.code == 1008
        assert [e["code"] for e in c.of("error")] == ["login_timeout"]

    run(go())
    assert metrics(token_bridge.port)['s2s_bridge_errors_total{code="login_timeout",source="bridge"}'] >= 1


def test_idle_connections_are_closed(open_bridge):
    async def go():
        c = await WSClient.open(open_bridge.ws)
        await c.wait_event("hello")
        busy = await WSClient.open(open_bridge.ws)
        await busy.wait_event("hello")
        t0 = time.monotonic()
        # one keeps talking (silence is still audio), the other says nothing
        await busy.send_json({"type": "start", "language": "zh"})
        await busy.wait_event("ready")
        while c.closed is None and time.monotonic() - t0 < 6:
            await busy.ws.send(silence(0.04))
            await asyncio.sleep(0.04)
        assert c.closed is not None and 1.5 < time.monotonic() - t0 < 5
        assert c.closed.rcvd.code == 1000 and c.closed.rcvd.reason == "idle timeout"
        assert [e["code"] for e in c.of("error")] == ["idle_timeout"]
        assert busy.closed is None
        await busy.close()

    run(go())


def test_typed_turns_are_rate_limited(open_bridge, agent_srv):
    async def go():
        c = await WSClient.open(open_bridge.ws)
        await c.wait_event("hello")
        for i in range(5):
            await c.send_json({"type": "text", "text": f"第{i}个问题"})
        await c.wait(lambda: len(c.of("error")) >= 2, 5, "2 errors")
        assert [e["code"] for e in c.of("error")] == ["rate_limited"] * 2
        assert len(c.of("user_text")) == 3
        await c.close()

    before = metrics(open_bridge.port).get('s2s_bridge_turns_total{source="text"}', 0)
    run(go())
    # three turns started (each typed one interrupts the one before), not five
    assert metrics(open_bridge.port)['s2s_bridge_turns_total{source="text"}'] - before == 3


def test_no_token_refuses_a_non_loopback_address(tmp_path, models_dir):
    cfg = write_config(tmp_path / "c.yaml", models_dir, tmp_path / "run", bridge={"host": "0.0.0.0"})
    r = subprocess.run([sys.executable, "-m", "bridge", "--config", str(cfg)], cwd=ROOT, capture_output=True,
                       text=True, timeout=30, env={k: v for k, v in os.environ.items() if k != "S2S_CONFIG"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "bridge.token" in r.stderr


# --- 3. nothing about the agent or the daemon before login -------------------------------------------


SECRETS = ("secret-assistant", "sk-edge-key", "127.0.0.1:", "ipc://", "/run/")


def test_nothing_before_login(token_bridge, agent_srv):
    async def go():
        c = await WSClient.open(token_bridge.ws)
        hello = await c.wait_event("hello")
        await c.close()
        return hello

    hello = run(go())
    text = json.dumps(hello)
    for s in SECRETS + (agent_srv.url,):
        assert s not in text, (s, hello)
    assert hello["agent"]["kind"] == "langgraph" and hello["auth_required"] is True
    status, _, body = http_get(token_bridge.port, "/healthz")
    h = json.loads(body)
    for s in SECRETS + (agent_srv.url, "detail", "rtt_ms", "reason"):
        assert s not in body.decode(), (s, h)
    assert status == 200 and h["status"] == "ok"
    # what the page shows with no token: engines and fallbacks (component, from, to)
    assert h["daemon"]["engines"]["asr"]["engine"] and h["daemon"]["engines"]["tts"]["engine"]
    assert isinstance(h["daemon"]["fallbacks"], list)
    # the token opens the detail
    status, _, body = http_get(token_bridge.port, "/healthz", {"Authorization": f"Bearer {TOKEN}"})
    h = json.loads(body)
    assert h["agent"]["url"] == agent_srv.url and h["daemon"]["asr"]["reachable"] and "counters" in h
    status, _, body = http_get(token_bridge.port, "/healthz", {"Authorization": "Bearer wrong"})
    assert "url" not in json.loads(body)["agent"]


def test_healthz_without_daemon_says_status_only(tmp_path, models_dir):
    cfg = write_config(tmp_path / "c.yaml", models_dir, tmp_path / "run-nothing")
    b = start_bridge(cfg, tmp_path / "bridge.log")
    try:
        status, _, body = http_get(b.port, "/healthz")
    finally:
        b.stop()
    h = json.loads(body)
    assert status == 503 and h["status"] == "degraded" and h["daemon"]["reachable"] is False
    assert "ipc://" not in body.decode() and "socket" not in body.decode() and "error" not in h["daemon"]


# --- 4. agent output bounded, never silently empty ------------------------------------------------------


def test_agent_reply_is_capped(open_bridge, agent_srv):
    agent_srv.reset(script=["这是一个非常非常长的回答。" * 20], token_delay=0.02)

    async def go():
        c = await WSClient.open(open_bridge.ws)
        await c.send_json({"type": "text", "text": "说很多"})
        done = await c.wait_event("agent_done", 1, 10)
        assert done["truncated"] is True and len(done["text"]) <= 40, done
        assert sum(len(e["text"]) for e in c.of("agent_delta")) <= 40
        err = c.of("error")[0]
        assert err["code"] == "reply_too_long" and err["source"] == "agent"
        await c.close()

    run(go())
    assert agent_srv.requests_bodies[0]["max_tokens"] == 64
    # the stream was closed at the cap, not read to the end
    assert agent_srv.wait_for(lambda: agent_srv.runs and agent_srv.runs[0].disconnected, 5)


@pytest.mark.parametrize("mode", ["plainjson", "html"])
def test_a_reply_that_is_not_an_event_stream_is_an_error(open_bridge, agent_srv, mode):
    agent_srv.reset(fail_mode=mode)

    async def go():
        c = await WSClient.open(open_bridge.ws)
        await c.send_json({"type": "text", "text": "你好"})
        done = await c.wait_event("agent_done", 1, 10)
        err = c.of("error")
        assert err and err[0]["source"] == "agent" and err[0]["code"] == "bad_reply", err
        assert done["error"] == "bad_reply"
        await c.wait(lambda: c.of("tts_start"), 10, "spoken apology")
        await c.close()

    run(go())


def test_langgraph_threads_are_deleted(token_bridge, agent_srv):
    async def go():
        c = await WSClient.open(token_bridge.ws)
        await c.send_json({"type": "text", "text": "你好", "token": TOKEN})
        await c.wait_event("agent_done", 1, 10)
        await c.close()

    run(go())
    assert agent_srv.wait_for(lambda: any(r.startswith("DELETE /threads/") for r in agent_srv.requests), 5), \
        agent_srv.requests
    assert not agent_srv.threads


def test_whole_reply_has_a_deadline(daemon, models_dir, agent_srv):
    """agent.timeout bounds the gaps; bridge.reply_timeout bounds the whole reply."""
    agent_srv.reset(script=["一二三四五六七八九十" * 3], token_delay=0.2)
    b = _bridge(daemon, models_dir, "deadline", {"reply_timeout": 1.0},
                {"kind": "langgraph", "url": agent_srv.url, "timeout": 3.0})
    try:
        async def go():
            c = await WSClient.open(b.ws)
            t0 = time.monotonic()
            await c.send_json({"type": "text", "text": "慢慢说"})
            done = await c.wait_event("agent_done", 1, 10)
            assert done["error"] == "timeout" and time.monotonic() - t0 < 3.0
            await c.close()

        run(go())
    finally:
        b.stop()


# --- 5. token in the URL ----------------------------------------------------------------------------------


def test_token_in_the_url_is_refused(token_bridge):
    async def go():
        with pytest.raises(InvalidStatus) as e:
            await WSClient.open(token_bridge.ws + f"?token={TOKEN}")
        assert e.value.response.status_code == 400
        assert b"first message" in e.value.response.body
        with pytest.raises(InvalidStatus):
            await WSClient.open(token_bridge.ws + "?token=wrong")

    run(go())
    page = http_get(token_bridge.port, "/app.js")[2].decode()
    assert "?token=${" not in page and 'params.get("token")' not in page and "location.hash" in page


# --- shape: one daemon client per bridge process -------------------------------------------------------------


def _fds(pid: int) -> Dict[str, int]:
    kinds: Dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kinds[target.split(":")[0]] = kinds.get(target.split(":")[0], 0) + 1
    return kinds


def test_browser_connections_use_no_zeromq_socket_of_their_own(open_bridge):
    """100 open connections, each with its ASR session open: only their TCP sockets are added."""
    pid = open_bridge.p.pid

    async def go():
        warm = await WSClient.open(open_bridge.ws)
        await warm.send_json({"type": "start", "language": "zh"})
        await warm.wait_event("ready")
        await asyncio.sleep(0.3)
        before = _fds(pid)
        clients = []
        for _ in range(100):
            c = await WSClient.open(open_bridge.ws)
            await c.send_json({"type": "start", "language": "zh"})
            clients.append(c)
        for c in clients:
            await c.wait_event("ready", 1, 20)
            await c.ws.send(silence(0.2))
        await asyncio.sleep(0.5)
        after = _fds(pid)
        for c in clients + [warm]:
            await c.close()
        return before, after

    before, after = run(go())
    total = sum(after.values()) - sum(before.values())
    sockets = after.get("socket", 0) - before.get("socket", 0)
    assert total <= 100 + 2 and sockets <= 100 + 2, (before, after)


# --- /metrics --------------------------------------------------------------------------------------------------


def test_metrics_after_one_spoken_turn(open_bridge):
    async def go():
        c = await WSClient.open(open_bridge.ws)
        await c.send_json({"type": "start", "language": "zh"})
        await c.wait_event("ready")
        await c.stream(silence(0.3) + read_pcm(FIXTURES / "zh" / "01.wav") + silence(1.0))
        await c.wait_event("final", 1, 20)
        await c.wait_event("first_audio", 1, 20)
        await c.close()

    run(go())
    m = metrics(open_bridge.port)
    assert m["s2s_bridge_asr_final_latency_seconds_count"] >= 1
    assert m["s2s_bridge_first_audio_latency_seconds_count"] >= 1
    assert m['s2s_bridge_turns_total{source="speech"}'] >= 1
    assert m["s2s_bridge_connections_total"] >= 1 and "s2s_bridge_connections_open" in m
    assert m["s2s_daemon_up"] == 1 and any(k.startswith("s2s_daemon_") and k.endswith("_total") for k in m)


# --- the daemon's chunk limit (issue 27, item 8) -------------------------------------------------------------


def test_audio_goes_to_the_daemon_in_chunks_it_takes(tmp_path, models_dir):
    """The bridge frames audio in 200 ms steps; a daemon whose limits.max_chunk_seconds is
    smaller (advertised in `opened`) refused every one of them (bad_audio) and nothing was
    recognised. The bridge now sends at most what `opened` says."""
    cfg = write_config(tmp_path / "daemon.yaml", models_dir, tmp_path / "run", limits={"max_chunk_seconds": 0.1})
    proc = start_daemon(cfg, tmp_path / "daemon.log", fake_engines=True, timeout=60)
    b = start_bridge(write_config(tmp_path / "bridge.yaml", models_dir, tmp_path / "run", agent={"kind": "echo"}),
                     tmp_path / "bridge.log")
    try:
        async def go():
            c = await WSClient.open(b.ws)
            await c.send_json({"type": "start", "language": "zh"})
            await c.wait_event("ready")
            await c.stream(silence(0.3) + read_pcm(FIXTURES / "zh" / "01.wav") + silence(1.0))
            final = await c.wait_event("final", 1, 20)
            await c.close()
            return final, c.of("error")

        final, errors = run(go())
        assert final["text"] and not errors, errors

        # The adapters' shared path (bridge/speech.py: Wyoming, the OpenAI API) frames the same way.
        import yaml

        from bridge.daemon_link import DaemonLink
        from bridge.speech import Transcription
        from daemon.config import parse_config

        async def adapter():
            link = DaemonLink(parse_config(yaml.safe_load(cfg.read_text(encoding="utf-8"))))
            await link.start()
            try:
                t = Transcription(link, "edge", language="zh")
                await t.open()
                await t.feed(silence(0.3) + read_pcm(FIXTURES / "zh" / "01.wav") + silence(1.0))
                return await t.finish()
            finally:
                await link.close()

        assert run(adapter()).text
    finally:
        b.stop()
        proc.stop()


# --- TLS --------------------------------------------------------------------------------------------------------


def _self_signed(d: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s2s test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    os.chmod(d / "key.pem", 0o600)
    return d / "cert.pem", d / "key.pem"


def test_page_and_websocket_over_tls(daemon, models_dir, tmp_path):
    cert, key = _self_signed(tmp_path)
    b = _bridge(daemon, models_dir, "tls", {"tls_cert": str(cert), "tls_key": str(key)}, {"kind": "echo"})
    ctx = ssl.create_default_context(cafile=str(cert))
    try:
        assert "serving https://" in b.text()
        status, headers, body = http_get(b.port, "/", ssl_context=ctx)
        assert status == 200 and b"app.js" in body
        assert "wss:" in headers["content-security-policy"]

        async def go():
            c = await WSClient.open(f"wss://127.0.0.1:{b.port}/ws", ssl=ctx)
            await c.send_json({"type": "text", "text": "加密的"})
            assert (await c.wait_event("agent_done", 1, 10))["text"] == "你说的是：加密的"
            await c.wait(lambda: c.audio(), 10, "audio")
            await c.close()

        run(go())
        # plain http on the TLS port is not served
        with pytest.raises(Exception):
            http_get(b.port, "/")
    finally:
        b.stop()
