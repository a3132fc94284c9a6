"""CURVE on tcp:// (issue 29): keys made by `s2s-ctl keys`, their modes checked at start, a real
daemon (`python -m daemon` on the FAKE engines, tests/fake_engines.py: this is about the
transport) serving CURVE on loopback tcp, clients with and without the right keys, and plain
tcp:// on a non-loopback address refused unless the config says so."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from daemon.wire import protocol as P
from daemon.wire import curve as C
from daemon_harness import ROOT, DaemonProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_keys(d: Path, *clients: str) -> Path:
    r = subprocess.run([sys.executable, "-m", "daemon.tools.ctl", "keys", "--dir", str(d),
                        *[a for c in clients for a in ("--client", c)]],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return d


def ping_with(endpoint: str, keys: "tuple[bytes, bytes] | None", server: "bytes | None",
              timeout: float = 1.5) -> bool:
    """One raw DEALER: a ping answered within `timeout` seconds?"""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    # A refused handshake may leave the DEALER with no pipe for a moment, and a send then blocks
    # (it hung the suite for 600 s once): a send not taken within the timeout is no answer.
    s.sndtimeo = int(timeout * 1000)
    if keys is not None:
        s.curve_publickey, s.curve_secretkey = keys
        s.curve_serverkey = server
    try:
        s.connect(endpoint)
        try:
            s.send_multipart(P.dealer_frames(P.Ping(request_id="p1")))
        except zmq.Again:
            return False
        if not s.poll(int(timeout * 1000)):
            return False
        return isinstance(P.decode_reply(P.split_dealer(s.recv_multipart())), P.Pong)
    finally:
        s.close()


def test_endpoint_loopback_rule():
    for ep in ("tcp://127.0.0.1:5555", "tcp://127.8.9.1:1", "tcp://localhost:5555", "tcp://[::1]:5555"):
        assert C.is_loopback(ep), ep
    for ep in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.0.0.2:5555", "tcp://speech-host:5555",
               "tcp://[::]:5555", "ipc:///run/s2s/asr.sock"):
        assert not C.is_loopback(ep), ep


def test_keys_command_writes_secret_keys_0600_and_admits_each_client(tmp_path):
    d = make_keys(tmp_path / "curve", "client", "bridge2")
    mode = lambda p: oct(os.stat(p).st_mode & 0o777)  # noqa: E731
    for name in ("server", "client", "bridge2"):
        assert mode(d / f"{name}.key_secret") == "0o600"
        assert mode(d / f"{name}.key") == "0o644"
    assert sorted(p.name for p in (d / "clients").iterdir()) == ["bridge2.key", "client.key"]
    server = C.load_secret(d / "server.key_secret")
    make_keys(d)  # run again: the daemon's keypair is kept (clients hold its public key)
    assert C.load_secret(d / "server.key_secret") == server


def test_a_secret_key_open_to_others_is_refused(tmp_path):
    d = make_keys(tmp_path / "curve")
    os.chmod(d / "client.key_secret", 0o644)
    with pytest.raises(C.CurveError, match=r"client.key_secret is open to others \(mode 0644\)"):
        C.client_policy(str(d), "client", False, {})
    os.chmod(d / "clients", 0o777)
    with pytest.raises(C.CurveError, match="may be written by others"):
        C.clients_dir(d)


def test_a_client_refuses_plain_tcp_to_a_non_loopback_daemon():
    s = zmq.Context.instance().socket(zmq.DEALER)
    try:
        C.set_policy(C.ClientPolicy())
        with pytest.raises(C.CurveError, match="plain tcp:// to tcp://10.1.2.3:5555 .* is refused"):
            C.secure_client(s, "tcp://10.1.2.3:5555")
        C.secure_client(s, "tcp://127.0.0.1:5555")  # loopback: allowed
        C.set_policy(C.ClientPolicy(allow_plain_tcp=True))
        C.secure_client(s, "tcp://10.1.2.3:5555")
    finally:
        C.set_policy(C.ClientPolicy())
        s.close()


def _exits_1(tmp_path: Path, models_dir: Path, daemon: dict, cluster: dict) -> str:
    p = DaemonProcess(tmp_path, {"models_root": str(models_dir), "daemon": daemon, "cluster": cluster},
                      watchdog_usec=10_000_000)
    try:
        rc = p.proc.wait(30)
    except subprocess.TimeoutExpired:
        log = p.log()
        p.stop()
        raise AssertionError(f"the daemon started:\n{log[-3000:]}") from None
    log = p.log()
    p.stop()
    assert rc == 1, (rc, log[-3000:])
    lines = [line for line in log.splitlines() if "cannot bind" in line]
    assert len(lines) == 1, log[-3000:]
    return lines[0]


def test_the_daemon_refuses_plain_tcp_off_loopback_and_an_open_secret_key(tmp_path, models_dir):
    ep = f"tcp://0.0.0.0:{free_port()}"
    line = _exits_1(tmp_path / "plain", models_dir, {"asr_endpoint": ep}, {})
    assert ep in line and "plain tcp:// on a non-loopback address is refused" in line, line
    d = make_keys(tmp_path / "curve")
    os.chmod(d / "server.key_secret", 0o640)
    ep = f"tcp://127.0.0.1:{free_port()}"
    line = _exits_1(tmp_path / "open", models_dir, {"asr_endpoint": ep}, {"curve_dir": str(d)})
    assert "server.key_secret is open to others (mode 0640)" in line, line


def test_plain_tcp_off_loopback_is_served_when_the_config_says_so(tmp_path, models_dir):
    port = free_port()
    p = DaemonProcess(tmp_path, {"models_root": str(models_dir), "daemon": {"asr_endpoint": f"tcp://0.0.0.0:{port}"},
                                 "cluster": {"allow_plain_tcp": True}}, watchdog_usec=10_000_000)
    try:
        p.wait_ready(60)
        assert ping_with(f"tcp://127.0.0.1:{port}", None, None)
        assert "plain tcp:// on a non-loopback address (cluster.allow_plain_tcp)" in p.log()
    finally:
        p.stop()


def test_curve_daemon_admits_its_clients_only_and_says_each_refusal_once(tmp_path, models_dir):
    d = make_keys(tmp_path / "curve", "client")
    other = make_keys(tmp_path / "other", "client")  # another installation's keys
    asr, tts = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    p = DaemonProcess(tmp_path / "d", {"models_root": str(models_dir),
                                       "daemon": {"asr_endpoint": asr, "tts_endpoint": tts},
                                       "cluster": {"curve_dir": str(d)}}, watchdog_usec=10_000_000)
    try:
        p.wait_ready(60)
        server = C.load_public(d / "server.key")
        client = C.load_secret(d / "client.key_secret")
        stranger = C.load_secret(other / "client.key_secret")
        wrong_server = C.load_public(other / "server.key")
        for ep in (asr, tts):
            assert ping_with(ep, client, server), ep
        for _ in range(3):  # each refused, however often it tries
            assert not ping_with(asr, stranger, server, 0.7), "a client key not in clients/ got an answer"
            assert not ping_with(asr, client, wrong_server, 0.7), "a client with a wrong server key got an answer"
        # libzmq reports about 4 in 10 plain clients as a hang-up mid-handshake (the client saw the
        # mismatch first and closed; CI once drew three in a row): try until the mismatch is seen.
        for _ in range(12):
            assert not ping_with(asr, None, None, 0.7), "a client without CURVE got an answer"
            if "refused a client without CURVE" in p.log():
                break
        assert ping_with(asr, client, server)
        time.sleep(0.5)
        log = p.log()
        for what in ("refused a client without CURVE", "refused a CURVE client whose public key is not in",
                     "refused a CURVE client whose handshake does not decrypt (a wrong server key"):
            lines = [line for line in log.splitlines() if what in line]
            assert len(lines) == 1, (what, log[-3000:])
            assert asr in lines[0], lines[0]
        hangups = [line for line in log.splitlines() if "hung up during the CURVE handshake" in line]
        assert len(hangups) <= 1, hangups
        assert "(CURVE)" in log and "1 client key(s) admitted" in log
    finally:
        p.stop()


def test_the_front_ends_and_ctl_speak_curve_with_the_keys_the_config_names(tmp_path, models_dir):
    """The real clients: `s2s-ctl --config` (blocking) and a bridge (asyncio) with cluster.curve_dir
    reach a CURVE daemon on tcp://; s2s-ctl with another installation's keys gets no answer; a
    bridge whose config names plain tcp:// to a non-loopback daemon refuses to start."""
    import asyncio

    import yaml

    from bridge_procs import start_bridge, write_config
    from test_scaleout_haproxy import spoken

    d = make_keys(tmp_path / "curve", "client")
    other = make_keys(tmp_path / "other", "client")
    asr, tts = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    p = DaemonProcess(tmp_path / "d", {"models_root": str(models_dir),
                                       "daemon": {"asr_endpoint": asr, "tts_endpoint": tts},
                                       "cluster": {"curve_dir": str(d)}}, watchdog_usec=10_000_000)
    bridge = None
    try:
        p.wait_ready(60)
        ctl = [sys.executable, "-m", "daemon.tools.ctl", "--config", str(p.config_path), "--timeout", "3", "health"]
        r = subprocess.run(ctl, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        stranger = tmp_path / "stranger.yaml"
        stranger.write_text(yaml.safe_dump({**p.config, "cluster": {"curve_dir": str(other)}}))
        r = subprocess.run(ctl[:3] + ["--config", str(stranger), "--timeout", "2", "health"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, r.stdout
        cfg = write_config(tmp_path / "bridge.yaml", models_dir, tmp_path / "run", agent={"kind": "echo"})
        data = yaml.safe_load(cfg.read_text())
        data["daemon"].update(asr_endpoint=asr, tts_endpoint=tts)
        data["cluster"] = {"curve_dir": str(d)}
        cfg.write_text(yaml.safe_dump(data))
        bridge = start_bridge(cfg, tmp_path / "bridge.log")

        async def turn():
            page = await spoken(bridge.ws)
            await page.close()

        asyncio.run(asyncio.wait_for(turn(), 60))
        data["daemon"].update(asr_endpoint="tcp://10.255.0.1:5555")
        data["cluster"] = {}
        cfg.write_text(yaml.safe_dump(data))
        r = subprocess.run([sys.executable, "-m", "bridge", "--config", str(cfg)], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0 and "plain tcp:// to tcp://10.255.0.1:5555 (not loopback) is refused" in r.stderr, \
            r.stderr[-2000:]
    finally:
        if bridge is not None:
            bridge.stop()
        p.stop()


def test_each_failed_handshake_event_is_named_for_what_the_client_did():
    """libzmq says a plain client either as a mechanism mismatch or (about 4 in 10 here) as a
    hang-up mid-handshake with an errno: the second is not a "ZMTP error 0x20"."""
    from daemon.serving import curve as SC
    assert SC.refusal(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, SC.MISMATCH, "/k")[0] == "plain"
    assert SC.refusal(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, SC.CRYPTO, "/k")[0] == "server_key"
    assert SC.refusal(zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400, "/k")[0] == "client_key"
    kind, what = SC.refusal(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 32, "/k")
    assert kind == "hangup" and "errno 32" in what and "ZMTP error" not in what, what
