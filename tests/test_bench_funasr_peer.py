"""The FunASR peer bench (daemon/tools/bench_funasr_peer.py): its measure, and the shim that runs
FunASR's websocket server file (a websockets < 13 handler) on this venv's websockets. The server
here is a FAKE stand-in written the way funasr_wss_server.py is (module-level `serve`, then
`run_until_complete` and `run_forever`, a (websocket, path) handler); the real file needs the
full-size models (BENCHMARKS.md has its run)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

from daemon.tools.bench_funasr_peer import SHIM, latency_of, partial_gaps
from daemon.tools.bench_wyoming import free_port

FAKE_SERVER = '''
import argparse, asyncio, json, websockets
parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int)
args = parser.parse_args()

async def ws_serve(websocket, path):
    async for message in websocket:
        await websocket.send(json.dumps({"mode": "2pass-offline", "path": path, "bytes": len(message)}))

start_server = websockets.serve(ws_serve, "127.0.0.1", args.port, subprotocols=["binary"], ping_interval=None)
asyncio.get_event_loop().run_until_complete(start_server)
asyncio.get_event_loop().run_forever()
'''


def test_the_shim_runs_a_two_argument_handler_server_file_unchanged(tmp_path):
    import websockets

    server = tmp_path / "funasr_like_server.py"
    server.write_text(FAKE_SERVER)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SHIM, str(server), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async def talk() -> dict:
            for _ in range(100):
                try:
                    async with websockets.connect(f"ws://127.0.0.1:{port}", subprotocols=["binary"]) as ws:
                        await ws.send(b"\0" * 1920)
                        return json.loads(await ws.recv())
                except OSError:
                    await asyncio.sleep(0.1)
            raise AssertionError(proc.stdout.read1().decode() if proc.poll() is not None else "never listened")

        assert asyncio.run(asyncio.wait_for(talk(), 30)) == {"mode": "2pass-offline", "path": None, "bytes": 1920}
    finally:
        proc.kill()
        proc.wait(5)


def test_latency_is_the_last_offline_answer_after_the_end_and_gaps_skip_pauses():
    t = time.monotonic()
    events = [(t + 1.0, {"mode": "2pass-online"}), (t + 1.6, {"mode": "2pass-online"}),
              (t + 2.0, {"mode": "2pass-offline"}),                 # an utterance before the end
              (t + 9.0, {"mode": "2pass-online"}), (t + 9.6, {"mode": "2pass-online"}),
              (t + 10.4, {"mode": "2pass-offline"}), (t + 10.9, {"mode": "2pass-offline"})]
    assert abs(latency_of(events, t + 10.0) - 0.9) < 1e-9
    assert latency_of(events, t + 11.0) is None and latency_of(events, None) is None
    assert [round(g, 3) for g in partial_gaps(events)] == [0.6, 0.6]  # not the 7.4 s pause between them
