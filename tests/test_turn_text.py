"""The turn judge's text signal on the default engine (issue 24): Whisper's P(a sentence-end mark
follows the words | the audio) (daemon/asr/end_mark.py) read by the judge's rule.

- The rule with a probability (no model): what ends, what goes on, what is left to the VAD.
- The bundled Whisper base answers the judge's `SentenceEnd` (with the audio) with that
  probability: high after a whole fixture, low after the same fixture cut mid-way.
- In process, the real chain on the default engines (bundled Whisper base, real fsmn-vad, real
  Smart Turn): a whole sentence then silence gets its final at the pause (reason `turn`), well
  before the VAD's 0.8 s; the same sentence cut mid-way does not.
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import pytest

from daemon.asr.base import SentenceEnd
from daemon.asr.turn_judge import (COMPLETE, UNFINISHED, UNSURE, JudgeSettings, Thresholds, TurnJudge, decide,
                               text_signal)
from daemon.config import ConfigError, TurnConfig, parse_config
from test_turn_judge import SMART_TURN, pcm_f32, run, silence

SR = 16000
TH = Thresholds(complete=0.99, with_text=0.5, unfinished=0.0, text_end=0.45, text_unfinished=0.02)


def _cut(x: np.ndarray, at: float) -> np.ndarray:
    loud = np.where(np.abs(x) > 0.02)[0]
    return x[: loud[0] + int((loud[-1] - loud[0]) * at)]


def test_the_rule_reads_a_probability():
    s = "红烧肉需要用小火炖多久"
    assert decide(0.6, 0.8, s, TH) == COMPLETE          # the words end here, the audio agrees enough
    assert decide(0.3, 0.8, s, TH) == UNSURE            # the audio does not: the VAD decides
    assert decide(0.9, 0.3, s, TH) == UNSURE            # the words are not sure
    assert decide(0.9, 0.01, s, TH) == UNFINISHED       # the words go on: held up to max_silence
    assert decide(0.995, 0.01, s, TH) == COMPLETE       # the audio alone, sure (turn.judge_complete)
    assert decide(0.9, 0.9, "提醒我晚上八点给", TH) == UNFINISHED  # trailing words win
    assert decide(None, 0.8, s, TH) == COMPLETE and decide(None, 0.01, s, TH) == UNFINISHED
    # a yes/no signal (FunASR's punctuation label) keeps its meaning
    assert decide(0.6, True, s, TH) == COMPLETE and decide(0.6, False, s, TH) == UNSURE
    # an engine's failure is no signal, not a "yes"
    assert text_signal(RuntimeError("boom")) is None and text_signal(0.5) == 0.5 and text_signal(True) is True


def test_the_thresholds_are_configured_and_validated():
    t = parse_config({}).turn
    assert 0 <= t.judge_text_unfinished <= t.judge_text_end <= 1
    assert (TurnConfig.judge_text_end, TurnConfig.judge_text_unfinished) == (t.judge_text_end, t.judge_text_unfinished)
    for bad in ({"judge_text_end": 1.5}, {"judge_text_unfinished": 0.5, "judge_text_end": 0.4},
                {"judge_text_unfinished": -0.1}):
        with pytest.raises(ConfigError, match="turn.judge_text"):
            parse_config({"turn": bad})


@pytest.fixture(scope="module")
def whisper(models_dir):
    from daemon.asr.whisper_engine import WhisperConfig, WhisperPool

    p = WhisperPool(WhisperConfig(model_dir=models_dir / "whisper-base", vad_dir=models_dir / "fsmn-vad",
                                  partial_interval=0))
    p.load()
    yield p
    p.shutdown()


def test_whisper_answers_the_judge_with_a_probability(whisper):
    from daemon.asr.base import Decode

    whole = pcm_f32("03.wav")  # 红烧肉需要用小火焖多久
    cut = _cut(whole, 0.5)
    p = {}
    for name, x in (("whole", whole), ("cut", cut)):
        text = str(whisper.decode_requests([Decode(x, (), "zh")])[0][0])
        p[name] = whisper.sentence_end_request(SentenceEnd(text, x, "zh"))
        assert isinstance(p[name], float) and 0.0 <= p[name] <= 1.0, (name, text, p[name])
        # without the audio (turn.sentence_end's question), or for a language without a prompt: the mark
        assert isinstance(whisper.sentence_end_request(SentenceEnd(text)), bool)
        assert isinstance(whisper.sentence_end_request(SentenceEnd(text, x, "en")), bool)
    assert p["whole"] >= TurnConfig.judge_text_end > p["cut"], p


def _run(pool, audio: np.ndarray, name: str) -> List[Dict[str, Any]]:
    return [ev for ev in run(pool, audio, name) if ev["type"] in ("tentative", "final") and ev.get("text")]


def test_the_default_engine_ends_a_whole_sentence_at_the_pause_and_not_a_cut_one(whisper, models_dir):
    t = TurnConfig()
    judge = TurnJudge(JudgeSettings(model=models_dir / SMART_TURN, max_silence=t.max_silence,
                                    thresholds=Thresholds(t.judge_complete, t.judge_with_text, t.judge_unfinished,
                                                          t.judge_text_end, t.judge_text_unfinished)))
    assert judge.load()
    whisper.judge = judge
    try:
        x = pcm_f32("03.wav")
        speech_end = np.where(np.abs(x) > 0.02)[0][-1] / SR
        whole = _run(whisper, np.concatenate([x, silence(2.5)]), "tt-whole")
        finals = [e for e in whole if e["type"] == "final"]
        assert len(finals) == 1 and finals[0]["reason"] == "turn", whole
        # judged at the pause (0.3 s of silence, one feed later), not after the VAD's 0.8 s
        assert finals[0]["at"] - speech_end < 0.8 + 0.2, (finals[0], speech_end)
        cut = _run(whisper, np.concatenate([_cut(x, 0.5), silence(2.5)]), "tt-cut")
        assert [e["reason"] for e in cut if e["type"] == "final"] != ["turn"], cut
        assert judge.counts["turn_judge_complete"] >= 1 and judge.counts["turn_judge_calls"] >= 1, judge.counts
    finally:
        whisper.judge = None
