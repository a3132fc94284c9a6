"""MeloTTSEngine through the real melo code on the tiny random model, offline.

One engine load per module (melo's import alone takes ~17 s here).
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from daemon.tts import melo_offline
from daemon.config import parse_config
from daemon.engines import TTSEngine
from daemon.errors import ErrorCode, S2SError, TextError
from daemon.tts.base import trim_silence
from daemon.tts.melo_engine import MeloConfig, MeloTTSEngine

SR = 24000


def _config(models_dir: Path, **kw) -> MeloConfig:
    t = models_dir / "tiny"
    return MeloConfig(model_dir=t / "melo-zh", hf_home=t / "hf", nltk_data=t / "nltk_data", **kw)


@pytest.fixture(scope="module")
def net_attempts():
    return []


@pytest.fixture(scope="module")
def engine(models_dir, net_attempts):
    """Load with socket connects and name lookups recorded (on top of the suite's guard):
    import + load must not touch the network at all, loopback included."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def connect(self, address):
        net_attempts.append(("connect", address))
        return real_connect(self, address)

    def connect_ex(self, address):
        net_attempts.append(("connect_ex", address))
        return real_connect_ex(self, address)

    def getaddrinfo(host, *a, **k):
        net_attempts.append(("getaddrinfo", host))
        return real_getaddrinfo(host, *a, **k)

    eng = MeloTTSEngine(_config(models_dir))
    with mock.patch.object(socket.socket, "connect", connect), \
            mock.patch.object(socket.socket, "connect_ex", connect_ex), \
            mock.patch.object(socket, "getaddrinfo", getaddrinfo):
        eng.load()
    yield eng
    eng.shutdown()


def _samples(pcm: bytes) -> np.ndarray:
    assert isinstance(pcm, bytes) and len(pcm) % 2 == 0
    return np.frombuffer(pcm, dtype="<i2")


def _check_audio(pcm: bytes, min_s: float = 0.2) -> np.ndarray:
    x = _samples(pcm)
    assert x.size / SR >= min_s
    assert np.abs(x.astype(np.int32)).max() < 32767  # peak-safe, never clipped to full scale
    assert np.abs(x).max() > 1000  # not silence
    return x


def test_load_made_no_network_attempts(engine, net_attempts):
    assert engine.loaded
    assert net_attempts == []
    assert "melo.api" in sys.modules
    # Hub switched off by our code before melo was imported.
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_protocol_and_info(engine):
    assert isinstance(engine, TTSEngine)
    assert engine.name == "melo" and engine.sample_rate == SR
    info = engine.info().to_dict()
    assert info["device"] == "cpu" and info["details"]["model_sample_rate"] == 44100
    assert info["fallbacks"] == [] and info["models"]["melo"].endswith("melo-zh")
    # The cached_path shim is in only because the real package is not installed here.
    assert ("cached_path" in (info["details"]["shims"] or "")) == bool(getattr(sys.modules["cached_path"], "__s2s_shim__", False))


def test_bert_model_loaded_at_load_not_lazily(engine):
    import melo.text.chinese_bert as cb

    assert "bert-base-multilingual-uncased" in cb.models


@pytest.mark.parametrize("text", [
    "今天天气很好。",
    "打开WiFi然后播放Taylor Swift的歌",
    "会议在2024年5月1日10:30开始，预计50%的人参加，票价3.14元。",
])
def test_synthesize_returns_24k_pcm16(engine, text):
    _check_audio(engine.synthesize(text))


def test_trims_edge_silence(engine):
    x = _check_audio(engine.synthesize("你好。"))
    loud = np.flatnonzero(np.abs(x) > np.abs(x).max() * 0.01)
    assert loud[0] <= 0.1 * SR + 1 and (x.size - 1 - loud[-1]) <= 0.1 * SR + 1
    # trim_silence on a synthetic signal: 1 s silence, 0.5 s tone, 1 s silence at 24 kHz
    sig = np.concatenate([np.zeros(SR), 0.5 * np.sin(np.arange(SR // 2) * 0.1), np.zeros(SR)]).astype(np.float32)
    assert trim_silence(sig, SR).size == pytest.approx(SR // 2 + 2 * int(0.1 * SR), abs=2)


def test_stream_yields_one_chunk_per_sentence_first_before_rest(engine):
    text = "你好。今天天气不错！我们去公园吧？"
    before = engine.sentences_synthesized
    t0 = time.monotonic()
    seen = []
    for i, sentence, pcm in engine.synthesize_stream(text):
        # How many sentences had been synthesised when this chunk reached us.
        seen.append((i, sentence, engine.sentences_synthesized - before, time.monotonic() - t0, len(pcm)))
    assert [s[0] for s in seen] == [0, 1, 2]
    assert [s[1] for s in seen] == ["你好。", "今天天气不错！", "我们去公园吧？"]
    assert [s[2] for s in seen] == [1, 2, 3]  # the first chunk came after exactly one sentence
    assert seen[0][3] < seen[2][3]
    whole = engine.synthesize(text)
    assert len(whole) == sum(s[4] for s in seen)  # synthesize is the concatenation (deterministic)


def test_speed_is_honoured(engine):
    slow = _samples(engine.synthesize("今天天气很好，我们出去走走吧。", speed=0.5)).size
    fast = _samples(engine.synthesize("今天天气很好，我们出去走走吧。", speed=2.0)).size
    assert slow > 1.8 * fast


@pytest.mark.parametrize("text,fragment", [
    ("", "empty"),
    ("   \n\t ", "empty"),
    ("。。！？", "nothing speakable"),
    ("😀🎉👍", "nothing speakable"),
    ("Привет мир", "nothing speakable"),
])  # a text's length is the daemon's rule (limits.max_text_chars, live): tests/test_one_owner.py
def test_bad_text(engine, text, fragment):
    with pytest.raises(TextError) as e:
        engine.synthesize(text)
    assert e.value.code == ErrorCode.BAD_TEXT
    assert fragment in str(e.value)


def test_unspeakable_parts_are_skipped(engine):
    chunks = list(engine.synthesize_stream("😀😀。你好！🎉。"))
    assert [c[1] for c in chunks] == ["你好！🎉。"]
    _check_audio(chunks[0][2])


def test_bad_speed_and_language(engine):
    with pytest.raises(S2SError) as e:
        engine.synthesize("你好", speed=0)
    assert e.value.code == ErrorCode.BAD_REQUEST
    with pytest.raises(S2SError) as e:
        engine.synthesize("你好", language="fr")
    assert e.value.code == ErrorCode.UNSUPPORTED


def test_async_and_submit_serialise_on_one_worker(engine):
    async def both():
        return await asyncio.gather(engine.synthesize_async("第一句。"), engine.synthesize_async("第二句。"))

    a, b = asyncio.run(both())
    assert a == engine.synthesize("第一句。") and b == engine.synthesize("第二句。")
    # synthesize() called on the worker itself must not deadlock.
    assert engine.submit(engine.synthesize, "你好。").result(timeout=60) == engine.synthesize("你好。")


def test_cuda_error_during_synthesis_falls_back_once(engine):
    """A fake CUDA OOM (engine pretends to be on cuda:0) moves synthesis to the fallback device."""
    calls = []
    real = engine._infer

    def flaky(text, speed, device):
        calls.append(device)
        if device.startswith("cuda"):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(text, speed, device)

    engine.device = "cuda:0"
    try:
        with mock.patch.object(engine, "_infer", flaky):
            _check_audio(engine.synthesize("你好。"))
    finally:
        engine.device = "cpu"
        engine.fallbacks.clear()
    assert calls == ["cuda:0", "cpu"]


def test_cuda_unavailable_at_load_is_recorded(engine, models_dir):
    """Asking for cuda:0 on a host without a usable GPU loads on cpu, visibly."""
    from daemon import devices

    eng = MeloTTSEngine(_config(models_dir, device="cuda:0", fallback_device="cpu"))
    try:
        with mock.patch.object(devices, "probe_cuda", return_value=devices.CudaFacts(error="CUDA is not available")):
            eng.load()
        info = eng.info().to_dict()
        assert info["device"] == "cpu" and info["requested_device"] == "cuda:0"
        assert len(info["fallbacks"]) == 1 and info["fallbacks"][0]["to"] == "cpu"
        assert info["fallbacks"][0]["component"] == "tts.device" and info["fallbacks"][0]["from"] == "cuda:0"
        _check_audio(eng.synthesize("好的。"))
    finally:
        eng.shutdown()


def test_config_from_yaml(tmp_path):
    cfg = parse_config({"models_root": str(tmp_path), "tts": {"device": "cpu", "speed": 1.2,
                                                               "melo": {"model": "tiny/melo-zh"}},
                        "limits": {"max_text_chars": 100}}, env={})
    mc = MeloConfig.from_config(cfg)
    assert mc.model_dir == tmp_path / "tiny/melo-zh" and mc.hf_home == tmp_path / "hf"
    assert mc.nltk_data == tmp_path / "nltk_data"
    assert (mc.device, mc.sample_rate, mc.language) == ("cpu", 24000, "ZH")
    # Reloadable values are the daemon's, per request: no engine keeps a copy (issue 27).
    assert not hasattr(mc, "speed") and not hasattr(mc, "max_text_chars")


def test_missing_model_is_a_clear_error(tmp_path, models_dir):
    from daemon.errors import ModelMissingError

    eng = MeloTTSEngine(MeloConfig(model_dir=tmp_path / "nope", hf_home=models_dir / "tiny/hf",
                                   nltk_data=models_dir / "tiny/nltk_data"))
    try:
        with pytest.raises(ModelMissingError, match="checkpoint.pth"):
            eng.load()
    finally:
        eng.shutdown()


def test_offline_resources_listed_and_present(models_dir):
    t = models_dir / "tiny"
    assert melo_offline.missing_resources(t / "hf", t / "nltk_data") == []
    assert melo_offline.missing_resources(t / "nope", t / "nope")  # names what is missing
    req = melo_offline.required_resources()
    assert "bert-base-multilingual-uncased/model.safetensors" in req["hf"]
    assert "corpora/cmudict.zip" in req["nltk"]
