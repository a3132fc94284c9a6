"""The one shape of a fallback and of engine info (daemon/engines.py), and s2s-ctl's
pretty-printer over every describe shape, including the one that crashed it: a daemon whose
TTS engine fell back from cuda:1 to cpu while the daemon itself fell back from funasr/melo."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.tools.ctl import _table
from daemon.engines import Capabilities, EngineInfo, Fallback, SchemaError, merge_fallbacks
from helpers.describe_schema import check_describe, mixed_lists


def _info(kind, engine, fallbacks=()):
    return EngineInfo(kind=kind, engine=engine, device="cpu", requested_device="cuda:1", dtype="float32",
                      sample_rate=16000 if kind == "asr" else 24000, loaded=True,
                      capabilities=Capabilities(streaming=kind == "tts", languages=("zh",)),
                      models={"voice": "/m/piper/en_US-joe-medium.onnx"} if kind == "tts" else {"whisper": "/m/w"},
                      fallbacks=tuple(fallbacks), details={"compute_type": "int8"})


def gpu_less_describe():
    """What a GPU-less host with no FunASR/MeloTTS weights describes (the first-contact crash)."""
    startup = [Fallback("asr.engine", "funasr", "whisper", "asr.funasr.paraformer absent", "startup"),
               Fallback("tts.engine", "melo", "piper", "tts.melo.model absent", "startup")]
    asr_dev = Fallback("asr.device", "cuda:1", "cpu", "CUDA is not available", "load")
    tts_dev = Fallback("tts.device", "cuda:1", "cpu", "CUDA is not available", "load")
    asr, tts = _info("asr", "whisper", [asr_dev]), _info("tts", "piper", [tts_dev])
    return {"daemon": {"version": "0.1", "protocol": 1, "pid": 1, "uptime": 3.0, "healthy": True},
            "asr": asr.to_dict(), "tts": tts.to_dict(),
            "capabilities": {"partials": False, "hotwords": False, "streaming_tts": True},
            "fallbacks": [f.to_dict() for f in merge_fallbacks(startup, asr.fallbacks, tts.fallbacks)],
            "queues": {"asr_sessions": 0}}


def test_gpu_less_describe_renders_every_fallback():
    text = check_describe(gpu_less_describe())
    for line in ("asr.engine: funasr -> whisper (startup)", "tts.engine: melo -> piper (startup)",
                 "asr.device: cuda:1 -> cpu (load)", "tts.device: cuda:1 -> cpu (load)"):
        assert f"fallback {line}" in text
    assert "model voice: /m/piper/en_US-joe-medium.onnx" in text and "compute_type=int8" in text


def test_fallback_round_trip_and_validation():
    f = Fallback("tts.device", "cuda:1", "cpu", "x" * 1000 + "\n\tmore", "synthesis")
    assert len(f.reason) == 300 and "\n" not in f.reason
    assert Fallback.from_dict(json.loads(json.dumps(f.to_dict()))) == Fallback(
        f.component, f.from_, f.to, f.reason, f.when, round(f.time, 3))
    for bad in ("asr: funasr -> whisper", {"component": "tts.device"}, {**f.to_dict(), "extra": 1},
                {**f.to_dict(), "when": "later"}, {**f.to_dict(), "component": "gpu"}, {**f.to_dict(), "to": 3}):
        with pytest.raises(SchemaError):
            Fallback.from_dict(bad)


def test_merge_keeps_each_fallback_once_in_order():
    a = Fallback("asr.engine", "funasr", "whisper", "absent", "startup")
    b = Fallback("tts.device", "cuda:1", "cpu", "no cuda", "load")
    assert merge_fallbacks([a], [b, Fallback("asr.engine", "funasr", "whisper", "other words", "startup")]) == [a, b]


def test_engine_info_rejects_mixed_or_unknown_shapes():
    good = _info("asr", "whisper").to_dict()
    assert EngineInfo.from_dict(good).to_dict() == good
    for patch in ({"fallbacks": ["asr: funasr -> whisper"]}, {"model_dirs": {}}, {"details": {"x": [1]}},
                  {"models": {"a": None}}, {"loaded": "yes"}):
        with pytest.raises(SchemaError):
            EngineInfo.from_dict({**good, **patch})
    assert mixed_lists({"a": [1, "x"], "b": [[1], [2]]}) == ["$.a: ['int', 'str']"]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["daemon", "asr", "tts", "fallbacks", "queues", "capabilities", "x"]),
                       json_values, max_size=6))
def test_pretty_printer_never_raises(info):
    """Whatever a daemon (of any version) answers, s2s-ctl shows it instead of crashing."""
    assert isinstance(_table(info), str)
