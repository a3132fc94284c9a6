"""Several bridges behind HAProxy (issue 29), with real processes on loopback: the shipped
etc/haproxy/s2s.cfg (its addresses and Debian's daemon-only global lines replaced), a real
`haproxy`, two bridges (`python -m bridge`), each with its own daemon (`python -m daemon` on the
FAKE engines, tests/fake_engines.py: this is about spreading and failing over, not speech),
echo agents.

- Websocket sessions opened through HAProxy are spread over both bridges (leastconn) and every
  one gets its final.
- One daemon killed with -9: every page on its bridge gets an `unavailable` error within 1 s,
  the pages on the other bridge get nothing; that bridge's /healthz says 503 with its daemon
  unreachable, HAProxy's health check takes the bridge out, and every new session goes to the
  survivor and gets its final.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List

import pytest

from bridge_procs import start_bridge, start_daemon, write_config
from daemon.tools.bench.stack import Proc
from daemon.wire.client import ASRClient
from helpers.ws import WSClient, read_pcm, silence

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "etc" / "haproxy" / "s2s.cfg"
SPEECH = read_pcm(Path(__file__).resolve().parent / "fixtures" / "zh" / "01.wav")
SESSIONS = 32
# Settings of Debian's global section that need root (or a system path); dropped in the test.
ROOT_ONLY = ("chroot", "user", "group", "daemon", "stats socket", "log /dev/log")


def need_haproxy() -> None:
    """As tests/test_ops.py's tools: a failure in CI (.ci/run installs haproxy), a skip elsewhere."""
    if shutil.which("haproxy") is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed: .ci/run installs it")
        pytest.skip("haproxy not installed (apt-get install haproxy; CI installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_config(tmp: Path, port: int, bridges: List[int]) -> Path:
    """The shipped file, with this test's addresses: its timeouts, balance and checks as shipped."""
    out: List[str] = []
    servers = iter(bridges)
    for line in SHIPPED.read_text().splitlines():
        s = line.strip()
        if s.startswith(ROOT_ONLY):
            continue
        if s.startswith("bind "):
            line = f"    bind 127.0.0.1:{port}"
        elif s.startswith("server "):
            name = s.split()[1]
            line = f"    server {name} 127.0.0.1:{next(servers)} check"
        elif s == "global":
            out += [line, f"    stats socket {tmp}/admin.sock mode 600 level admin"]
            continue
        out.append(line)
    assert next(servers, None) is None, "the shipped file names fewer servers than the test starts"
    p = tmp / "haproxy.cfg"
    p.write_text("\n".join(out) + "\n")
    return p


def server_status(sock: Path) -> Dict[str, str]:
    """bridge name -> UP / DOWN (HAProxy's stats socket, `show stat`); {} before it listens."""
    if not sock.exists():
        return {}
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    rows = [r.split(",") for r in data.decode().splitlines() if r and not r.startswith("#")]
    return {r[1]: r[17].split()[0] for r in rows if r[0] == "s2s_bridges" and r[1].startswith("bridge")}


def healthz(port: int) -> "tuple[int, dict]":
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def asr_sessions(endpoint: str) -> int:
    with ASRClient(endpoint, timeout=5) as a:
        return int(a.describe()["queues"]["asr_sessions"])


async def spoken(url: str) -> WSClient:
    """A page: open through HAProxy, start, speak, and get its final (the session stays open)."""
    c = await WSClient.open(url)
    await c.wait_event("hello", timeout=15)
    await c.send_json({"type": "start", "language": "zh"})
    await c.wait(lambda: c.of("ready") or c.of("error"), 20, "ready")
    assert not c.of("error"), c.of("error")
    await c.stream(silence(0.3) + SPEECH + silence(1.0))
    await c.wait(lambda: any(f["text"] for f in c.of("final")) or c.of("error"), 40, "a final")
    assert not c.of("error"), c.of("error")
    return c


@pytest.fixture
def stack(tmp_path, models_dir):
    need_haproxy()
    procs: List[Proc] = []
    sides = []
    try:
        for name in ("a", "b"):
            d = tmp_path / name
            d.mkdir()
            cfg = write_config(d / "s2s.yaml", models_dir, d / "run", agent={"kind": "echo"},
                               bridge={"max_connections": 64, "max_connections_per_ip": 64},
                               limits={"max_sessions": 64, "max_asr_load": 0})
            daemon = start_daemon(cfg, d / "daemon.log", fake_engines=True, timeout=60)
            procs.append(daemon)
            bridge = start_bridge(cfg, d / "bridge.log")
            procs.append(bridge)
            sides.append({"name": name, "daemon": daemon, "bridge": bridge, "asr": f"ipc://{d}/run/asr.sock"})
        port = free_port()
        conf = haproxy_config(tmp_path, port, [s["bridge"].port for s in sides])
        check = subprocess.run(["haproxy", "-c", "-f", str(conf)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        proxy = Proc("haproxy", ["haproxy", "-db", "-f", str(conf)], tmp_path / "haproxy.log", None)
        procs.append(proxy)
        deadline = time.monotonic() + 15
        while set(server_status(tmp_path / "admin.sock").values()) != {"UP"}:
            assert time.monotonic() < deadline and proxy.alive(), proxy.text()[-2000:]
            time.sleep(0.2)
        yield {"sides": sides, "ws": f"ws://127.0.0.1:{port}/ws", "admin": tmp_path / "admin.sock"}
    finally:
        for p in reversed(procs):
            p.stop()


def test_haproxy_spreads_sessions_over_two_bridges_and_fails_over(stack):
    a, b = stack["sides"]

    async def go():
        pages = await asyncio.gather(*[spoken(stack["ws"]) for _ in range(SESSIONS)])
        counts = [await asyncio.to_thread(asr_sessions, s["asr"]) for s in (a, b)]
        assert sum(counts) == SESSIONS and min(counts) >= SESSIONS // 4, counts  # spread, not piled on one
        a["daemon"].p.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        a["daemon"].p.wait(5)
        await asyncio.sleep(1.5)
        hit = [p for p in pages if p.of("error")]
        untouched = [p for p in pages if not p.of("error")]
        assert len(hit) == counts[0] and len(untouched) == counts[1], (counts, [p.of("error") for p in pages])
        for p in hit:
            t, err = next((t, e) for t, e in p.events if isinstance(e, dict) and e.get("type") == "error")
            assert err["code"] == "unavailable" and t - killed < 1.0, (err, t - killed)
        status, body = await asyncio.to_thread(healthz, a["bridge"].port)
        assert status == 503 and body["daemon"]["reachable"] is False, (status, body)
        deadline = time.monotonic() + 10
        while (await asyncio.to_thread(server_status, stack["admin"]))["bridge1"] != "DOWN":
            assert time.monotonic() < deadline, "HAProxy did not take the bridge of the dead daemon out"
            await asyncio.sleep(0.2)
        out_after = time.monotonic() - killed
        before = await asyncio.to_thread(asr_sessions, b["asr"])
        fresh = await asyncio.gather(*[spoken(stack["ws"]) for _ in range(SESSIONS // 2)])
        assert await asyncio.to_thread(asr_sessions, b["asr"]) == before + len(fresh)
        for p in untouched:
            assert not p.of("error"), p.of("error")
        for p in pages + fresh:
            await p.close()
        return counts, out_after

    counts, out_after = asyncio.run(asyncio.wait_for(go(), 180))
    print(f"sessions per bridge {counts}; HAProxy took the dead daemon's bridge out after {out_after:.1f} s")


# --- both bridges over both daemons (cluster.daemons): the layout ------------------------


@pytest.fixture
def mesh(tmp_path, models_dir):
    """Two daemons; two bridges, each placing over both; HAProxy (the shipped file) in front."""
    import yaml

    need_haproxy()
    procs: Dict[str, Proc] = {}
    try:
        daemons = []
        for name in ("a", "b"):
            d = tmp_path / name
            d.mkdir()
            cfg = write_config(d / "s2s.yaml", models_dir, d / "run", limits={"max_sessions": 64, "max_asr_load": 0})
            procs[f"daemon-{name}"] = start_daemon(cfg, d / "daemon.log", fake_engines=True, timeout=60)
            daemons.append({"asr": f"ipc://{d}/run/asr.sock", "tts": f"ipc://{d}/run/tts.sock", "cfg": cfg, "dir": d})
        ports = []
        for name in ("b1", "b2"):
            cfg = write_config(tmp_path / f"{name}.yaml", models_dir, tmp_path / f"{name}-run", agent={"kind": "echo"},
                               bridge={"max_connections": 64, "max_connections_per_ip": 64})
            data = yaml.safe_load(cfg.read_text())
            data["cluster"] = {"daemons": [{"asr": x["asr"], "tts": x["tts"]} for x in daemons]}
            cfg.write_text(yaml.safe_dump(data))
            procs[name] = start_bridge(cfg, tmp_path / f"{name}.log")
            ports.append(procs[name].port)
        port = free_port()
        conf = haproxy_config(tmp_path, port, ports)
        procs["haproxy"] = Proc("haproxy", ["haproxy", "-db", "-f", str(conf)], tmp_path / "haproxy.log", None)
        deadline = time.monotonic() + 15
        while set(server_status(tmp_path / "admin.sock").values()) != {"UP"}:
            assert time.monotonic() < deadline and procs["haproxy"].alive(), procs["haproxy"].text()[-2000:]
            time.sleep(0.2)
        yield {"procs": procs, "daemons": daemons, "ws": f"ws://127.0.0.1:{port}/ws", "admin": tmp_path / "admin.sock"}
    finally:
        for p in reversed(list(procs.values())):
            p.stop()


async def _drain_then_restart(mesh, name: str) -> None:
    """SIGTERM daemon `name` while a slow synthesis keeps it draining (1 s, refusing new sessions),
    then start it again and wait until it answers."""
    from daemon.wire.client import AsyncTTSClient

    i = "ab".index(name)
    d = mesh["daemons"][i]
    async with AsyncTTSClient(d["tts"], timeout=5.0) as c:
        slow = await c.synthesize_stream(text="[slow]一。" * 10)
        await slow.end()
        await asyncio.sleep(0.1)
        old = mesh["procs"][f"daemon-{name}"]
        old.p.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(old.p.wait, 15) == 0
    mesh["procs"][f"daemon-{name}"] = await asyncio.to_thread(
        start_daemon, d["cfg"], d["dir"] / f"daemon-{time.monotonic():.0f}.log", True, 60)


def test_both_bridges_over_both_daemons_behind_haproxy_kill_and_rolling_restart(mesh):
    a, b = mesh["daemons"]

    async def go():
        pages = await asyncio.gather(*[spoken(mesh["ws"]) for _ in range(SESSIONS)])
        counts = [await asyncio.to_thread(asr_sessions, d["asr"]) for d in (a, b)]
        assert sum(counts) == SESSIONS and min(counts) >= SESSIONS // 4, counts
        for p in pages:  # the echo replies spoken: only the ASR sessions are left on the daemons
            await p.wait(lambda: p.of("agent_done") and p.of("tts_end"), 30, "the reply spoken")
        await asyncio.sleep(0.3)
        mesh["procs"]["daemon-a"].p.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.sleep(1.5)
        hit = [p for p in pages if p.of("error")]
        assert len(hit) == counts[0], (counts, [p.of("error") for p in pages])
        for p in hit:
            t, err = next((t, e) for t, e in p.events if isinstance(e, dict) and e.get("type") == "error")
            assert err["code"] == "unavailable" and t - killed < 1.0, (err, t - killed)
        before = await asyncio.to_thread(asr_sessions, b["asr"])
        fresh = await asyncio.gather(*[spoken(mesh["ws"]) for _ in range(SESSIONS // 2)])
        assert await asyncio.to_thread(asr_sessions, b["asr"]) == before + len(fresh)  # all on the survivor
        assert set((await asyncio.to_thread(server_status, mesh["admin"])).values()) == {"UP"}  # both bridges serve
        for p in pages + fresh:
            await p.close()
        # a rolling restart: a back first (it was killed), then b drained and restarted, then a
        mesh["procs"]["daemon-a"] = await asyncio.to_thread(start_daemon, a["cfg"], a["dir"] / "daemon2.log", True, 60)
        stop = asyncio.Event()
        done, failed = [0], []

        async def users():
            while not stop.is_set():
                try:
                    page = await spoken(mesh["ws"])
                    await page.close()
                    done[0] += 1
                except AssertionError as e:
                    failed.append(str(e)[:1500])

        tasks = [asyncio.create_task(users()) for _ in range(3)]
        await asyncio.sleep(1.0)
        for name in ("b", "a"):
            await _drain_then_restart(mesh, name)
            await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks)
        return counts, done[0], failed

    counts, done, failed = asyncio.run(asyncio.wait_for(go(), 240))
    print(f"sessions per daemon {counts}; {done} sessions during the rolling restart, {len(failed)} failed")
    assert not failed, failed
    assert done >= 6, done
