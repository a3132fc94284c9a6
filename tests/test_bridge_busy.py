"""A reply the daemon is too busy to take at once is spoken late, not lost (bridge/synth_retry.py).

Real processes: `python -m daemon` on the FAKE engines (tests/fake_engines.py: this is about the
bridge's handling of `busy`, not speech) with a TTS queue of one request, the bridge with the
echo agent, a websockets page, and a second client of the daemon that holds the queue with a slow
synthesis.
"""

from __future__ import annotations

import asyncio

import pytest

from bridge_procs import start_bridge, start_daemon, write_config
from daemon.wire.client import AsyncTTSClient
from helpers.ws import WSClient


@pytest.fixture
def stack(tmp_path, models_dir):
    cfg = write_config(tmp_path / "s2s.yaml", models_dir, tmp_path / "run", agent={"kind": "echo"},
                       limits={"max_tts_queue": 1})
    daemon = start_daemon(cfg, tmp_path / "daemon.log", fake_engines=True, timeout=60)
    bridge = start_bridge(cfg, tmp_path / "bridge.log")
    try:
        yield tmp_path, bridge
    finally:
        bridge.stop()
        daemon.stop()


def test_a_reply_refused_busy_is_spoken_when_the_daemon_has_room(stack):
    """The daemon's TTS queue is full (another client's slow synthesis, ~1.5 s): the reply's request
    is refused `busy` (retry_after 1 s) before any audio. It was left unspoken with an error on
    the page; now it is asked again and spoken whole, with no error."""
    tmp_path, bridge = stack

    async def go():
        other = AsyncTTSClient(f"ipc://{tmp_path}/run/tts.sock", timeout=10.0)
        await other.connect()
        hold = await other.synthesize_stream(text="[slow]一。" * 5, request_id="holder")
        await hold.end()
        # Kept referenced: an audio() generator dropped after one chunk is closed by asyncio's
        # finalizer, which cancels the holder at the daemon and empties the queue (seen under load).
        holder_audio = hold.audio()
        first = await holder_audio.__anext__()  # the holder runs: the queue (1) is full
        assert first.pcm
        c = await WSClient.open(bridge.ws)
        await c.send_json({"type": "text", "text": "你好，请说两句话。第二句在这里。"})
        await c.wait(lambda: c.of("agent_done") and c.of("tts_end") and len(c.of("tts_end")) >= 2, 30,
                     "the reply spoken")
        assert not c.of("error"), c.of("error")
        assert all("error" not in e for e in c.of("tts_end")), c.of("tts_end")
        assert sum(len(pcm) for _, pcm in c.audio()) > 0
        assert "busy" in bridge.text() and "asking again" in bridge.text(), bridge.text()[-2000:]
        await c.close()
        async for _ in holder_audio:
            pass
        await other.close()

    asyncio.run(asyncio.wait_for(go(), 90))
