"""FunASR engine end to end: real fsmn-vad + tiny random Paraformer / streaming / SeACo / punc
models (daemon/models/tiny_funasr.py) through funasr's real loaders and inference code."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from daemon.asr.funasr_engine import FunASRConfig, FunASREngine, FunASRPool
from daemon.audio import float_to_pcm16, read_wav
from daemon.config import parse_config
from daemon.engines import ASRPool, ASRSession
from daemon.errors import AudioError, ErrorCode, ModelMissingError, S2SError, UnsupportedError
from helpers.funasr_tiny import make_config

SR = 16000


@pytest.fixture(scope="module")
def pool(tiny_funasr_pool):
    return tiny_funasr_pool


@pytest.fixture(scope="module")
def seaco_pool(models_dir):
    p = FunASRPool(make_config(models_dir, paraformer_dir=models_dir / "tiny" / "seaco-paraformer",
                               streaming_dir=None))
    p.load()
    yield p
    p.shutdown()


@pytest.fixture(scope="module")
def long_wav(fixtures_dir, manifest):
    row = next(r for r in manifest if r["kind"] == "long")
    x, _ = read_wav(fixtures_dir / row["path"])
    return x, row


@pytest.fixture()
def session(pool, request):
    sid = request.node.name
    eng = pool.open(sid)
    yield eng


def stream(eng, x, chunk=1600):
    events = []
    for i in range(0, len(x), chunk):
        events += eng.feed(x[i:i + chunk])
    return events


def test_protocols(pool, session):
    assert isinstance(pool, ASRPool)
    assert isinstance(session, ASRSession)


def test_long_file_gives_four_finals_with_partials_first(session, long_wav):
    x, row = long_wav
    events = stream(session, float_to_pcm16(x), 3200) + session.finalize_events()  # 100 ms of PCM16
    finals = [e for e in events if e["type"] == "final"]
    assert len(finals) == 4
    for f, span in zip(finals, row["segments"]):
        assert f["start"] <= span["start"] and f["end"] >= span["end"], (f, span)
        assert span["start"] - f["start"] <= 0.4 and f["end"] - span["end"] <= 0.4, (f, span)
        assert f["text"].strip(), f
    assert [f["reason"] for f in finals] == ["vad", "vad", "vad", "finalize"]
    assert [f["utterance"] for f in finals] == [0, 1, 2, 3]
    for u in range(4):
        mine = [e for e in events if e["utterance"] == u]
        kinds = [e["type"] for e in mine]
        assert kinds[0] == "speech_start" and kinds[-1] == "final"
        partials = [e for e in mine if e["type"] == "partial"]
        assert len(partials) >= 2, kinds
        assert all(p["text"] and p["start"] == mine[0]["start"] for p in partials)
        ends = [p["end"] for p in partials]
        assert ends == sorted(ends)
        # About one partial per 600 ms of speech.
        assert all(0.55 <= b - a <= 0.65 for a, b in zip(ends, ends[1:]))
    # Punctuation model ran: the tiny one always ends a sentence.
    assert all(f["text"][-1] in "，。？、" for f in finals)


def test_results_are_deterministic(pool, fixtures_dir):
    x, _ = read_wav(fixtures_dir / "zh" / "03.wav")
    texts = []
    for n in range(2):
        eng = pool.open(f"det{n}")
        texts.append([e["text"] for e in stream(eng, x) + eng.finalize_events() if e["type"] != "speech_start"])
    assert texts[0] == texts[1]


def test_feed_audio_returns_events_one_at_a_time(pool, long_wav):
    x, _ = long_wav
    eng = pool.open("seed")
    got = []
    for i in range(0, len(x), 1600):
        ev = eng.feed_audio(x[i:i + 1600])
        if ev is not None:
            got.append(ev)
    while (ev := eng.feed_audio(b"")) is not None:
        got.append(ev)
    got += eng.finalize_events()
    ref = pool.open("seed-ref")
    want = stream(ref, x) + ref.finalize_events()
    assert got == want


def test_no_partials_when_disabled(pool, fixtures_dir):
    x, _ = read_wav(fixtures_dir / "zh" / "02.wav")
    eng = pool.open("nopartials", partials=False)
    events = stream(eng, x) + eng.finalize_events()
    assert [e["type"] for e in events] == ["speech_start", "final"]


def test_finalize_mid_utterance_and_when_idle(session, fixtures_dir):
    x, _ = read_wav(fixtures_dir / "zh" / "01.wav")
    stream(session, x[: int(2.0 * SR)])
    final = session.finalize()
    assert final["type"] == "final" and final["reason"] == "finalize"
    assert final["text"] and 1.9 <= final["end"] <= 2.0 and final["utterance"] == 0
    again = session.finalize()
    assert again == {"type": "final", "text": "", "start": 2.0, "end": 2.0, "utterance": 1, "reason": "finalize"}
    # The timeline continues after finalize.
    events = stream(session, x) + session.finalize_events()
    assert events[0]["type"] == "speech_start" and events[0]["start"] >= 2.0


def test_reset_forgets_everything(session, fixtures_dir):
    x, _ = read_wav(fixtures_dir / "zh" / "01.wav")
    stream(session, x[: int(2.0 * SR)])
    session.reset()
    assert session.buffered_samples == 0
    assert session.finalize() == {"type": "final", "text": "", "start": 0.0, "end": 0.0, "utterance": 0,
                                  "reason": "finalize"}
    events = stream(session, x)
    assert events[0]["type"] == "speech_start" and events[0]["start"] < 0.3 and events[0]["utterance"] == 0


def test_bad_input(pool, session):
    with pytest.raises(AudioError):
        session.feed(b"\x00\x01\x02")
    with pytest.raises(AudioError):
        session.feed(np.array([0.0, np.nan], dtype=np.float32))
    assert session.feed(b"") == []
    assert session.feed(np.zeros(0, np.float32)) == []
    with pytest.raises(AudioError) as info:
        pool.open("8k", sample_rate=8000)
    assert info.value.code is ErrorCode.BAD_AUDIO
    with pytest.raises(S2SError):
        session.set_language("klingon")


def test_max_utterance_and_bounded_memory_on_a_long_stream(models_dir, fixtures_dir):
    p = FunASRPool(make_config(models_dir, max_utterance_seconds=6.0, streaming_dir=None))
    p.load()
    eng = p.open("long")
    speech = np.concatenate([read_wav(fixtures_dir / "zh" / f"0{i}.wav")[0] for i in range(1, 10)])
    rng = np.random.default_rng(1)
    peak, finals = 0, []
    for block in range(9):  # 3 minutes: 20 s blocks of speech, silence, noise
        if block % 3 == 0:
            x = np.resize(speech, 20 * SR)
        elif block % 3 == 1:
            x = np.zeros(20 * SR, np.float32)
        else:
            x = (0.1 * rng.standard_normal(20 * SR)).astype(np.float32)
        for i in range(0, len(x), 3200):
            finals += [e for e in eng.feed(x[i:i + 3200]) if e["type"] == "final"]
            peak = max(peak, eng.buffered_samples)
    assert peak <= (6.0 + 3.0 + 1.0) * SR
    assert any(f["reason"] == "max_length" for f in finals)
    assert all(f["end"] - f["start"] <= 6.0 + 1e-6 for f in finals)
    p.shutdown()


# --- hotwords ---------------------------------------------------------------------------


def test_hotwords_with_seaco(seaco_pool, fixtures_dir):
    assert seaco_pool.capabilities().hotwords is True
    x, _ = read_wav(fixtures_dir / "zh" / "01.wav")
    eng = seaco_pool.open("hw", hotwords=["阳台", "浇水"])
    assert eng.hotwords == ["阳台", "浇水"]
    with_hw = [e for e in stream(eng, x) + eng.finalize_events() if e["type"] == "final"]
    eng.set_hotwords([])
    without = [e for e in stream(eng, x) + eng.finalize_events() if e["type"] == "final"]
    assert with_hw[0]["text"] and without[0]["text"]
    # The bias path really ran: SeACo's hotword decoder changes a random model's output.
    assert with_hw[0]["text"] != without[0]["text"]


def test_hotwords_rejected_by_plain_paraformer(pool):
    assert pool.capabilities().hotwords is False
    with pytest.raises(UnsupportedError, match="hotwords") as info:
        pool.open("hw-plain", hotwords=["阳台"])
    assert info.value.code is ErrorCode.UNSUPPORTED
    eng = pool.open("hw-plain")
    with pytest.raises(UnsupportedError):
        eng.set_hotwords(["阳台"])
    eng.set_hotwords([])  # clearing is always fine


def test_url_hotwords_are_refused(seaco_pool):
    with pytest.raises(S2SError) as info:
        seaco_pool.open("hw-url", hotwords=["http://example.org/hotwords.txt"])
    assert info.value.code is ErrorCode.BAD_REQUEST


# --- pool -------------------------------------------------------------------------------


def test_the_pool_keeps_no_sessions_and_no_cap(pool):
    # The daemon admits (limits.max_sessions, reloadable) and keeps the sessions (duplicate ids,
    # idle sessions: tests/test_daemon.py); the pool only builds engines over its models.
    engines = [pool.open(f"cap{i}") for i in range(40)]
    again = pool.open("cap0")
    assert again is not engines[0] and again._seg is not engines[0]._seg


def test_reloadable_values_reach_a_session_per_call(pool):
    """The daemon hands live values to each open; the pool's config is only the default."""
    default = pool.open("defaults")
    assert default._interval == int(round(pool.config.partial_interval * SR))
    assert default._seg.max_utterance == int(pool.config.max_utterance_seconds * SR)
    eng = pool.open("per-call", partial_interval=1.2, max_utterance_seconds=5.0)
    assert eng._interval == int(1.2 * SR) and eng._seg.max_utterance == 5 * SR


