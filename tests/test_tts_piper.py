"""PiperEngine with the bundled English voice; a real-voice check: Whisper base (bundled)
transcribes Piper's audio back to the manifest's English sentences."""

from __future__ import annotations

import re

import numpy as np
import pytest

from daemon import audio
from daemon.config import parse_config
from daemon.engines import TTSEngine
from daemon.errors import ErrorCode, TextError
from daemon.tts.piper_engine import PiperConfig, PiperEngine

SR = 24000


@pytest.fixture(scope="module")
def engine(models_dir):
    eng = PiperEngine(PiperConfig(voice=models_dir / "piper" / "en_US-joe-medium.onnx"))
    eng.load()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def whisper(models_dir):
    from faster_whisper import WhisperModel

    return WhisperModel(str(models_dir / "whisper-base"), device="cpu", compute_type="int8", cpu_threads=2)


def _words(text: str) -> str:
    from num2words import num2words

    text = re.sub(r"\d+", lambda m: " " + num2words(int(m.group(0))) + " ", text.lower())
    return " ".join(re.sub(r"[^a-z' ]+", " ", text.replace("-", " ")).split())


def test_protocol_and_info(engine):
    assert isinstance(engine, TTSEngine)
    info = engine.info().to_dict()
    assert info["engine"] == "piper" and info["sample_rate"] == SR and info["details"]["model_sample_rate"] == 22050
    assert info["fallbacks"] == []


def test_stream_one_chunk_per_sentence(engine):
    before = engine.sentences_synthesized
    firsts = []
    chunks = []
    for i, sentence, pcm in engine.synthesize_stream("Hello there. How are you today? I am fine.", "en"):
        firsts.append(engine.sentences_synthesized - before)
        chunks.append((i, sentence, pcm))
    assert [c[1] for c in chunks] == ["Hello there.", "How are you today?", "I am fine."]
    assert firsts == [1, 2, 3]
    for _, _, pcm in chunks:
        x = np.frombuffer(pcm, dtype="<i2")
        assert 0.3 * SR < x.size < 4 * SR and np.abs(x).max() > 1000


def test_speed(engine):
    slow = len(engine.synthesize("Set a timer for fifteen minutes.", "en", speed=0.5))
    fast = len(engine.synthesize("Set a timer for fifteen minutes.", "en", speed=2.0))
    assert slow > 2.5 * fast


@pytest.mark.parametrize("text", ["", "  ", "?!...", "😀😀"])  # length: the daemon's rule (test_one_owner.py)
def test_bad_text(engine, text):
    with pytest.raises(TextError) as e:
        engine.synthesize(text, "en")
    assert e.value.code == ErrorCode.BAD_TEXT


def test_piper_speaks_what_whisper_hears(engine, whisper, manifest):
    import jiwer

    rows = [r for r in manifest if r["lang"] == "en"]
    assert rows
    refs, hyps = [], []
    for row in rows:
        pcm = engine.synthesize(row["text"], "en")
        x16 = audio.resample(audio.to_float32(pcm), SR, 16000)
        segments, _ = whisper.transcribe(x16, language="en", beam_size=1, vad_filter=False)
        refs.append(_words(row["text"]))
        hyps.append(_words(" ".join(s.text for s in segments)))
    wer = jiwer.wer(refs, hyps)
    assert wer <= 0.30, (wer, refs, hyps)


def test_config_from_yaml(tmp_path):
    cfg = parse_config({"models_root": str(tmp_path), "tts": {"device": "cpu", "engine": "piper"}}, env={})
    pc = PiperConfig.from_config(cfg)
    assert pc.voice == tmp_path / "piper/en_US-joe-medium.onnx" and pc.sample_rate == SR


def test_english_voice_skips_chinese_instead_of_reading_noise(engine, whisper):
    """The bundled English voice is the fallback for a Chinese product: it speaks the Latin
    words of a mixed reply, and a Chinese-only text is a clear bad_text error."""
    from daemon.errors import ErrorCode, TextError

    assert engine.info().details["voice_language"] == "en_US"
    assert engine.info().capabilities.languages == ("en",)  # what the voice can really speak
    mixed = engine.synthesize("你说的是：Set a timer for fifteen minutes.")
    plain = engine.synthesize("Set a timer for fifteen minutes.")
    assert abs(len(mixed) - len(plain)) < 0.1 * len(plain)  # the Chinese part adds nothing
    with pytest.raises(TextError) as ei:
        engine.synthesize("打开地图，导航回家。")
    assert ei.value.code == ErrorCode.BAD_TEXT and "cannot pronounce" in str(ei.value)
    # one Chinese-only sentence among English ones is skipped, the rest is spoken
    chunks = list(engine.synthesize_stream("打开地图。Then play some music."))
    assert [c[1] for c in chunks] == ["Then play some music."]
