"""Endpointing that knows sentences (issue 17): at the early silence, speech judged a whole
sentence gets its final at once; speech that stops mid-phrase waits for the VAD's end silence.

The real fsmn-vad and tiny random FunASR models in process. The tiny punctuation model has no
opinion worth testing, so where a test is about the endpointing mechanics the judgement itself
is FAKED (`judge`): the engine asks `pool.sentence_end_request`, the fake answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

from daemon.asr.base import SENTENCE_END_MARKS, PoolBase, SentenceEnd

SR = 16000
FIX = Path(__file__).parent / "fixtures" / "zh"


def pcm_f32(name: str) -> np.ndarray:
    from daemon.audio import read_wav

    x, sr = read_wav(FIX / name)
    assert sr == SR
    return x


@pytest.fixture(scope="module")
def pool(tiny_funasr_pool):
    return tiny_funasr_pool


@pytest.fixture()
def judge(pool, monkeypatch):
    """A FAKE sentence judgement: what it is set to, and the texts it was asked about."""
    state: Dict[str, Any] = {"answer": True, "asked": []}

    def fake(req: SentenceEnd) -> bool:
        state["asked"].append(req.text)
        return bool(state["answer"])

    monkeypatch.setattr(pool, "sentence_end_request", fake)
    return state


def run(pool, audio: np.ndarray, name: str, early: float = 0.3, sentences: bool = True,
        text_end: "float | None" = None) -> List[Dict[str, Any]]:
    e = pool.open(name, partials=False)
    e.set_early_silence(early)
    e.set_sentence_end(sentences, text_end)
    events: List[Dict[str, Any]] = []
    for i in range(0, len(audio), 3200):
        events += e.feed(audio[i:i + 3200])
    events += e.finalize_events()
    return [ev for ev in events if ev["type"] != "final" or ev["text"]]


def test_a_whole_sentence_is_final_at_the_early_silence(pool, judge):
    x = pcm_f32("01.wav")
    audio = np.concatenate([x, np.zeros(2 * SR, np.float32)])
    on = run(pool, audio, "s-on")
    judge["answer"] = None  # off: not asked at all
    off = run(pool, audio, "s-off", sentences=False)
    assert judge["asked"] and all(judge["asked"])
    f_on = [e for e in on if e["type"] == "final"]
    f_off = [e for e in off if e["type"] == "final"]
    assert len(f_on) == 1 and len(f_off) == 1, (on, off)
    assert f_on[0]["reason"] == "sentence" and f_off[0]["reason"] in ("vad", "finalize")
    assert f_on[0]["text"] == f_off[0]["text"]
    # the same speech, closed at its pause: no tentative for it, and the VAD's own end of the
    # segment (0.5 s or more later) does not make a second final
    assert not [e for e in on if e["type"] == "tentative"]
    assert abs(f_on[0]["end"] - f_off[0]["end"]) < 0.25, (f_on, f_off)
    assert [e["type"] for e in on] == ["speech_start", "final"]


def test_a_probability_is_read_against_the_configured_text_end(pool, judge, monkeypatch):
    """An engine that answers P(the sentence ends) (Whisper, asr/end_mark.py): the sentence rule
    reads it against turn.judge_text_end as configured (the daemon passes it), not the default
    0.45 (before: the default, whatever the config said). The probability is FAKED, 0.3."""
    audio = np.concatenate([pcm_f32("01.wav"), np.zeros(2 * SR, np.float32)])
    monkeypatch.setattr(pool, "sentence_end_request", lambda req: (judge["asked"].append(req.text), 0.3)[1])

    def reasons(**kw: Any) -> List[str]:
        return [e["reason"] for e in run(pool, audio, f"p-{kw}", **kw) if e["type"] == "final"]

    assert reasons() != ["sentence"]                     # 0.3 < the default 0.45
    assert reasons(text_end=0.25) == ["sentence"]        # turn.judge_text_end: 0.25
    assert reasons(text_end=0.5) != ["sentence"]
    assert judge["asked"]


def test_speech_that_goes_on_after_a_sentence_is_the_next_utterance(pool, judge):
    x, y = pcm_f32("01.wav"), pcm_f32("03.wav")
    gap = 0.45  # past the early silence, under the VAD's 0.8 s end silence
    audio = np.concatenate([x, np.zeros(int(gap * SR), np.float32), y, np.zeros(2 * SR, np.float32)])
    events = run(pool, audio, "s-more")
    finals = [e for e in events if e["type"] == "final"]
    starts = [e for e in events if e["type"] == "speech_start"]
    assert [e["reason"] for e in finals][:1] == ["sentence"], events
    assert len(finals) >= 2 and len(starts) == len(finals), events
    # the second utterance holds the speech after the pause, not the first sentence again
    assert finals[1]["start"] >= finals[0]["end"], finals
    assert finals[1]["start"] < len(x) / SR + gap + 0.2
    assert finals[0]["utterance"] == 0 and finals[1]["utterance"] == 1


def test_speech_that_stops_mid_phrase_waits_for_the_end_silence(pool, judge):
    judge["answer"] = False
    x = pcm_f32("02.wav")
    audio = np.concatenate([x, np.zeros(2 * SR, np.float32)])
    events = run(pool, audio, "s-mid")
    kinds = [e["type"] for e in events]
    assert "tentative" in kinds and kinds.count("final") == 1, events
    assert next(e for e in events if e["type"] == "final")["reason"] in ("vad", "finalize")


def test_funasr_asks_its_punctuation_model_what_it_predicted_before_closing_with_a_period(pool):
    """funasr ends every punctuated text with 。, so the last mark of a final says nothing; the
    engine asks the CT-Transformer for its label after the last word instead."""
    x = pcm_f32("02.wav")
    text = pool.decode(x)
    assert text.endswith("。")  # always: funasr turns a trailing ， into 。
    verdict = pool.sentence_end_request(SentenceEnd(text))
    assert isinstance(verdict, bool)
    model = pool._punc.model
    labels = list(model.punc_list)
    assert "。" in labels and "，" in labels
    # the verdict is the model's own: flip the model's last-position scores and it flips
    import torch

    real = model.punc_forward

    def forced(label):
        def fwd(text, text_lengths, **kw):
            y, h = real(text, text_lengths, **kw)
            y = torch.full_like(y, -10.0)
            y[..., labels.index(label)] = 10.0
            return y, h
        return fwd

    try:
        model.punc_forward = forced("。")
        assert pool.sentence_end_request(SentenceEnd(text)) is True
        model.punc_forward = forced("，")
        assert pool.sentence_end_request(SentenceEnd(text)) is False
    finally:
        model.punc_forward = real


def test_engines_with_their_own_punctuation_judge_by_the_last_mark():
    judge = PoolBase.sentence_end_request
    assert all(judge(None, SentenceEnd("好的" + m)) for m in SENTENCE_END_MARKS)  # type: ignore[arg-type]
    assert not judge(None, SentenceEnd("打开灯，"))  # type: ignore[arg-type]
    assert not judge(None, SentenceEnd("and then"))  # type: ignore[arg-type]


def test_config_and_off_switch():
    from daemon.config import parse_config

    assert parse_config({}).turn.sentence_end is True
    assert parse_config({"turn": {"sentence_end": False}}).turn.sentence_end is False
