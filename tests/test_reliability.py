"""Reliability: websocket abuse, slow and vanished clients, daemon crashes, GPU faults.

Real processes throughout (`python -m daemon`, `python -m bridge`, websockets and ZeroMQ
clients). The daemon runs the FAKE engines (tests/fake_engines.py) where a test is about the
bridge or the daemon's bookkeeping; the GPU-fault test runs the real Whisper + Piper engines
with a fault injected into the libraries' inference calls (tests/gpu_faults.py).

What tests/test_bridge.py and tests/test_daemon.py already prove is not repeated here (one
bad message of each kind, one non-reading client closed, one vanished ASR peer, the hung
engine withholding WATCHDOG=1).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from bridge_procs import Proc, start_bridge, start_daemon, write_config
from daemon.wire import protocol as P
from daemon.wire.client import ASRClient, TTSClient
from procstats import settled, stats
from helpers.ws import WSClient, http_get, read_pcm, silence

TESTS = Path(__file__).resolve().parent
IDLE = 3.0
MAX_MSG = 65536
QUEUE = 262144
SLOW_TIMEOUT = 2.0


def run(coro, timeout: float = 120.0):
    async def guarded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(guarded())


def health(port: int) -> Dict[str, Any]:
    status, _, body = http_get(port, "/healthz")
    h = json.loads(body)
    assert (status == 200) == (h["status"] == "ok")
    return h


@pytest.fixture(scope="module")
def stack(tmp_path_factory, models_dir):
    """FAKE-engine daemon + bridge on the echo agent; small limits so abuse hits them."""
    d = tmp_path_factory.mktemp("rel-stack")
    cfg = write_config(d / "s2s.yaml", models_dir, d / "run",
                       bridge={"max_connections": 64, "max_connections_per_ip": 64, "max_turns_per_minute": 100000,
                               "max_message_bytes": MAX_MSG,
                               "send_queue_bytes": QUEUE,
                               "slow_client_timeout": SLOW_TIMEOUT},
                       agent={"kind": "echo"}, limits={"idle_timeout": IDLE})
    daemon = start_daemon(cfg, d / "daemon.log", fake_engines=True, timeout=60)
    bridge = start_bridge(cfg, d / "bridge.log")
    yield {"dir": d, "cfg": cfg, "daemon": daemon, "bridge": bridge,
           "asr": f"ipc://{d}/run/asr.sock", "tts": f"ipc://{d}/run/tts.sock"}
    assert bridge.stop() == 0, bridge.text()[-3000:]
    assert daemon.stop() == 0, daemon.text()[-3000:]


# --- websocket abuse ---------------------------------------------------------------------------

# What the abuser sends (1,000 messages in all) and what each must get back.
N_BEFORE_START = 50          # audio before `start`: one `not_started`, the rest dropped (counted)
N_NOT_JSON = 250             # -> bad_message each
N_NOT_OBJECT = 100           # JSON that is not an object with a string "type" -> bad_message each
N_UNKNOWN = 100              # unknown types -> unknown_type each
N_BAD_START = 100            # start with bad fields -> bad_message each
N_ODD = 200                  # odd-length binary after start -> bad_audio each
N_FLOOD = 150                # 1.9 s chunks back to back: ~280 s of audio in about a second
N_HUGE = 50                  # past max_size, each on its own connection -> closed 1009
TOTAL = N_BEFORE_START + N_NOT_JSON + N_NOT_OBJECT + N_UNKNOWN + N_BAD_START + N_ODD + N_FLOOD + N_HUGE


async def abuse(url: str) -> Dict[str, Any]:
    """Runs in a separate process (see __main__), so it does not compete with the measured
    client for the test process's GIL. Returns what came back."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    r = random.Random(9)
    c = await WSClient.open(url)
    await c.wait_event("hello")
    print("ready", flush=True)
    sent = 0

    async def send(m) -> None:
        nonlocal sent
        await c.ws.send(m)
        sent += 1
        if sent % 20 == 0:
            await asyncio.sleep(0.01)  # spread over a few seconds, while the other session is measured

    for _ in range(N_BEFORE_START):
        await send(bytes(640))
    garbage = ["", " ", "hello", "{", "}", "{'type': 'start'}", '{"type": "start"', "\x00\x01", "NaN{",
               "[" * 5000 + "]" * 5000, '{"type": ' + "[" * 5000 + "]" * 5000 + "}", "ü" * 1000]
    for i in range(N_NOT_JSON):
        await send(garbage[i % len(garbage)] if i < 2 * len(garbage) else
                   "".join(chr(r.randint(32, 0x2FFF)) for _ in range(r.randint(1, 200))))
    not_object = ["[1, 2, 3]", "null", "42", '"start"', "true", '{"no": "type"}', '{"type": 5}',
                  '{"type": null}', '{"type": ["start"]}', '{"type": {"a": 1}}']
    for i in range(N_NOT_OBJECT):
        await send(not_object[i % len(not_object)])
    for i in range(N_UNKNOWN):
        await send(json.dumps({"type": r.choice(["dance", "START", "audio", "ready", "", "x" * 500]) + str(i)}))
    bad_start = [{"type": "start", "language": "klingon"}, {"type": "start", "language": 5},
                 {"type": "start", "hotwords": "not a list"}, {"type": "start", "hotwords": [1, 2]},
                 {"type": "start", "hotwords": ["x" * 65]}, {"type": "start", "hotwords": [f"w{i}" for i in range(101)]},
                 {"type": "start", "barge_in": "yes"}, {"type": "text", "text": ""},
                 {"type": "text", "text": 7}, {"type": "text", "text": "x" * 5000}]
    for i in range(N_BAD_START):
        await send(json.dumps(bad_start[i % len(bad_start)]))
    await c.send_json({"type": "start", "language": "zh"})
    await c.wait_event("ready", 1, 10)
    for i in range(N_ODD):
        await send(bytes(2 * r.randint(0, 2000) + 1))
    chunk = bytes(60000)
    for i in range(N_FLOOD):
        await send(chunk)
    closes = []
    for i in range(N_HUGE):
        h = await connect(url, proxy=None, compression=None, max_size=None, open_timeout=10)
        try:
            await h.send(bytes(MAX_MSG + 1 + i * 1000) if i % 2 else "x" * (MAX_MSG + 1 + i))
            sent += 1
            try:
                while True:
                    await asyncio.wait_for(h.recv(), 10)
            except ConnectionClosed as e:
                closes.append((e.rcvd.code if e.rcvd else None, e.rcvd.reason if e.rcvd else ""))
        finally:
            await h.close()
    # The abused connection still works afterwards.
    await c.send_json({"type": "text", "text": "still here"})
    done = await c.wait_event("agent_done", 1, 10)
    await asyncio.sleep(0.5)
    errors = [e["code"] for e in c.of("error")]
    result = {"sent": sent, "errors": {k: errors.count(k) for k in set(errors)}, "closes": closes,
              "closed": c.closed is not None, "agent_done": done["text"]}
    await c.close()
    return result


