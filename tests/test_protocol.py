"""daemon.wire.protocol: every message type round-trips; bad input raises ProtocolError with a code."""

from __future__ import annotations

import json
from typing import get_args, get_type_hints

import pytest

from daemon.wire import protocol as P
from daemon.asr.sessions import event_to_message
from daemon.engines import ASREvent
from daemon.errors import BusyError, ErrorCode

REQUESTS = [
    P.Open(session_id="s1", request_id="r1", language="zh", hotwords=("阿里巴巴", "s2s"), sample_rate=48000,
           partials=False),
    P.Open(session_id="s1"),
    P.Open(session_id="s1", tentative=True),
    P.Audio(session_id="s1", seq=7, pcm=b"\x01\x00\xff\x7f", request_id="r", ack=True),
    P.Finalize(session_id="s1", request_id="r2"),
    P.Reset(session_id="s1", request_id="r3"),
    P.Close(session_id="s1", request_id="r4"),
    P.Synthesize(request_id="t1", text="你好。Hello.", language="zh", speed=1.25, stream=False),
    P.Synthesize(request_id="t2", text="你好，", owner="c1", stream_text=True, hold=True),
    P.TextChunk(request_id="t2", text="今天。", final=True, release=True, drop_partial=True),
    P.Cancel(request_id="t1"),
    P.Describe(request_id="d"),
    P.Ping(request_id="p"),
]
REPLIES = [
    P.Opened(session_id="s1", request_id="r1", capabilities={"partials": True, "hotwords": False}),
    P.SpeechStart(session_id="s1", start=0.3, utterance=1),
    P.Partial(session_id="s1", text="提醒我", start=0.3, end=1.2, utterance=1),
    P.Final(session_id="s1", text="提醒我。", start=0.3, end=3.1, utterance=1, reason="finalize", request_id="r2"),
    P.Tentative(session_id="s1", text="提醒我", start=0.3, end=1.5, utterance=1),
    P.Resume(session_id="s1", start=1.9, utterance=1),
    P.Closed(session_id="s1", request_id="r2", reason="finalized"),
    P.Ack(session_id="s1", request_id="r3", of="reset"),
    P.SynthAudio(request_id="t1", seq=2, sentence=1, text="Hello.", sample_rate=24000, pcm=b"\x00\x00" * 10),
    P.Done(request_id="t1", chunks=3, sentences=2, duration=1.5),
    P.Cancelled(request_id="t1"),
    P.Info(request_id="d", info={"asr": {"engine": "whisper"}, "fallbacks": ["asr: funasr -> whisper"]}),
    P.Pong(request_id="p", time=123.5),
    P.Error(code="busy", message="full", request_id="r1", session_id="s1", seq=3, retry_after=1.0),
]


def test_every_type_is_covered():
    assert {m.TYPE for m in REQUESTS} | {m.TYPE for m in REPLIES} == set(P.MsgType)


@pytest.mark.parametrize("msg", REQUESTS, ids=lambda m: type(m).__name__)
def test_request_round_trip(msg):
    frames = msg.encode()
    assert P.decode_request(frames) == msg
    assert type(msg).decode(frames) == msg
    # Through a ROUTER: identity + delimiter in front.
    ident, body = P.split_router([b"peer"] + P.dealer_frames(msg))
    assert ident == b"peer" and P.decode_request(body) == msg


@pytest.mark.parametrize("msg", REPLIES, ids=lambda m: type(m).__name__)
def test_reply_round_trip(msg):
    frames = msg.encode()
    assert P.decode_reply(frames) == msg
    assert P.decode_reply(P.split_dealer(P.router_frames(b"x", msg)[1:])) == msg


def test_audio_travels_in_its_own_frame():
    pcm = bytes(range(256)) * 4
    frames = P.Audio(session_id="s", seq=1, pcm=pcm).encode()
    assert len(frames) == 2 and frames[1] == pcm
    assert "pcm" not in json.loads(frames[0])
    hdr = json.loads(frames[0])
    assert hdr["v"] == P.PROTOCOL_VERSION and hdr["type"] == "audio"


def _hdr(**kw):
    d = {"v": 1}
    d.update(kw)
    return json.dumps(d).encode()


