"""Fuzz the bridge's websocket: hypothesis text from every Unicode category (lone surrogates
included, sent as JSON escapes, the only way they cross a websocket) in every field of every
message type, raw text frames and binary frames of every length. After each example, and at
the end, liveness is judged by a full round trip on a new connection (typed text -> agent
reply -> reply audio); the bridge logs no traceback.

Real processes: the daemon on the FAKE engines (this is about the bridge's edge), the bridge
on the echo agent.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge_procs import start_bridge, start_daemon, write_config
from helpers.ws import WSClient

# Every category, surrogates (Cs) and unassigned code points included.
ANY_CHAR = st.characters(codec=None, categories=None, exclude_characters=())
TEXT = st.text(ANY_CHAR, max_size=40)
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
NASTY = st.one_of(TEXT, st.builds(lambda a, s, b: a + s + b, TEXT, SURROGATE, TEXT))
JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | NASTY,
                          lambda kids: st.lists(kids, max_size=4) | st.dictionaries(NASTY, kids, max_size=4),
                          max_leaves=10)
MESSAGE = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["start", "stop", "text", "ping"]), NASTY)},
    optional={"text": NASTY, "language": st.one_of(st.sampled_from(["zh", "en", "auto"]), NASTY),
              "hotwords": st.lists(NASTY, max_size=5), "token": NASTY, "barge_in": JSON_VALUE, "extra": JSON_VALUE})
FRAME = st.one_of(
    MESSAGE.map(lambda m: json.dumps(m)),                      # \\ud800 escapes for surrogates
    MESSAGE.map(lambda m: json.dumps(m, ensure_ascii=False).encode("utf-8", "surrogatepass").decode(
        "utf-8", "replace")),                                  # raw UTF-8 (surrogates replaced: websockets sends UTF-8 only)
    TEXT.map(lambda t: t.encode("utf-8", "surrogatepass").decode("utf-8", "replace")),   # not JSON
    st.binary(max_size=7000),                                 # audio frames of every length (odd ones too)
)


@pytest.fixture(scope="module")
def fuzz_bridge(tmp_path_factory, models_dir):
    d = tmp_path_factory.mktemp("fuzz-bridge")
    cfg = write_config(d / "s2s.yaml", models_dir, d / "run",
                       bridge={"max_connections_per_ip": 64, "max_turns_per_minute": 10000, "max_message_bytes": 65536},
                       agent={"kind": "echo"})
    daemon = start_daemon(cfg, d / "daemon.log", fake_engines=True, timeout=60)
    bridge = start_bridge(cfg, d / "bridge.log")
    yield bridge
    bridge.stop()
    daemon.stop()


async def _round_trip(url: str) -> None:
    c = await WSClient.open(url)
    try:
        await c.wait_event("hello")
        await c.send_json({"type": "text", "text": "你好"})
        assert (await c.wait_event("agent_done", 1, 15))["text"] == "你说的是：你好"
        await c.wait(lambda: c.audio(), 15, "reply audio")
    finally:
        await c.close()


async def _hammer(url: str, frames: List[Any]) -> None:
    c = await WSClient.open(url)
    try:
        await c.wait_event("hello")
        for f in frames:
            if c.closed is not None:
                break
            await c.ws.send(f)
        await asyncio.sleep(0.05)
        if c.closed is not None:
            # A fuzzed message may close its own connection, but only for a reason the bridge names.
            assert c.closed.rcvd is not None and c.closed.rcvd.code in (1000, 1008, 1009), c.closed
        for e in c.of("error"):
            assert e["code"] and e["message"] and e["source"], e
    finally:
        await c.close()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(FRAME, min_size=1, max_size=8))
def test_fuzzed_messages_never_break_the_bridge(fuzz_bridge, frames):
    asyncio.run(asyncio.wait_for(_hammer(fuzz_bridge.ws, frames), 60))


def test_still_alive_after_the_fuzz(fuzz_bridge):
    """Runs after the fuzz in file order; on its own it is a plain round trip."""
    asyncio.run(asyncio.wait_for(_round_trip(fuzz_bridge.ws), 60))
    text = fuzz_bridge.text()
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]