async def _turn_latency(c: WSClient, i: int) -> float:
    """Typed text -> first reply audio byte, as the page sees it (echo agent, fake TTS)."""
    n_done = len(c.of("tts_end"))
    n_audio = len(c.audio())
    t0 = time.monotonic()
    await c.send_json({"type": "text", "text": f"turn {i}."})
    await c.wait(lambda: len(c.audio()) > n_audio, 10, "reply audio")
    first = c.audio()[n_audio][0]
    await c.wait(lambda: len(c.of("tts_end")) > n_done, 10, "tts_end")
    await c.wait(lambda: c.of("agent_done") and c.of("agent_done")[-1]["text"] == f"You said: turn {i}.", 10, "reply")
    return first - t0


def test_websocket_abuse_gets_errors_and_a_concurrent_session_is_unaffected(stack):
    bridge = stack["bridge"]

    async def go():
        good = await WSClient.open(bridge.ws)
        await good.wait_event("hello")
        for i in range(3):  # warm-up
            await _turn_latency(good, i)
        idle = [await _turn_latency(good, 100 + i) for i in range(12)]
        proc = await asyncio.create_subprocess_exec(sys.executable, __file__, "abuse", bridge.ws, cwd=TESTS.parent,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.strip() == b"ready", (line, await proc.stderr.read())
        busy: List[float] = []
        i = 200
        while proc.returncode is None and len(busy) < 200:
            busy.append(await _turn_latency(good, i))
            i += 1
            try:
                await asyncio.wait_for(proc.wait(), 0.001)
            except TimeoutError:
                pass
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()[-3000:]
        assert not good.of("error") and good.closed is None
        await good.close()
        return idle, busy, json.loads(out.decode().splitlines()[-1])

    idle, busy, res = run(go(), 180)
    m_idle, m_busy = statistics.median(idle), statistics.median(busy)
    print(f"abuse: errors {res['errors']}, {len(res['closes'])} closed with {set(c for c, _ in res['closes'])}; "
          f"turn latency median idle {m_idle * 1000:.1f} ms, under abuse {m_busy * 1000:.1f} ms ({len(busy)} turns)")
    assert res["sent"] == TOTAL == 1000
    e = res["errors"]
    assert e.get("not_started") == 1
    assert e.get("bad_message") == N_NOT_JSON + N_NOT_OBJECT + N_BAD_START, e
    assert e.get("unknown_type") == N_UNKNOWN, e
    assert e.get("bad_audio") == N_ODD, e
    assert set(e) <= {"not_started", "bad_message", "unknown_type", "bad_audio", "busy"}, e
    assert len(res["closes"]) == N_HUGE and all(code == 1009 and reason for code, reason in res["closes"]), res["closes"]
    assert res["agent_done"] == "You said: still here" and not res["closed"]
    assert len(busy) >= 5, busy
    assert m_busy <= 2 * max(m_idle, 0.02), (idle, busy)
    assert "Traceback" not in stack["bridge"].text()


# --- slow clients ------------------------------------------------------------------------------


def test_non_reading_clients_cannot_grow_bridge_memory(stack):
    """Six browsers that never read ask for ~100 s of reply audio each (4.8 MB): the bridge
    holds at most send_queue_bytes for each, closes them with 1008 "client too slow", and its
    RSS grows by far less than the audio asked for."""
    import socket

    from websockets.asyncio.client import connect

    bridge = stack["bridge"]
    pid = bridge.p.pid
    n = 6
    text = "这是一个很长的句子，用来产生很多声音。" * 100  # 1900 characters: the fake TTS says 95 s

    async def go():
        before = settled(pid)
        # the log, not /healthz: its counters are cached for a few seconds
        closed0 = bridge.text().count("client too slow")
        socks = []
        for _ in range(n):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", bridge.port))
            ws = await connect(bridge.ws, sock=s, proxy=None, compression=None, max_queue=1)
            await ws.send(json.dumps({"type": "text", "text": text}))
            socks.append(ws)
        peak = before["rss_kb"]
        deadline = time.monotonic() + SLOW_TIMEOUT * 2 + 15
        while True:
            peak = max(peak, stats(pid)["rss_kb"])
            closed = bridge.text().count("client too slow") - closed0
            if closed >= n:
                break
            assert time.monotonic() < deadline, f"only {closed} of {n} slow clients closed"
            await asyncio.sleep(0.1)
        for ws in socks:
            ws.transport.abort()
        return before, peak

    before, peak = run(go(), 120)
    grew_mb = (peak - before["rss_kb"]) / 1024
    asked_mb = n * len(text) * 0.05 * 24000 * 2 / 2 ** 20
    print(f"slow clients: bridge RSS {before['rss_kb']} kB -> peak {peak} kB (+{grew_mb:.1f} MB) while "
          f"{asked_mb:.0f} MB of audio was asked for")
    # queue + websockets/asyncio buffers per connection, plus interpreter slack
    assert grew_mb <= n * (QUEUE / 2 ** 20 + 1.0) + 4, grew_mb
    assert grew_mb < asked_mb / 3


# --- vanished DEALER clients -------------------------------------------------------------------


def test_vanished_dealers_have_sessions_and_requests_freed(stack, fixtures_dir):
    """8 ASR peers vanish mid-stream (freed when their events bounce: ROUTER_MANDATORY), 4 open
    a session and vanish silently (freed by the idle timeout), 4 TTS peers vanish mid-synthesis
    (the request is cancelled at its next chunk, not synthesised to the end)."""
    pcm = read_pcm(fixtures_dir / "zh" / "01.wav")
    with ASRClient(stack["asr"]) as watch:
        c0 = watch.describe()["counters"]
        streaming = []
        for i in range(8):
            c = ASRClient(stack["asr"])
            # 0.5 s of work per second of audio, however the daemon merges the messages into
            # engine calls: with the audio sent just before they vanish, their events and acks
            # are still coming afterwards (~4 s of work in all).
            streaming.append((c, c.open(session_id=f"van-{i}", hotwords=["fake:rtf=0.5"])))
        silent = []
        for i in range(4):
            c = ASRClient(stack["asr"])
            c.open(session_id=f"quiet-{i}")
            silent.append(c)
        talkers = []
        for i in range(4):
            t = TTSClient(stack["tts"])
            t.send(P.Synthesize(request_id=f"long-{i}", text="[slow] " + "One sentence. " * 20))
            talkers.append(t)
        t_sent = time.monotonic()
        assert all(isinstance(t.recv(5), P.SynthAudio) for t in talkers)
        for _c, st in streaming:
            for off in range(0, 16000 * 2, 3200):
                st.send(pcm[off:off + 3200], ack=off + 3200 >= 16000 * 2)
        streaming = [c for c, _st in streaming]
        for c in streaming + silent + talkers:
            c.ping()  # everything sent has arrived
            c.close()
        t_gone = time.monotonic()
        assert t_gone - t_sent < 3  # the syntheses (20 x 0.3 s) were far from done
        deadline = t_gone + IDLE + 3
        tts_freed = None
        while True:
            info = watch.describe()
            q = info["queues"]
            if q["tts_requests"] == 0 and tts_freed is None:
                tts_freed = time.monotonic() - t_gone
            if q["asr_sessions"] == 0 and q["tts_requests"] == 0 and info["asr"]["sessions"] == 0:
                break
            assert time.monotonic() < deadline, (q, info["sessions"])
            time.sleep(0.1)
        took = time.monotonic() - t_gone
        c1 = info["counters"]
    print(f"vanished peers: TTS requests freed after {tts_freed:.2f} s, all sessions after {took:.2f} s")
    # at each request's next chunk (4 requests share the TTS worker: ~4 x 0.3 s), not after the
    # ~20 s of synthesis still queued for them
    assert tts_freed < 3.0, tts_freed
    assert took < IDLE + 3
    assert c1["peer_gone"] - c0["peer_gone"] >= 8 + 4, (c0, c1)
    assert c1["idle_closed"] - c0["idle_closed"] >= 4, (c0, c1)


# --- daemon crash and restart ----------------------------------------------------------------------


def test_daemon_sigkill_mid_session_then_restart(tmp_path, models_dir, fixtures_dir):
    """SIGKILL the daemon while a page streams: the page gets an `error` within 2 s, /healthz
    says degraded, and after the daemon is started again (as systemd would) the same page and a
    new one work end to end."""
    cfg = write_config(tmp_path / "s2s.yaml", models_dir, tmp_path / "run", agent={"kind": "echo"})
    daemon = start_daemon(cfg, tmp_path / "daemon.log", fake_engines=True, timeout=60)
    bridge = start_bridge(cfg, tmp_path / "bridge.log")
    speech = read_pcm(fixtures_dir / "zh" / "01.wav")
    try:
        async def go():
            nonlocal daemon
            c = await WSClient.open(bridge.ws)
            await c.send_json({"type": "start", "language": "zh"})
            await c.wait_event("ready")
            await c.stream(silence(0.3) + speech[:16000 * 2], realtime=True, speed=4.0)
            await c.wait_event("speech_start")
            n_err = len(c.of("error"))
            daemon.p.send_signal(signal.SIGKILL)
            t_kill = time.monotonic()
            daemon.p.wait(5)
            # the browser keeps talking meanwhile
            feeder = asyncio.create_task(c.stream(speech[16000 * 2:] + silence(2.0), realtime=True))
            await c.wait(lambda: len(c.of("error")) > n_err, 2.0, "error event after SIGKILL")
            err = c.of("error")[n_err]
            t_err = next(t for t, e in c.events if e is err)
            await feeder
            deadline = time.monotonic() + 10
            while (h := health(bridge.port))["status"] != "degraded":
                assert time.monotonic() < deadline, h
                await asyncio.sleep(0.3)
            assert not h["daemon"]["reachable"]
            # systemd restarts it
            daemon = await asyncio.to_thread(start_daemon, cfg, tmp_path / "daemon2.log", True, 60)
            deadline = time.monotonic() + 15
            while (h := health(bridge.port))["status"] != "ok":
                assert time.monotonic() < deadline, h
                await asyncio.sleep(0.3)
            # the same page starts again, then a new page: both work end to end
            for page in (c, await WSClient.open(bridge.ws)):
                n_final, n_done = len(page.of("final")), len(page.of("agent_done"))
                n_audio = len(page.audio())
                await page.send_json({"type": "start", "language": "zh"})
                await page.wait(lambda: len(page.of("ready")) >= (2 if page is c else 1), 10, "ready")
                await page.stream(silence(0.3) + speech + silence(1.0))
                await page.wait(lambda: len(page.of("final")) > n_final and page.of("final")[-1]["text"], 10, "final")
                final = page.of("final")[-1]
                assert final["text"].startswith("utt") and "bytes=" in final["text"], final
                await page.wait(lambda: len(page.of("agent_done")) > n_done, 10, "reply")
                await page.wait(lambda: len(page.audio()) > n_audio, 10, "reply audio")
                await page.close()
            return err, t_err - t_kill

        err, delay = run(go(), 150)
        print(f"error {err} {delay * 1000:.0f} ms after SIGKILL")
        assert err["source"] == "asr" and err["code"] == "unavailable", err
        assert delay < 2.0
    finally:
        bridge.stop()
        daemon.stop()


# --- GPU faults (simulated) --------------------------------------------------------------------------


def _start_faulty_daemon(cfg: Path, log: Path, fault_dir: Path, timeout: float = 240.0) -> Proc:
    from bridge_procs import _env, wait_daemon_ready

    env = _env({"S2S_FAKE_GPU": "1", "S2S_FAULT_DIR": str(fault_dir)})
    proc = Proc("daemon", [sys.executable, str(TESTS / "gpu_faults.py"), "--config", str(cfg)], log, env)
    return wait_daemon_ready(proc, cfg, timeout)


def _transcribe_events(endpoint: str, pcm: bytes) -> List[Any]:
    """Without partials: an injected fault then hits the final's decode (a failed partial is
    only skipped)."""
    with ASRClient(endpoint, timeout=60) as c:
        st = c.open(language="zh", partials=False)
        for off in range(0, len(pcm), 6400):
            st.send(pcm[off:off + 6400])
        st.send(b"\0\0" * 16000)
        return st.finalize(timeout=60)


def _text(events: List[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, P.Final))


def test_cuda_oom_during_requests(tmp_path, models_dir, fixtures_dir):
    """The real Whisper + Piper engines, believing they run on cuda:0 (tests/gpu_faults.py),
    hit torch.cuda.OutOfMemoryError inside the model call: the request is retried on the CPU
    and succeeds, the engine stays on the CPU and says so. On the CPU an OOM fails only that
    request (engine_error); the daemon lives and the next request succeeds."""
    import yaml

    from daemon.wire.client import DaemonError

    cfg = write_config(tmp_path / "s2s.yaml", models_dir, tmp_path / "run", asr="whisper", tts="piper")
    data = yaml.safe_load(cfg.read_text())
    data["asr"]["device"] = data["tts"]["device"] = "cuda:0"
    data["tts"]["fallback_device"] = "cpu"
    cfg.write_text(yaml.safe_dump(data))
    faults = tmp_path / "faults"
    faults.mkdir()
    asr, tts = f"ipc://{tmp_path}/run/asr.sock", f"ipc://{tmp_path}/run/tts.sock"
    daemon = _start_faulty_daemon(cfg, tmp_path / "daemon.log", faults)
    pcm = read_pcm(fixtures_dir / "zh" / "01.wav")
    sentence = "Hello there, how are you today?"
    try:
        with ASRClient(asr) as c:
            info = c.describe()
        assert info["asr"]["device"] == "cuda:0" and info["tts"]["device"] == "cuda:0", info
        ref = _text(_transcribe_events(asr, pcm))
        with TTSClient(tts, timeout=30) as t:
            ref_pcm, _ = t.speak(sentence)
        assert ref and len(ref_pcm) > 24000

        # On the "GPU": OOM mid-request -> retried on the CPU, the request succeeds.
        (faults / "asr_oom").write_text("1")
        evs = _transcribe_events(asr, pcm)
        assert not [e for e in evs if isinstance(e, P.Error)] and _text(evs) == ref, evs
        (faults / "tts_oom").write_text("1")
        with TTSClient(tts, timeout=30) as t:
            pcm_fb, _ = t.speak(sentence)
        assert abs(len(pcm_fb) - len(ref_pcm)) < 0.2 * len(ref_pcm)
        assert (faults / "asr_oom").read_text() == "0" and (faults / "tts_oom").read_text() == "0"
        with ASRClient(asr) as c:
            info = c.describe()
        assert info["asr"]["device"] == "cpu" and info["tts"]["device"] == "cpu", info
        assert any("CUDA error during recognition" in f["reason"] and "out of memory" in f["reason"]
                   and f["when"] == "recognition" for f in info["asr"]["fallbacks"])
        assert any(f["when"] == "synthesis" and f["to"] == "cpu" and "out of memory" in f["reason"]
                   for f in info["tts"]["fallbacks"])

        # On the CPU: an OOM fails that request only.
        (faults / "asr_oom").write_text("1")
        evs = _transcribe_events(asr, pcm)
        errs = [e for e in evs if isinstance(e, P.Error)]
        assert errs and errs[0].code == "engine_error", evs
        assert isinstance(evs[-1], P.Closed) and evs[-1].reason == "error"
        assert _text(_transcribe_events(asr, pcm)) == ref
        (faults / "tts_oom").write_text("1")
        with TTSClient(tts, timeout=30) as t:
            with pytest.raises(DaemonError) as ei:
                t.speak(sentence)
            assert ei.value.code.value == "engine_error"
            again, _ = t.speak(sentence)
        assert abs(len(again) - len(ref_pcm)) < 0.2 * len(ref_pcm)
        assert daemon.alive()
        with ASRClient(asr) as c:
            assert c.describe()["daemon"]["healthy"]
    finally:
        rc = daemon.stop()
    assert rc == 0, daemon.text()[-3000:]


# --- the abuser process ------------------------------------------------------------------------------

if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "abuse":
    print(json.dumps(asyncio.run(abuse(sys.argv[2]))), flush=True)