@pytest.mark.parametrize("frames,code", [
    ([], ErrorCode.BAD_REQUEST),
    ([b"{not json"], ErrorCode.BAD_REQUEST),
    ([b"\xff\xfe"], ErrorCode.BAD_REQUEST),
    ([b"[1, 2]"], ErrorCode.BAD_REQUEST),
    ([_hdr(type="open", session_id="s")[:-1] + b', "v": 2}'], ErrorCode.BAD_VERSION),
    ([json.dumps({"type": "ping"}).encode()], ErrorCode.BAD_VERSION),
    ([_hdr(type="nope")], ErrorCode.UNKNOWN_TYPE),
    ([_hdr(type="pong")], ErrorCode.UNKNOWN_TYPE),  # a reply type is not a request
    ([_hdr()], ErrorCode.BAD_REQUEST),
    ([_hdr(type="open")], ErrorCode.BAD_REQUEST),  # session_id missing
    ([_hdr(type="open", session_id=5)], ErrorCode.BAD_REQUEST),
    ([_hdr(type="open", session_id="s", partials="yes")], ErrorCode.BAD_REQUEST),
    ([_hdr(type="open", session_id="s", hotwords=[1])], ErrorCode.BAD_REQUEST),
    ([_hdr(type="audio", session_id="s", seq=1)], ErrorCode.BAD_REQUEST),  # no audio frame
    ([_hdr(type="audio", session_id="s", seq=1), b"a", b"b"], ErrorCode.BAD_REQUEST),
    ([_hdr(type="audio", session_id="s", seq=1.5), b"aa"], ErrorCode.BAD_REQUEST),
    ([_hdr(type="ping"), b"extra"], ErrorCode.BAD_REQUEST),
    ([_hdr(type="synthesize", request_id="r", text="hi", speed=float("nan"))], ErrorCode.BAD_REQUEST),
    ([b"{" + b" " * P.MAX_HEADER_BYTES + b"}"], ErrorCode.BAD_REQUEST),
])
def test_bad_requests_raise_protocol_error(frames, code):
    with pytest.raises(P.ProtocolError) as ei:
        P.decode_request(frames)
    assert ei.value.code == code


def test_protocol_error_keeps_ids():
    with pytest.raises(P.ProtocolError) as ei:
        P.decode_request([_hdr(type="audio", session_id="s9", request_id="r9", seq="x"), b"aa"])
    assert ei.value.session_id == "s9" and ei.value.request_id == "r9"


@pytest.mark.parametrize("frames", [[b"id"], [b"id", b"x", b"{}"], [b"id", b"{}"]])
def test_bad_router_framing(frames):
    with pytest.raises(P.ProtocolError):
        P.split_router(frames)


def test_error_from_exception_never_leaks_internals():
    e = P.Error.from_exception(RuntimeError("/secret/path line 3"), request_id="r")
    assert e.code == "internal" and "secret" not in e.message
    b = P.Error.from_exception(BusyError("full", retry_after=2), request_id="r", session_id="s")
    assert b.code == "busy" and b.retry_after == 2.0 and b.error_code == ErrorCode.BUSY


def test_every_engine_event_kind_becomes_its_wire_message():
    full = {"text": "好", "start": 1.0, "end": 1.5, "utterance": 3, "reason": "vad"}
    kinds = {get_type_hints(td)["type"].__args__[0]: td for td in get_args(ASREvent)}
    assert set(kinds) == {"speech_start", "partial", "tentative", "resume", "final"}
    wire = {"speech_start": P.SpeechStart, "partial": P.Partial, "tentative": P.Tentative, "resume": P.Resume,
            "final": P.Final}
    for kind, td in kinds.items():
        ev = {k: full[k] for k in get_type_hints(td) if k in full}
        m = event_to_message("s", dict(ev, type=kind), request_id="r")
        assert type(m) is wire[kind] and m.session_id == "s" and m.utterance == 3 and m.start == 1.0
        for k, v in ev.items():
            assert getattr(m, k) == v, (kind, k)
    m = event_to_message("s", {"type": "final", "text": "好", "start": 1, "end": 2, "utterance": 3, "reason": "vad"})
    assert m == P.Final(session_id="s", text="好", start=1.0, end=2.0, utterance=3, reason="vad")
    with pytest.raises(ValueError, match="unknown engine event"):
        event_to_message("s", {"type": "weird"})  # type: ignore[arg-type]
