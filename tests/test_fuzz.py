"""Protocol fuzzing.

1. Property-based (hypothesis) over daemon.wire.protocol: arbitrary frame lists, and JSON headers
   built from the real field names and types with arbitrary values, never raise anything but
   ProtocolError; whatever decodes re-encodes to the same frames.
2. Live: 10,000 random multipart messages to EACH of the real daemon's two ROUTER sockets
   (bundled Whisper base + fsmn-vad + Piper, the engines a fresh install serves). Afterwards
   a well-behaved client transcribes a Mandarin fixture to exactly the text it got before the
   fuzz and synthesises the same sentence again, and the daemon's RSS (measured after a
   warm-up with the same kind of traffic) is within 5 % of before. Strings include lone
   surrogates (JSON "\\ud800" escapes), and liveness is a round trip on each fuzzing socket
   after the fuzz, not the process being alive: a dead receive loop leaves the process up.
"""

from __future__ import annotations

import json
import random
import string
import time
import uuid
from typing import Any, Dict, List, Tuple

import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bridge_procs import start_daemon, write_config
from daemon.wire import protocol as P
from daemon.audio import float_to_pcm16, read_wav
from daemon.wire.client import ASRClient, TTSClient
from daemon.errors import ErrorCode
from helpers.zmq_raw import ping
from procstats import settled

# --- property-based: the decoder -------------------------------------------------------------

ALL_TYPES = sorted(set(P.REQUESTS) | set(P.REPLIES))
FIELD_NAMES = sorted({f for cls in list(P.REQUESTS.values()) + list(P.REPLIES.values())
                      for f in cls.__dataclass_fields__} - {"pcm"})

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
                         st.text(st.characters(codec=None, categories=["Cs", "Ll"]), max_size=4))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                  st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


@st.composite
def headers(draw) -> Dict[str, Any]:
    hdr: Dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        hdr["v"] = draw(st.one_of(st.just(1), st.just(1), json_scalars))
    if draw(st.integers(0, 9)):
        hdr["type"] = draw(st.one_of(st.sampled_from(ALL_TYPES), json_scalars))
    keys = draw(st.lists(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=6)), max_size=6, unique=True))
    for k in keys:
        hdr[k] = draw(json_values)
    return hdr


def _frames_of(draw_hdr: Dict[str, Any], binaries: List[bytes]) -> List[bytes]:
    # ASCII JSON: lone surrogates that hypothesis draws travel as "\\udXXX" escapes.
    return [json.dumps(draw_hdr).encode("ascii")] + binaries


def _decode_only_protocol_errors(frames: List[bytes]) -> None:
    for decode in (P.decode_request, P.decode_reply):
        try:
            msg = decode(frames)
        except P.ProtocolError as e:
            assert isinstance(e.code, ErrorCode)
            assert isinstance(e.request_id, str) and isinstance(e.session_id, str)
            continue
        # Whatever decodes is a well-formed message whose reply can be sent: its strings are
        # valid Unicode, and encoding it again is stable.
        msg.encode()[0].decode("utf-8")
        again = decode(msg.encode())
        assert again.encode() == msg.encode()
        assert type(again) is type(msg)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=5))
@example([b"[" * 30000 + b"]" * 30000])                     # nesting deeper than the JSON parser's stack
@example([b'{"v":1,"type":"ping","x":' + b"[" * 30000 + b"]" * 30000 + b"}"])
@example([b'{"v":1,"type":"audio","session_id":"s","seq":' + b"9" * 5000 + b"}", b"aa"])  # int too long
@example([b'{"v":1,"type":"synthesize","request_id":"r","text":"x","speed":NaN}'])
@example([b'{"v":true,"type":"ping"}'])
@example([b"\xef\xbb\xbf{}"])                                # UTF-8 BOM
@example([b'{"v":1,"type":"audio","session_id":"\\ud800"}', b"aa"])   # lone surrogates (issue 13)
@example([b'{"v":1,"type":"cancel","request_id":"\\udc80"}'])
@example([b'{"v":1,"type":"open","session_id":"s","hotwords":["\\udfff"]}'])
def test_arbitrary_frames_only_raise_protocol_error(frames):
    _decode_only_protocol_errors(frames)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers(), st.lists(st.binary(max_size=32), max_size=2))
def test_structured_headers_only_raise_protocol_error(hdr, binaries):
    _decode_only_protocol_errors(_frames_of(hdr, binaries))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=16), max_size=6))
def test_router_and_dealer_framing_only_raise_protocol_error(frames):
    for split in (P.split_router, P.split_dealer):
        try:
            out = split(frames)
        except P.ProtocolError:
            continue
        body = out[1] if split is P.split_router else out
        assert isinstance(body, list) and all(isinstance(f, bytes) for f in body)


# --- live: random traffic at the real daemon ---------------------------------------------------

