"""Streaming fsmn-vad segmentation (daemon/asr/vad.py) with the real bundled fsmn-vad model."""

from __future__ import annotations

import time

import numpy as np
import pytest

from daemon.audio import read_wav
from daemon.errors import ModelMissingError
from daemon.rules import clean_hotwords
from daemon.asr.base import join_cjk
from daemon.asr.vad import FsmnVAD, VADSegmenter

SR = 16000
# Tolerances from the acceptance criteria: a segment covers its manifest span and reaches at
# most 400 ms beyond either end.
SLACK = 0.4


@pytest.fixture(scope="module")
def vad(models_dir):
    v = FsmnVAD(models_dir / "fsmn-vad", ncpu=1)
    v.load()
    return v


def stream(seg: VADSegmenter, x: np.ndarray, chunk: int = 1600):
    events = []
    for i in range(0, len(x), chunk):
        events += seg.push(x[i:i + chunk])
    return events


def utterances(events):
    return [e for e in events if e.kind == "end"]


def test_long_file_splits_into_its_four_utterances(vad, fixtures_dir, manifest):
    row = next(r for r in manifest if r["kind"] == "long")
    x, sr = read_wav(fixtures_dir / row["path"])
    assert sr == SR
    seg = vad.segmenter()
    events = stream(seg, x, 1600) + seg.flush()
    ends = utterances(events)
    assert len(ends) == 4, [(e.start / SR, e.end / SR, e.reason) for e in ends]
    assert [e.kind for e in events] == ["start", "end"] * 4
    for ev, span in zip(ends, row["segments"]):
        start, end = ev.start / SR, ev.end / SR
        assert start <= span["start"] and end >= span["end"], (start, end, span)
        assert span["start"] - start <= SLACK and end - span["end"] <= SLACK, (start, end, span)
        assert ev.audio is not None and ev.audio.size == ev.end - ev.start
        np.testing.assert_array_equal(ev.audio, x[ev.start:ev.end])
    # The first three end on silence; the last one is closed by the flush.
    assert [e.reason for e in ends] == ["vad", "vad", "vad", "finalize"]


@pytest.mark.parametrize("name", ["zh/02.wav", "zh/07.wav", "zh/09.wav"])
def test_comma_pauses_do_not_split(vad, fixtures_dir, name):
    x, _ = read_wav(fixtures_dir / name)
    seg = vad.segmenter()
    # Trailing second of silence so the VAD ends the utterance itself.
    ends = utterances(stream(seg, np.concatenate([x, np.zeros(SR, np.float32)]), 3200) + seg.flush())
    assert len(ends) == 1
    assert ends[0].reason == "vad"


def test_chunk_size_does_not_change_segments(vad, fixtures_dir):
    x, _ = read_wav(fixtures_dir / "zh" / "long.wav")
    spans = []
    for chunk in (480, 1600, 7777, 32000):
        seg = vad.segmenter()
        spans.append([(e.start, e.end) for e in utterances(stream(seg, x, chunk) + seg.flush())])
    assert all(s == spans[0] for s in spans), spans