def test_submit_runs_on_the_worker_thread(pool, fixtures_dir):
    x, _ = read_wav(fixtures_dir / "zh" / "08.wav")
    eng = pool.open("worker")
    seen = []

    def work():
        seen.append(threading.current_thread().name)
        return eng.feed(x) + eng.finalize_events()

    events = pool.submit(work).result(timeout=60)
    assert seen and seen[0].startswith("asr-funasr") and seen[0] != threading.current_thread().name
    assert events[-1]["type"] == "final" and events[-1]["text"]
    assert pool.submit(threading.get_ident).result() == pool.submit(threading.get_ident).result()


def test_info_reports_models_and_capabilities(pool):
    info = pool.info().to_dict()
    assert info["engine"] == "funasr" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["capabilities"]["partials"] and info["capabilities"]["punctuation"]
    assert info["details"]["model_class"] == "BiCifParaformer" and info["fallbacks"] == []
    assert set(info["models"]) >= {"paraformer", "vad", "punc"}


def test_cuda_request_without_cuda_falls_back_and_says_so(models_dir):
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    p = FunASRPool(make_config(models_dir, device="cuda:1", streaming_dir=None, punc_dir=None))
    p.load()
    info = p.info().to_dict()
    assert info["device"] == "cpu" and info["fallbacks"]
    f = info["fallbacks"][0]
    assert (f["component"], f["from"], f["to"], f["when"]) == ("asr.device", "cuda:1", "cpu", "load")
    p.shutdown()


