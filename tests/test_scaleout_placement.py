"""Placement over several daemons (issue 29, daemon/wire/placement.py): the rule on FAKE members with
an injected clock, then two real daemons (`python -m daemon` on the FAKE engines,
tests/fake_engines.py: this is about placement, not speech) behind the asyncio clients: sessions
spread by room and kept where they started, a killed daemon out of placement within a second, a
hung one out after a second without an answer and back when it answers, a stopping one out while
it drains."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.request
from typing import Any, Dict, Optional

import pytest

from daemon.wire.placement import ClientMember, Placement, capacities
from bridge_procs import start_daemon, write_config
from daemon.errors import ErrorCode, S2SError
from daemon.wire.client import AsyncASRClient, AsyncTTSClient


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeMember:
    """FAKE daemon for the placement rule: answers describe with what the test sets."""

    def __init__(self, name: str, max_sessions: int = 32, sessions: int = 0, pid: int = 1):
        self.name, self.max_sessions, self.sessions, self.pid = name, max_sessions, sessions, pid
        self.stopping, self.answers, self.link = False, True, True

    async def describe(self, timeout: float) -> Dict[str, Any]:
        if not self.answers:
            raise S2SError("timed out", ErrorCode.TIMEOUT)
        return {"daemon": {"pid": self.pid, "stopping": self.stopping, "healthy": True},
                "queues": {"asr_sessions": self.sessions, "asr_stream_capacity": 1000, "tts_requests": 0},
                "limits": {"max_sessions": self.max_sessions, "max_tts_queue": 32}}

    def reachable(self) -> Optional[bool]:
        return None if self.link else False


def test_capacity_is_the_smaller_of_the_session_cap_and_the_predicted_streams():
    info = {"queues": {"asr_sessions": 3, "asr_stream_capacity": 20, "tts_requests": 2},
            "limits": {"max_sessions": 32, "max_tts_queue": 16}}
    assert capacities(info) == {"sessions": {"asr": 3, "tts": 2}, "capacity": {"asr": 20, "tts": 16}}
    info["queues"]["asr_stream_capacity"] = None  # admission by prediction off
    assert capacities(info)["capacity"]["asr"] == 32


def test_most_room_wins_and_a_burst_is_spread_before_the_next_describe():
    a, b = FakeMember("a", max_sessions=8), FakeMember("b", max_sessions=24, sessions=8)
    clock = Clock()
    p = Placement([a, b], clock=clock)
    asyncio.run(p.poll())
    got = [p.place("asr").name for _ in range(12)]
    # rooms 8 and 16: b takes sessions until its room is a's, then they alternate (ties: fewer sessions)
    assert got[:8] == ["b"] * 8 and sorted(got[8:]) == ["a", "a", "b", "b"], got


def test_a_daemon_out_of_placement_and_back():
    a, b = FakeMember("a"), FakeMember("b", sessions=5)
    clock = Clock()
    p = Placement([a, b], clock=clock)
    asyncio.run(p.poll())
    assert p.place("asr") is a
    a.link = False  # the socket monitor saw it go: out at once, without a poll
    assert p.place("asr") is b and not p.report()[0]["up"]
    a.link = True
    asyncio.run(p.poll())
    assert p.place("asr") is a
    a.answers = False  # hung: out once its last answer is down_after old
    clock.t += 0.5
    asyncio.run(p.poll())
    assert p.place("asr") is a
    clock.t += 0.5
    assert p.place("asr") is b and "no answer for 1 s" in p.report()[0]["why"]
    a.answers = True
    asyncio.run(p.poll())
    assert p.place("asr") is a
    p.refused(a, ErrorCode.SHUTTING_DOWN)  # stopping: out until another process answers
    asyncio.run(p.poll())
    assert p.place("asr") is b
    a.pid = 2
    asyncio.run(p.poll())
    assert p.place("asr") is a
    a.stopping, b.stopping = True, True
    asyncio.run(p.poll())
    with pytest.raises(S2SError) as e:
        p.place("tts")
    assert e.value.code == ErrorCode.UNAVAILABLE and "a: stopping" in e.value.message


def test_first_taker_tries_the_others_on_busy_stopping_or_lost_and_raises_the_last_refusal():
    a, b = FakeMember("a"), FakeMember("b", sessions=5)
    p = Placement([a, b], clock=Clock())
    asyncio.run(p.poll())
    calls = []

    def attempt_with(refuse):
        async def attempt(m):
            calls.append(m.name)
            if m.name in refuse:
                raise S2SError(f"{m.name} refuses", refuse[m.name])
            return m.name
        return attempt

    assert asyncio.run(p.first_taker("asr", attempt_with({"a": ErrorCode.BUSY}))) == "b"
    assert calls == ["a", "b"]
    with pytest.raises(S2SError) as e:
        asyncio.run(p.first_taker("asr", attempt_with({"a": ErrorCode.BUSY, "b": ErrorCode.BUSY})))
    assert e.value.code == ErrorCode.BUSY and "refuses" in e.value.message
    with pytest.raises(S2SError) as e:  # not a refusal to try elsewhere: at once
        asyncio.run(p.first_taker("asr", attempt_with({"a": ErrorCode.BAD_REQUEST, "b": ErrorCode.BUSY})))
    assert e.value.code == ErrorCode.BAD_REQUEST


# --- real daemons --------------------------------------------------------------------------------


@pytest.fixture
def two_daemons(tmp_path, models_dir):
    procs = []
    try:
        for name in ("a", "b"):
            d = tmp_path / name
            d.mkdir()
            cfg = write_config(d / "s2s.yaml", models_dir, d / "run",
                               limits={"max_sessions": 16, "max_asr_load": 0}, )
            procs.append(start_daemon(cfg, d / "daemon.log", fake_engines=True, timeout=60))
        yield [(name, f"ipc://{tmp_path / name}/run/asr.sock", f"ipc://{tmp_path / name}/run/tts.sock", proc)
               for name, proc in zip("ab", procs)]
    finally:
        for p in procs:
            try:
                p.p.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
            p.stop()


async def _members(daemons):
    members = []
    for name, asr, tts, _ in daemons:
        a = AsyncASRClient(asr, timeout=5.0, reconnect_on_timeout=False)
        t = AsyncTTSClient(tts, timeout=5.0, reconnect_on_timeout=False)
        await a.connect()
        await t.connect()
        members.append(ClientMember(name, a, t))
    return members


async def _out_within(p: Placement, name: str, limit: float) -> float:
    t0 = time.monotonic()
    while any(r["name"] == name and r["up"] for r in p.report()):
        assert time.monotonic() - t0 < limit + 1.0, p.report()
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def test_real_daemons_spread_keep_and_lose_sessions(two_daemons):
    async def go():
        members = await _members(two_daemons)
        p = Placement(members)
        await p.start()
        try:
            opened = []
            for i in range(8):
                m = p.place("asr")
                opened.append((m, await m.asr.open(session_id=f"s{i}")))
            await p.poll()
            rows = {r["name"]: r for r in p.report()}
            assert rows["a"]["asr_sessions"] == rows["b"]["asr_sessions"] == 4, rows
            # a session stays where it started: its audio goes to its own daemon
            for m, s in opened:
                await s.send(b"\0\0" * 1600)
            # one synthesis placed and answered
            t = p.place("tts")
            pcm, _ = await t.tts.speak("你好。")
            assert pcm
            name, _, _, proc = two_daemons[0]
            proc.p.send_signal(signal.SIGKILL)
            out = await _out_within(p, "a", 1.0)
            assert out < 1.0, out
            assert {p.place("asr").name for _ in range(5)} == {"b"}
            # hung (SIGSTOP): out after a second without an answer; back when it answers
            _, _, _, proc_b = two_daemons[1]
            proc_b.p.send_signal(signal.SIGSTOP)
            hung = await _out_within(p, "b", 1.0 + 0.5)
            with pytest.raises(S2SError) as e:
                p.place("asr")
            assert e.value.code == ErrorCode.UNAVAILABLE
            proc_b.p.send_signal(signal.SIGCONT)
            t0 = time.monotonic()
            while not any(r["name"] == "b" and r["up"] for r in p.report()):
                assert time.monotonic() - t0 < 3, p.report()
                await asyncio.sleep(0.05)
            assert p.place("asr").name == "b"
            return out, hung
        finally:
            await p.close()
            for m in members:
                await m.asr.close()
                await m.tts.close()

    out, hung = asyncio.run(asyncio.wait_for(go(), 120))
    print(f"killed daemon out of placement after {out * 1000:.0f} ms; hung daemon after {hung * 1000:.0f} ms")


def test_a_rolling_restart_of_both_daemons_loses_no_new_session(two_daemons, tmp_path):
    """DaemonPool (bridge/daemon_pool.py) over both: while each daemon in turn is stopped (SIGTERM:
    it drains, refusing new sessions with shutting_down) and started again, a new session is
    opened every 50 ms, fed and closed: every one is opened (on whichever daemon is up)."""
    from bridge.daemon_pool import DaemonPool
    from bridge_procs import start_daemon as start
    from daemon.config_frontends import DaemonEndpoints

    pool = DaemonPool([DaemonEndpoints(asr=a, tts=t) for _, a, t, _ in two_daemons], 5.0, 20.0)
    procs = {name: proc for name, _, _, proc in two_daemons}

    async def go():
        await pool.start()
        stop = asyncio.Event()
        opened: Dict[str, int] = {}
        failed = []

        async def sessions():
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    s = await pool.asr.open(session_id=f"roll-{i}")
                    await s.send(b"\0\0" * 1600)
                    name = next(m.name for m in pool.members if m.asr is s.client)
                    opened[name] = opened.get(name, 0) + 1
                    await s.close(timeout=5)
                except Exception as e:  # counted: the assertion below names them
                    failed.append(f"{i}: {type(e).__name__}: {e}")
                await asyncio.sleep(0.05)

        task = asyncio.create_task(sessions())
        try:
            await asyncio.sleep(0.5)
            for name in ("a", "b"):
                old = procs[name]
                # work in flight, so the daemon drains (refusing new sessions) for drain_timeout (1 s)
                member = next(m for m in pool.members if f"/{name}/run/" in m.name)
                slow = await member.tts.synthesize_stream(text="[slow]一。" * 10)
                await slow.end()
                await asyncio.sleep(0.1)
                old.p.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(old.p.wait, 15) == 0
                d = tmp_path / name
                procs[name] = await asyncio.to_thread(start, d / "s2s.yaml", d / "daemon2.log", True, 60)
                # back in placement before the next one stops
                t0 = time.monotonic()
                while sum(r["up"] for r in pool.report()) < 2:
                    assert time.monotonic() - t0 < 10, pool.report()
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await task
            await pool.close()
        return opened, failed

    try:
        opened, failed = asyncio.run(asyncio.wait_for(go(), 120))
    finally:
        for name, proc in procs.items():
            proc.stop()
    print(f"sessions opened during the rolling restart: {opened}")
    assert not failed, failed
    assert sum(opened.values()) > 20 and len(opened) == 2, opened


def test_one_bridge_places_browser_sessions_over_two_daemons(two_daemons, tmp_path, models_dir):
    """A real bridge with cluster.daemons = both: pages spread over both daemons and all get finals;
    one daemon killed: its pages get `unavailable` within 1 s, the others nothing, /healthz stays
    200 with one daemon up of two, /metrics says which, and every new page goes to the survivor."""
    import yaml

    from bridge_procs import start_bridge
    from test_scaleout_haproxy import asr_sessions, healthz, spoken

    cfg = write_config(tmp_path / "bridge.yaml", models_dir, tmp_path / "bridge-run", agent={"kind": "echo"},
                       bridge={"max_connections": 64, "max_connections_per_ip": 64})
    data = yaml.safe_load(cfg.read_text())
    data["cluster"] = {"daemons": [{"asr": a, "tts": t} for _, a, t, _ in two_daemons]}
    cfg.write_text(yaml.safe_dump(data))
    bridge = start_bridge(cfg, tmp_path / "bridge.log")
    (_, asr_a, _, proc_a), (_, asr_b, _, _) = two_daemons
    try:
        async def go():
            pages = await asyncio.gather(*[spoken(bridge.ws) for _ in range(12)])
            counts = [await asyncio.to_thread(asr_sessions, ep) for ep in (asr_a, asr_b)]
            assert counts == [6, 6], counts
            for p in pages:  # the echo replies spoken (syntheses are placed too): only ASR sessions left
                await p.wait(lambda: p.of("agent_done") and p.of("tts_end"), 20, "the reply spoken")
            await asyncio.sleep(0.3)
            proc_a.p.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await asyncio.sleep(1.5)
            hit = [p for p in pages if p.of("error")]
            assert len(hit) == 6, [p.of("error") for p in pages]
            for p in hit:
                t, err = next((t, e) for t, e in p.events if isinstance(e, dict) and e.get("type") == "error")
                assert err["code"] == "unavailable" and t - killed < 1.0, (err, t - killed)
            status, body = await asyncio.to_thread(healthz, bridge.port)
            assert status == 200 and body["daemon"]["daemons_up"] == 1 and body["daemon"]["daemons"] == 2, body
            fresh = await asyncio.gather(*[spoken(bridge.ws) for _ in range(6)])
            assert await asyncio.to_thread(asr_sessions, asr_b) == 12
            metrics = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"{bridge.http}/metrics", timeout=5).read().decode())
            assert f's2s_bridge_daemon_up{{daemon="0:{asr_a}"}} 0.0' in metrics, metrics[-3000:]
            assert f's2s_bridge_daemon_up{{daemon="1:{asr_b}"}} 1.0' in metrics
            # every daemon's own series, not only the first one's (the dead one keeps its last values)
            assert f's2s_daemon_up{{daemon="0:{asr_a}"}} 0.0' in metrics, metrics[-3000:]
            assert f's2s_daemon_up{{daemon="1:{asr_b}"}} 1.0' in metrics
            feeds = {d: float(re.search(rf's2s_daemon_asr_feeds_total{{daemon="{re.escape(d)}"}} (\S+)',
                                        metrics).group(1)) for d in (f"0:{asr_a}", f"1:{asr_b}")}
            assert all(v > 0 for v in feeds.values()), feeds
            for p in pages + fresh:
                await p.close()

        asyncio.run(asyncio.wait_for(go(), 120))
    finally:
        bridge.stop()


def test_streamed_text_synthesis_over_the_pool(two_daemons):
    """speak_text_stream (s2s-openai's and s2s-wyoming's streamed speech) over a DaemonPool: the
    audio of every piece comes back, from one daemon (the request is placed once)."""
    from bridge.daemon_pool import DaemonPool
    from bridge.speech import speak_text_stream
    from daemon.config_frontends import DaemonEndpoints

    pool = DaemonPool([DaemonEndpoints(asr=a, tts=t) for _, a, t, _ in two_daemons], 5.0, 20.0)

    async def pieces():
        for piece in ("你好。", "今天", "天气很好。"):
            yield piece

    async def go():
        await pool.start()
        try:
            chunks = [c async for c in speak_text_stream(pool, pieces(), "zh", "pool-1")]  # type: ignore[arg-type]
            return chunks, pool.report()
        finally:
            await pool.close()

    chunks, report = asyncio.run(asyncio.wait_for(go(), 60))
    assert {c.sentence for c in chunks} == {0, 1} and all(c.pcm for c in chunks), chunks
    assert sorted(r["placed_tts"] for r in report) == [0, 1], report


def test_ctl_health_and_sessions_ask_every_daemon_of_the_cluster(two_daemons, tmp_path, models_dir):
    """`s2s-ctl --config` with cluster.daemons: health pings and describes each daemon (it once
    looked only at daemon.asr_endpoint, where no daemon runs on a bridge host), exits 1 naming the
    one that does not answer; sessions lists each daemon's sessions."""
    import json
    import subprocess
    import sys

    import yaml

    from daemon.wire.client import ASRClient

    eps = [{"asr": a, "tts": t} for _, a, t, _ in two_daemons]
    cfg = write_config(tmp_path / "ctl.yaml", models_dir, tmp_path / "nowhere")
    data = yaml.safe_load(cfg.read_text())
    data["cluster"] = {"daemons": eps}
    cfg.write_text(yaml.safe_dump(data))

    def ctl(*args: str, config=cfg) -> "subprocess.CompletedProcess[str]":
        return subprocess.run([sys.executable, "-m", "daemon.tools.ctl", "--config", str(config), "--timeout", "2",
                               *args], capture_output=True, text=True, timeout=60)

    r = ctl("health")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 of 2 daemons answer" in r.stdout and all(e["asr"] in r.stdout for e in eps), r.stdout
    r = ctl("health", "--json")
    answers = json.loads(r.stdout)["daemons"]
    assert [a["asr"]["endpoint"] for a in answers] == [e["asr"] for e in eps]
    assert all("info" in a["tts"] for a in answers), answers
    with ASRClient(eps[1]["asr"], timeout=5) as c:
        stream = c.open(language="zh")
        r = ctl("sessions", "--json")
        rows = json.loads(r.stdout)
        assert [(row["session_id"], row["daemon"]) for row in rows] == [(stream.session_id, eps[1]["asr"])], rows
        stream.close()
    gone = f"ipc://{tmp_path}/gone/asr.sock"
    data["cluster"]["daemons"].append({"asr": gone, "tts": f"ipc://{tmp_path}/gone/tts.sock"})
    (tmp_path / "three.yaml").write_text(yaml.safe_dump(data))
    r = ctl("health", config=tmp_path / "three.yaml")
    assert r.returncode == 1 and "2 of 3 daemons answer" in r.stdout and gone in r.stdout, r.stdout
