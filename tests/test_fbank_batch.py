"""Batched kaldi fbank (daemon/asr/fbank_batch.py) against funasr's online frontend computing each
session's own, on real speech, for the VAD's frontend and the streaming Paraformer's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daemon.audio import read_wav
from daemon.asr.fbank_batch import FbankBatch


def _frontend(models_dir, name):
    from funasr import AutoModel

    from daemon.asr.vad import FUNASR_QUIET

    m = AutoModel(model=str(models_dir / name), frontend_conf={"dither": 0.0}, device="cpu", ncpu=1, **FUNASR_QUIET)
    return m.kwargs["frontend"]


@pytest.fixture(scope="module")
def speech(fixtures_dir, manifest):
    """Six sessions' worth of real speech, each long enough for every step of the tests."""
    clips = [read_wav(fixtures_dir / r["path"])[0] for r in manifest if r["lang"] == "zh"]
    joined = np.concatenate(clips)
    return [np.roll(joined, 16000 * i) for i in range(6)]


def _feed(frontend, block, cache):
    from funasr.utils.load_utils import extract_fbank

    feats, lens = extract_fbank([block], data_type="sound", frontend=frontend, cache=cache, is_final=False)
    return feats, lens


@pytest.mark.parametrize("name,block", [("fsmn-vad", 3200), ("tiny/paraformer-streaming", 9600)])
def test_batched_fbank_gives_each_session_its_own_features(models_dir, speech, name, block):
    """Sessions with different amounts carried over (blocks of 1 to 3 x the step, so the
    samples left for the next call differ) get the features and the frontend state funasr's
    per-session fbank gives them, step after step."""
    frontend = _frontend(models_dir, name)
    own = [{} for _ in speech]
    mine = [{} for _ in speech]
    batch = FbankBatch(frontend)
    assert batch.usable
    pos = [0] * len(speech)
    compared = 0
    for step in range(6):
        items = []
        for i, x in enumerate(speech):
            n = block * (1 + (i + step) % 3) + 37 * i
            items.append(torch.from_numpy(np.ascontiguousarray(x[pos[i]:pos[i] + n], dtype=np.float32)))
            pos[i] += n
        expected = [_feed(frontend, b, c) for b, c in zip(items, own)]  # nothing prepared: funasr's own
        batch.prepare([(c, b) for c, b in zip(mine, items)])
        got = [_feed(frontend, b, c) for b, c in zip(items, mine)]
        for (ef, el), (gf, gl), a, b in zip(expected, got, own, mine):
            assert torch.equal(el, gl)
            np.testing.assert_allclose(gf.numpy(), ef.numpy(), rtol=0, atol=2e-4)
            assert torch.equal(a["input_cache"], b["input_cache"])
            assert torch.equal(a["reserve_waveforms"], b["reserve_waveforms"])
            compared += int(gf.numel() > 0)
    assert batch.batches == 6 and compared > 20


def test_unprepared_or_mismatched_calls_are_funasrs_own(models_dir, speech):
    """A session whose rows were not prepared, or whose call differs from what was prepared,
    gets funasr's own fbank (nothing stale is used)."""
    frontend = _frontend(models_dir, "fsmn-vad")
    batch = FbankBatch(frontend)
    x = torch.from_numpy(np.ascontiguousarray(speech[0][:6400], dtype=np.float32))
    a, b, ref = {}, {}, {}
    batch.prepare([(a, x), (b, x)])
    shorter = x[:3200]
    feats, _ = _feed(frontend, shorter, a)  # prepared for 6400 samples, called with 3200
    expected, _ = _feed(frontend, shorter, ref)
    assert torch.equal(feats, expected)
    # Discarded rows are never used: the same length of other audio gets its own features.
    batch.discard([b])
    other = torch.from_numpy(np.ascontiguousarray(speech[1][:6400], dtype=np.float32))
    feats_b, _ = _feed(frontend, other, b)
    expected_b, _ = _feed(frontend, other, {})
    assert torch.equal(feats_b, expected_b)


def test_a_failed_batched_pass_leaves_each_session_its_own(models_dir, speech, monkeypatch, caplog):
    """The batched pass is only a speed-up: if it fails it is logged and every session's
    frontend computes its own features, as if nothing had been prepared."""
    frontend = _frontend(models_dir, "fsmn-vad")
    batch = FbankBatch(frontend)

    def broken(frames):
        raise RuntimeError("fake: the batched fbank failed")

    monkeypatch.setattr(batch, "_fbank", broken)
    x = torch.from_numpy(np.ascontiguousarray(speech[0][:6400], dtype=np.float32))
    a, ref = {}, {}
    batch.prepare([(a, x), ({}, x)])
    assert "batched pass for 2 sessions failed" in caplog.text
    assert torch.equal(_feed(frontend, x, a)[0], _feed(frontend, x, ref)[0])