def _seen(vad: FsmnVAD, x: np.ndarray, kind: str, early_ms: int = 300) -> list:
    """When (samples pushed so far, in 100 ms pieces as the bridge sends) each `kind` event came."""
    seg = vad.segmenter()
    seg.early_silence_ms = early_ms
    at = []
    for i in range(0, len(x), SR // 10):
        at += [seg.total for ev in seg.push(x[i:i + SR // 10]) if ev.kind == kind]
    return at


@pytest.mark.parametrize("kind", ["pause", "end"])
def test_silence_in_an_utterance_is_watched_at_the_tail_step(vad, models_dir, fixtures_dir, manifest, kind):
    """While the VAD counts silence inside an utterance it runs every 100 ms (tail_step_ms), not
    every 200 ms: a pause (turn.early_silence) and the utterance's end are seen exactly when a
    VAD run every 100 ms throughout sees them (with 200 ms steps: up to 100 ms later, in about
    half the clips), and speech itself stays on 200 ms steps."""
    assert (vad.step_ms, vad.tail_step_ms) == (200, 100)
    fine = FsmnVAD(models_dir / "fsmn-vad", ncpu=1, step_ms=100)
    fine.load()
    pad = np.zeros(2 * SR, np.float32)
    clips = [read_wav(fixtures_dir / r["path"])[0] for r in manifest if r["lang"] == "zh" and r["kind"] == "utt"]
    for x in clips[:6]:
        y = np.concatenate([x, pad])
        assert _seen(vad, y, kind) == _seen(fine, y, kind)
    seg = vad.segmenter()
    sizes = []
    steps = seg.push_steps(clips[0][: 2 * SR])  # speech: whole 200 ms steps
    try:
        block = next(steps)
        while True:
            sizes.append(block.audio.size)
            block = steps.send(vad.run(block.audio, block.cache, is_final=False))
    except StopIteration:
        pass
    assert sizes and all(n % (SR // 5) == 0 for n in sizes), sizes


def test_a_pause_is_not_withdrawn_by_the_vad_settling_at_its_edge(vad, fixtures_dir):
    """A sentence with 400 ms of silence cut into it, then silence; turn.early_silence 0.2 (the
    speculation tests'), 100 ms pieces as the bridge sends: a pause in the cut, withdrawn by the
    speech after it, a pause at the end, the end. The VAD may still confirm a frame at a pause's
    edge: that was taken for speech again (a `resume` that withdrew the tentative, and another
    pause 100 ms later, another speculative reply wasted)."""
    x, _ = read_wav(fixtures_dir / "zh" / "01.wav")
    rms = np.sqrt(np.convolve(x * x, np.ones(320) / 320, mode="same"))
    lo, hi = int(len(x) * 0.4), int(len(x) * 0.6)
    cut = lo + int(np.argmin(rms[lo:hi]))
    y = np.concatenate([x[:cut], np.zeros(int(0.4 * SR), np.float32), x[cut:], np.zeros(int(1.5 * SR), np.float32)])
    seg = vad.segmenter()
    seg.early_silence_ms = 200
    events = stream(seg, y, SR // 10)
    assert [e.kind for e in events] == ["start", "pause", "resume", "pause", "end"], [
        (e.kind, e.end / SR) for e in events]
    assert events[-1].after_pause


def test_silence_and_empty_input_give_nothing(vad):
    seg = vad.segmenter()
    assert seg.push(np.zeros(0, np.float32)) == []
    assert stream(seg, np.zeros(5 * SR, np.float32)) == []
    assert seg.flush() == []
    assert not seg.in_speech
    assert seg.total == 5 * SR
    assert seg.buffered_samples <= seg.history + seg.step


def test_max_utterance_forces_contiguous_cuts(vad, fixtures_dir):
    # Nine utterances back to back (0.4 s gaps: under the 0.8 s end silence) are one long
    # stretch of speech for the VAD; a 4 s limit must cut it.
    x = np.concatenate([read_wav(fixtures_dir / "zh" / f"0{i}.wav")[0] for i in range(1, 10)])
    seg = vad.segmenter(max_utterance_seconds=4.0)
    ends = utterances(stream(seg, x, 3200) + seg.flush())
    forced = [e for e in ends if e.reason == "max_length"]
    assert len(forced) >= 5
    for e in forced:
        assert e.end - e.start == 4 * SR
    for a, b in zip(forced, forced[1:]):
        assert b.start == a.end  # nothing lost between forced cuts
    assert seg.buffered_samples <= (4.0 + seg.HISTORY_SECONDS) * SR + seg.step * seg.MAX_BLOCK_STEPS


def test_reset_restarts_the_timeline(vad, fixtures_dir):
    x, _ = read_wav(fixtures_dir / "zh" / "01.wav")
    seg = vad.segmenter()
    stream(seg, x[: len(x) // 2])
    assert seg.in_speech
    seg.reset()
    assert seg.total == 0 and not seg.in_speech and seg.buffered_samples == 0
    ends = utterances(stream(seg, x) + seg.flush())
    assert len(ends) == 1 and ends[0].start < 0.3 * SR


def test_three_minutes_of_speech_noise_and_silence_stay_bounded(vad, fixtures_dir):
    # 10 minutes would take ~15 s of VAD here; 3 minutes show the same bound.
    speech = np.concatenate([read_wav(fixtures_dir / "zh" / f"0{i}.wav")[0] for i in range(1, 10)])
    rng = np.random.default_rng(7)
    seg = vad.segmenter(max_utterance_seconds=10.0)
    peak = n_forced = n_ends = 0
    pos = 0
    t0 = time.monotonic()
    for second in range(180):
        kind = (second // 20) % 3
        if kind == 0:  # silence
            x = np.zeros(SR, np.float32)
        elif kind == 1:  # continuous speech (forces max_length cuts)
            x = np.take(speech, np.arange(pos, pos + SR), mode="wrap")
            pos += SR
        else:  # modulated noise
            env = 0.2 * (1 + np.sin(np.linspace(0, 8 * np.pi, SR)))
            x = (rng.standard_normal(SR) * env).astype(np.float32)
        for i in range(0, SR, 3200):
            for e in seg.push(x[i:i + 3200]):
                n_forced += e.reason == "max_length"
                n_ends += e.kind == "end"
                assert e.kind != "end" or e.end - e.start <= 10 * SR
        peak = max(peak, seg.buffered_samples)
    elapsed = time.monotonic() - t0
    assert peak <= (10.0 + seg.HISTORY_SECONDS + 1.0) * SR
    assert n_forced >= 3 and n_ends >= 6
    # About 5 s here; generous for a loaded CI machine.
    assert elapsed < 60, elapsed


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ModelMissingError, match="fsmn-vad"):
        FsmnVAD(tmp_path / "nope").load()


def test_hotword_cleaning_rejects_urls_and_files():
    assert clean_hotwords(["阿里巴巴", "达摩院 通义", "阿里巴巴"]) == ["阿里巴巴", "达摩院", "通义"]
    assert clean_hotwords(None) == []
    for bad in (["http://example.org/hw.txt"], ["words.txt"], ["a/b"], ["x" * 100], [3]):
        with pytest.raises(Exception) as info:
            clean_hotwords(bad)
        assert getattr(info.value, "code", None) is not None


def test_join_cjk_keeps_latin_word_spaces():
    assert join_cjk("打 开 google maps 地 图") == "打开google maps地图"
    assert join_cjk("set a timer") == "set a timer"
    assert join_cjk("") == ""