def test_cuda_error_during_inference_reloads_on_cpu(models_dir, fixtures_dir):
    """Fault injection: the first recognition raises what a failing GPU raises (a named fake
    error; this host has no GPU). The pool must reload on the CPU, retry, and report it."""
    p = FunASRPool(make_config(models_dir, streaming_dir=None))
    p.load()
    p.device = "cuda:0"  # pretend the models live on a GPU
    real = p._asr

    class FailingGPUModel:
        def generate(self, *a, **kw):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (fake, injected)")

    p._asr = FailingGPUModel()
    x, _ = read_wav(fixtures_dir / "zh" / "05.wav")
    eng = p.open("gpu")
    events = stream(eng, x) + eng.finalize_events()
    assert events[-1]["type"] == "final" and events[-1]["text"]
    assert p.device == "cpu" and p._asr is not real and len(p.fallbacks) == 1
    f = p.info().fallbacks[0]
    assert "CUDA error" in f.reason and (f.from_, f.to, f.when) == ("cuda:0", "cpu", "recognition")
    p.shutdown()


def test_from_config_and_missing_models(models_dir, tmp_path):
    cfg = parse_config({"models_root": str(models_dir),
                        "asr": {"device": "cpu", "funasr": {"paraformer": "tiny/paraformer", "punc": "",
                                                            "streaming": "tiny/paraformer-streaming"}},
                        "limits": {"max_sessions": 3, "max_utterance_seconds": 12.0}}, env={})
    fc = FunASRConfig.from_config(cfg)
    assert fc.paraformer_dir == models_dir / "tiny" / "paraformer"
    assert fc.vad_dir == models_dir / "fsmn-vad" and fc.punc_dir is None
    assert fc.max_utterance_seconds == 12.0 and fc.batch_size == 1
    assert fc.missing() == []
    bad = dataclasses.replace(fc, paraformer_dir=tmp_path / "absent")
    assert bad.missing() == [str(tmp_path / "absent")]
    with pytest.raises(ModelMissingError, match="absent"):
        FunASRPool(bad).load()


def test_standalone_engine_seed_interface(models_dir, fixtures_dir):
    eng = FunASREngine(make_config(models_dir, streaming_dir=None, punc_dir=None))
    x, _ = read_wav(fixtures_dir / "zh" / "04.wav")
    first = None
    for i in range(0, len(x), 1600):
        first = first or eng.feed_audio(float_to_pcm16(x[i:i + 1600]))
    assert first is not None and first["type"] == "speech_start"
    final = eng.finalize()
    assert final["type"] == "final" and final["text"] and "，" not in final["text"]
    eng.set_language("auto")
    eng.reset()


# --- tiny model builders ---------------------------------------------------------------


def test_tiny_builders_are_deterministic_and_idempotent(models_dir, tmp_path):
    from daemon.models import store as modelstore, tiny_funasr

    tiny_funasr.COMPONENTS["tiny/ct-punc"](tmp_path)
    built = tmp_path / "tiny" / "ct-punc" / "model.pt"
    ref = torch.load(models_dir / "tiny" / "ct-punc" / "model.pt", map_location="cpu")
    new = torch.load(built, map_location="cpu")
    assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)
    mtime = built.stat().st_mtime_ns
    tiny_funasr.COMPONENTS["tiny/ct-punc"](tmp_path)
    assert built.stat().st_mtime_ns == mtime
    reports = modelstore.verify(tmp_path)
    assert [r.name for r in reports] == ["tiny/ct-punc"] and reports[0].ok
