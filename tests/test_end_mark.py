"""Whisper's P(sentence-end mark | the words so far) (daemon/asr/end_mark.py), on the bundled
Whisper base and real Mandarin fixtures: a whole sentence gets a high probability, the same
sentence cut mid-way a low one, whatever the batch it is scored in.
"""

from __future__ import annotations

import numpy as np
import pytest

from daemon.asr.end_mark import EndMarkScorer
from daemon.audio import read_wav

SR = 16000


@pytest.fixture(scope="module")
def whisper(models_dir):
    import ctranslate2
    from faster_whisper import WhisperModel
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.tokenizer import Tokenizer

    m = WhisperModel(str(models_dir / "whisper-base"), device="cpu", compute_type="int8", cpu_threads=2,
                     local_files_only=True)
    scorer = EndMarkScorer(m, lambda lang: Tokenizer(m.hf_tokenizer, True, task="transcribe", language=lang))

    def encode(x: np.ndarray) -> np.ndarray:
        x = np.concatenate([x, np.zeros(SR // 2, np.float32)])  # the decode's end padding
        mel = m.feature_extractor(x)
        return np.asarray(m.encode(pad_or_trim(mel[:, :mel.shape[-1] - 1], 3000)))

    def text(x: np.ndarray) -> str:
        segs, _ = m.transcribe(x, language="zh", beam_size=5, without_timestamps=True, vad_filter=False)
        return "".join(s.text for s in segs)

    return scorer, encode, text, ctranslate2.StorageView.from_array


def _clip(fixtures_dir, name: str, cut: float = 1.0) -> np.ndarray:
    """The fixture as the VAD hands it over (its quiet edges kept), or cut at `cut` of its speech."""
    x, _ = read_wav(str(fixtures_dir / "zh" / name))
    if cut >= 1.0:
        return x
    loud = np.where(np.abs(x) > 0.02)[0]
    return x[: loud[0] + int((loud[-1] - loud[0]) * cut)]


def test_a_whole_sentence_ends_and_the_same_sentence_cut_does_not(whisper, fixtures_dir):
    scorer, encode, text, view = whisper
    clips = []
    # 红烧肉需要用小火焖多久 | 红烧肉需要… ; 前方路口掉头，然后靠右行驶 | 前方路口掉头，然后…
    for name, cut in (("03.wav", 0.5), ("07.wav", 0.65)):
        clips += [("whole", _clip(fixtures_dir, name)), ("cut", _clip(fixtures_dir, name, cut))]
    texts = [text(x) for _, x in clips]
    encoded = [encode(x) for _, x in clips]
    alone = [scorer.score(view(e), [t], "zh")[0] for e, t in zip(encoded, texts)]
    for (kind, _), t, p in zip(clips, texts, alone):
        assert p is not None, t
        if kind == "whole":
            assert p >= 0.55, (t, p)
        else:
            assert p < 0.3, (t, p)
    together = scorer.score(view(np.concatenate(encoded)), texts, "zh")  # one batch: the same numbers
    assert np.allclose(together, alone, atol=1e-3), (together, alone)


def test_no_signal_without_a_prompt_for_the_language_or_without_words(whisper, fixtures_dir):
    scorer, encode, _, view = whisper
    e = view(encode(_clip(fixtures_dir, "03.wav")))
    assert scorer.score(e, ["How long should I braise it"], "en") == [None]
    assert scorer.score(e, ["。"], "zh") == [None]