FUZZ_PER_SOCKET = 10_000
WARMUP_PER_SOCKET = 5_000
IDLE = 3.0
SESSION_POOL = [f"fz{i}" for i in range(6)]
REQUEST_POOL = [f"rq{i}" for i in range(6)]


class Fuzzer:
    """Random multipart messages: raw garbage, broken framing, broken JSON, and headers with
    real and made-up types and fields holding values of every JSON type (some valid: those
    open sessions, feed audio and start syntheses, which the real engines then run)."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def _text(self, n: int) -> str:
        r = self.r
        alphabet = string.printable + "你好世界。，？！\u200b\u202e\ud7ff\U0001f600\ud800\udc80\udfff"
        return "".join(r.choice(alphabet) for _ in range(r.randint(0, n)))

    def value(self, depth: int = 0) -> Any:
        r = self.r
        k = r.randint(0, 15)
        if k == 0:
            return None
        if k == 1:
            return r.random() < 0.5
        if k == 2:
            return r.randint(-(2 ** 63), 2 ** 63)
        if k == 3:
            return r.choice([0, 1, -1, 8000, 16000, 48000, 47999, 10 ** 30])
        if k == 4:
            return r.choice([0.0, -1.5, 0.25, 1.0, 4.0, 1e308, float("nan"), float("inf")])
        if k == 5:
            return "x" * r.choice([0, 129, 3000])
        if k in (6, 7):
            return r.choice(SESSION_POOL + REQUEST_POOL)
        if k == 8 and depth < 3:
            return [self.value(depth + 1) for _ in range(r.randint(0, 3))]
        if k == 9 and depth < 3:
            return {self._text(5): self.value(depth + 1) for _ in range(r.randint(0, 3))}
        if k == 10:
            return r.choice(["zh", "en", "auto", "ZH", "klingon", ""])
        if k == 11:
            return [self._text(6) for _ in range(r.randint(0, 3))]
        return self._text(24)

    def binary(self) -> bytes:
        r = self.r
        n = r.choice([0, 1, 2, 3, 320, 641, 3200, r.randint(0, 4000)])
        if r.random() < 0.5:
            return bytes(n)  # silence
        return r.randbytes(n)

    def header(self) -> bytes:
        r = self.r
        hdr: Dict[str, Any] = {}
        if r.random() < 0.95:
            hdr["v"] = 1 if r.random() < 0.9 else self.value()
        if r.random() < 0.95:
            hdr["type"] = r.choice(ALL_TYPES + ["", "OPEN", "frobnicate", "ping\x00"]) if r.random() < 0.95 \
                else self.value()
        for name in r.sample(FIELD_NAMES, r.randint(0, 6)):
            hdr[name] = self.value()
        if r.random() < 0.1:
            hdr[self._text(8)] = self.value()
        # ensure_ascii: lone surrogates arrive as valid JSON escapes; otherwise as bytes that
        # are not UTF-8 at all.
        return json.dumps(hdr, ensure_ascii=r.random() < 0.5).encode("utf-8", "surrogatepass")

    def message(self) -> List[bytes]:
        r = self.r
        k = r.random()
        if k < 0.12:  # raw garbage, any framing
            return [r.randbytes(r.randint(0, 200)) for _ in range(r.randint(1, 5))]
        if k < 0.22:  # broken JSON / not UTF-8 / huge / deeply nested
            h = self.header()
            bad = r.choice([h[: r.randint(0, len(h))], b"\xff\xfe" + h, b"[" * 20000 + b"]" * 20000,
                            b"{" + b" " * (P.MAX_HEADER_BYTES + 10) + b"}", h.replace(b"{", b"[", 1), b"null", b"1e999"])
            return [b"", bad]
        if k < 0.27:  # no delimiter
            return [self.header()] + [self.binary() for _ in range(r.randint(0, 2))]
        if k < 0.30:  # several delimiters / empty header
            return [b"", b"", self.header()]
        return [b"", self.header()] + [self.binary() for _ in range(r.choice([0, 0, 1, 1, 1, 2, 3]))]


def _dealers(ctx: zmq.Context, endpoint: str, n: int) -> List[zmq.Socket]:
    out = []
    for _ in range(n):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        # Binary identities too (the daemon prints them as hex); a leading NUL is reserved by zmq.
        s.setsockopt(zmq.IDENTITY, bytes([random.randint(1, 255)]) + uuid.uuid4().bytes)
        s.setsockopt(zmq.RCVHWM, 100_000)
        s.connect(endpoint)
        out.append(s)
    return out


def _drain(socks: List[zmq.Socket], quiet: float) -> int:
    """Read replies until none came for `quiet` seconds; returns how many."""
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    n = 0
    while True:
        ready = dict(poller.poll(int(quiet * 1000)))
        if not ready:
            return n
        for s in ready:
            while True:
                try:
                    s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                n += 1


def fuzz(endpoints: Tuple[str, str], per_socket: int, seed: int) -> Dict[str, int]:
    """Send per_socket random messages to each endpoint; returns counts."""
    ctx = zmq.Context.instance()
    f = Fuzzer(seed)
    socks = {ep: _dealers(ctx, ep, 4) for ep in endpoints}
    everything = [s for v in socks.values() for s in v]
    sent = replies = 0
    try:
        for i in range(per_socket):
            for ep in endpoints:
                s = socks[ep][i % 4]
                s.send_multipart(f.message())
                sent += 1
            if i % 100 == 99:
                replies += _drain(everything, 0.005)
        replies += _drain(everything, 1.0)
        # Liveness on the very sockets that fuzzed: a dead receive loop leaves the pid alive.
        for s in everything:
            ping(s, timeout=10.0)
    finally:
        # Vanish without closing anything: the daemon must free what the fuzz opened.
        for s in everything:
            s.close(linger=0)
    return {"sent": sent, "replies": replies}


def _transcribe(endpoint: str, pcm: bytes) -> str:
    with ASRClient(endpoint, timeout=30) as c:
        st_ = c.open(language="zh")
        for off in range(0, len(pcm), 6400):
            st_.send(pcm[off:off + 6400])
        st_.send(b"\0\0" * 16000)
        evs = st_.finalize(timeout=60)
    return "".join(e.text for e in evs if isinstance(e, P.Final))


def _synthesise(endpoint: str, text: str) -> int:
    with TTSClient(endpoint, timeout=30) as t:
        pcm, rate = t.speak(text)
    assert rate == 24000
    return len(pcm) // 2


def _wait_quiet(endpoint: str, timeout: float) -> Dict[str, Any]:
    """Wait until the fuzz's sessions and TTS requests are gone (idle timeout / peer gone)."""
    deadline = time.monotonic() + timeout
    with ASRClient(endpoint, timeout=10) as c:
        while True:
            info = c.describe()
            q = info["queues"]
            if q["asr_sessions"] == 0 and q["tts_requests"] == 0:
                return info
            assert time.monotonic() < deadline, f"fuzz sessions/requests not freed: {q} {info['sessions']}"
            time.sleep(0.25)


@pytest.fixture(scope="module")
def real_daemon(tmp_path_factory, models_dir):
    d = tmp_path_factory.mktemp("fuzz-daemon")
    cfg = write_config(d / "s2s.yaml", models_dir, d / "run", asr="whisper", tts="piper",
                       limits={"idle_timeout": IDLE, "max_sessions": 16, "max_tts_queue": 8})
    proc = start_daemon(cfg, d / "daemon.log", timeout=240)
    yield proc, (f"ipc://{d}/run/asr.sock", f"ipc://{d}/run/tts.sock")
    assert proc.stop() == 0, proc.text()[-3000:]


def test_live_fuzz_both_sockets(real_daemon, fixtures_dir):
    proc, (asr, tts) = real_daemon
    pid = proc.p.pid
    x, sr = read_wav(str(fixtures_dir / "zh" / "01.wav"))
    assert sr == 16000
    pcm = float_to_pcm16(x)
    sentence = "Hello there, how are you today?"

    # Warm-up: real work and the same kind of traffic, so allocator high-water marks are reached.
    text_before = _transcribe(asr, pcm)
    samples_before = _synthesise(tts, sentence)
    assert text_before and samples_before > 24000 // 2
    fuzz((asr, tts), WARMUP_PER_SOCKET, seed=1)
    _wait_quiet(asr, IDLE + 10)
    assert _transcribe(asr, pcm) == text_before
    before = settled(pid)

    t0 = time.monotonic()
    counts = fuzz((asr, tts), FUZZ_PER_SOCKET, seed=2)
    took = time.monotonic() - t0
    assert counts["sent"] == 2 * FUZZ_PER_SOCKET
    info = _wait_quiet(asr, IDLE + 10)

    # A well-behaved client gets exactly what it got before.
    assert _transcribe(asr, pcm) == text_before
    samples_after = _synthesise(tts, sentence)
    assert abs(samples_after - samples_before) <= 0.2 * samples_before, (samples_before, samples_after)
    after = settled(pid)
    grew = (after["rss_kb"] - before["rss_kb"]) / before["rss_kb"]
    print(f"fuzz: {counts} in {took:.1f} s; counters {info['counters']}; RSS {before['rss_kb']} -> "
          f"{after['rss_kb']} kB ({grew:+.1%}); threads {before['threads']} -> {after['threads']}")
    assert info["counters"]["protocol_errors"] >= FUZZ_PER_SOCKET  # most of it was refused as malformed
    assert grew <= 0.05, (before, after)
    assert after["threads"] <= before["threads"] + 1
    assert "Traceback" not in proc.text(), proc.text()[-3000:]
