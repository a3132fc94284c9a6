"""The streaming Paraformer batched across sessions (daemon/asr/paraformer_stream.py) against
funasr's own one-session path, on real Mandarin speech through the tiny random
streaming Paraformer in the real model's layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daemon.asr.base import StreamChunk
from daemon.asr.funasr_engine import STREAM_KW, STREAM_SAMPLES
from daemon.audio import read_wav
from daemon.config import Config
from daemon.asr.paraformer_stream import BatchedStreaming, _cif


def _load(model_dir):
    from funasr import AutoModel

    from daemon.asr.vad import FUNASR_QUIET

    return AutoModel(model=str(model_dir), frontend_conf={"dither": 0.0}, device="cpu", ncpu=1, **FUNASR_QUIET)


@pytest.fixture(scope="module")
def automodel(models_dir):
    return _load(models_dir / "tiny" / "paraformer-streaming")


@pytest.fixture(scope="module")
def centered_decoder(models_dir, tmp_path_factory):
    """The same weights with the decoder's FSMN centred (`sanm_shfit: 0`): a row's padding
    would reach its real tokens, so rows must be grouped by length instead."""
    import shutil

    import yaml

    d = tmp_path_factory.mktemp("centered") / "paraformer-streaming"
    shutil.copytree(models_dir / "tiny" / "paraformer-streaming", d)
    conf = yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8"))
    conf["decoder_conf"]["sanm_shfit"] = 0
    (d / "config.yaml").write_text(yaml.safe_dump(conf), encoding="utf-8")
    return _load(d)


@pytest.fixture(scope="module")
def int8_model(models_dir):
    """The same weights with the Linear layers dynamic int8: what a full-size pool runs its
    partials on, on the CPU (daemon/asr/funasr_engine.py `_int8`)."""
    from daemon.asr.funasr_engine import _int8

    m = _load(models_dir / "tiny" / "paraformer-streaming")
    _int8(m.model)
    assert any("quantized" in type(x).__module__ for x in m.model.modules())
    return m


@pytest.fixture(scope="module")
def speech(fixtures_dir, manifest):
    out = []
    for row in manifest:
        if row["lang"] == "zh":
            x, _ = read_wav(fixtures_dir / row["path"])
            out.append(x)
    return out


def _chunks(x):
    return [x[i:i + STREAM_SAMPLES] for i in range(0, len(x) - STREAM_SAMPLES + 1, STREAM_SAMPLES)]


def _one_by_one(automodel, chunks, cache):
    out = []
    for c in chunks:
        res = automodel.generate(input=c, cache=cache, is_final=False, disable_pbar=True, **STREAM_KW)
        out.append(res[0]["text"] if res else "")
    return out


@pytest.mark.parametrize("which", ["real layout", "centred decoder FSMN"])
def test_batched_equals_funasr_one_session_path(automodel, centered_decoder, speech, which):
    """Sessions started up to three chunks apart (so every batch mixes sessions at different
    points of their utterances: look-back caches of every length, first decoder calls and
    later ones) get, chunk by chunk, the text funasr's own path gives each alone; and their
    caches carry on in funasr's own path exactly as funasr's would (the final flush agrees).
    Also with a decoder whose FSMN is centred (padding would reach real tokens): grouped by
    length, the same equality."""
    automodel = automodel if which == "real layout" else centered_decoder
    chunks = [_chunks(x) for x in speech + speech]
    starts = [i % 4 for i in range(len(chunks))]
    ref_caches = [{} for _ in chunks]
    ref = [_one_by_one(automodel, cs, c) for cs, c in zip(chunks, ref_caches)]

    batched = BatchedStreaming(automodel)
    assert batched._causal == (which == "real layout")
    caches = [{} for _ in chunks]
    got = [[] for _ in chunks]
    steps = max(len(cs) + s for cs, s in zip(chunks, starts))
    sizes = []
    for step in range(steps):
        due = [(i, cs[step - s]) for i, (cs, s) in enumerate(zip(chunks, starts)) if 0 <= step - s < len(cs)]
        texts = batched.run([c for _, c in due], [caches[i] for i, _ in due], STREAM_KW)
        sizes.append(len(due))
        for (i, _), text in zip(due, texts):
            got[i].append(text)
    assert got == ref
    assert any("".join(t) for t in ref), "the tiny model wrote nothing: the comparison shows nothing"
    assert max(sizes) >= 8 and batched.forwards == steps  # one encoder forward per step, not per chunk

    for mine, theirs in zip(caches, ref_caches):
        _assert_same_state(mine, theirs)
    tail = np.zeros(STREAM_SAMPLES // 3, np.float32)
    for mine, theirs in zip(caches, ref_caches):
        a = automodel.generate(input=tail, cache=mine, is_final=True, disable_pbar=True, **STREAM_KW)
        b = automodel.generate(input=tail, cache=theirs, is_final=True, disable_pbar=True, **STREAM_KW)
        assert a[0]["text"] == b[0]["text"]


def test_int8_partials_alone_equal_funasrs_and_batched_stay_close(int8_model, speech):
    """With int8 weights (a full-size pool's partials on the CPU) a session alone gets exactly
    funasr's own path's text. Batched, torch's dynamic quantization scales each Linear's input
    by the whole batch's range, so a row's text can differ from its text alone: partials only
    (finals are float32), and kept close: 91 % of characters the same (at least 85 %) on the
    tiny random model, whose near-tied scores make it the sensitive case."""
    import difflib

    chunks = [_chunks(x) for x in speech]
    ref = [_one_by_one(int8_model, cs, {}) for cs in chunks]
    alone = BatchedStreaming(int8_model)
    assert [[alone.run([c], [cache], STREAM_KW)[0] for c in cs] for cs, cache in zip(chunks, [{} for _ in chunks])] == ref
    batched, caches = BatchedStreaming(int8_model), [{} for _ in chunks]
    got = [[] for _ in chunks]
    for step in range(max(len(cs) for cs in chunks)):
        due = [(i, cs[step]) for i, cs in enumerate(chunks) if step < len(cs)]
        for (i, _), text in zip(due, batched.run([c for _, c in due], [caches[i] for i, _ in due], STREAM_KW)):
            got[i].append(text)
    a, b = "|".join("".join(t) for t in ref), "|".join("".join(t) for t in got)
    assert len(a) > 20 and difflib.SequenceMatcher(None, a, b).ratio() >= 0.85


def _close(a, b):
    np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=0, atol=1e-4)


def _assert_same_state(mine, theirs):
    """What the next chunk reads of a session's caches, equal: the position, the CIF carry,
    every encoder layer's look-back keys/values, every decoder layer's FSMN memory (its last
    kernel_size - 1 inputs) and cross-attention keys/values."""
    me, te = mine["encoder"], theirs["encoder"]
    assert me["start_idx"] == te["start_idx"]
    _close(me["cif_alphas"].reshape(-1), te["cif_alphas"].reshape(-1))
    _close(me["cif_hidden"].reshape(-1), te["cif_hidden"].reshape(-1))
    _close(me["feats"], te["feats"])
    for a, b in zip(me["opt"] or [], te["opt"] or [], strict=True):
        _close(a["k"], b["k"])
        _close(a["v"], b["v"])
    md, td = mine["decoder"], theirs["decoder"]
    assert (md["decode_fsmn"] is None) == (td["decode_fsmn"] is None)
    for a, b in zip(md["decode_fsmn"] or [], td["decode_fsmn"] or [], strict=True):
        _close(a[:, :, -10:], b[:, :, -10:])
    for a, b in zip(md["opt"] or [], td["opt"] or [], strict=True):
        _close(a["k"], b["k"])


@pytest.mark.parametrize("which", ["real layout", "centred decoder FSMN"])
def test_decoder_rows_of_different_lengths(automodel, centered_decoder, which):
    """Rows with 1 to 5 tokens decoded together, on their first chunk and on a later one, give
    each row's tokens and caches as funasr's decoder gives them to that row alone."""
    model = automodel if which == "real layout" else centered_decoder
    batched = BatchedStreaming(model)
    decoder = model.model.decoder
    dim = model.model.encoder.output_size()
    gen = torch.Generator().manual_seed(3)
    lengths = [[1, 3, 5, 2], [4, 1, 2, 5]]
    fresh = {"decode_fsmn": None, "opt": None, "chunk_size": STREAM_KW["chunk_size"],
             "decoder_chunk_look_back": STREAM_KW["decoder_chunk_look_back"]}
    mine = [dict(fresh) for _ in lengths[0]]
    theirs = [dict(fresh) for _ in lengths[0]]
    for step in lengths:
        memory = torch.randn((len(step), 15, dim), generator=gen)
        embeds = [torch.randn((n, dim), generator=gen) for n in step]
        with torch.no_grad():
            got = batched._decode_rows(memory, embeds, mine)
            for b, (emb, cache) in enumerate(zip(embeds, theirs)):
                scores = torch.log_softmax(decoder.forward_chunk(memory[b:b + 1], emb[None], cache), dim=-1)
                ids = [t for t in scores[0].argmax(dim=-1).tolist()
                       if t not in (model.model.eos, model.model.sos, model.model.blank_id)]
                assert got[b] == ids
        for a, c in zip(mine, theirs):
            for x, y in zip(a["decode_fsmn"], c["decode_fsmn"], strict=True):
                _close(x[:, :, -10:], y[:, :, -10:])
            for x, y in zip(a["opt"], c["opt"], strict=True):
                _close(x["k"], y["k"])
                _close(x["v"], y["v"])


def test_cif_is_funasrs_integrate_and_fire(automodel):
    """The numpy integrate-and-fire gives funasr's predictor's own fired frames and carry, on
    random chunks with a random carry-over (alphas scaled so some frames fire, some do not)."""
    predictor = automodel.model.predictor
    rng = np.random.default_rng(7)
    dim = automodel.model.encoder.output_size()
    fired_any = 0
    for trial in range(40):
        hidden = torch.from_numpy(rng.standard_normal((1, 15, dim)).astype(np.float32))
        cache = {"chunk_size": STREAM_KW["chunk_size"],
                 "cif_hidden": torch.from_numpy(rng.standard_normal((1, 1, dim)).astype(np.float32)),
                 "cif_alphas": torch.tensor([[float(rng.uniform(0, 0.9))]])}
        h0, a0 = cache["cif_hidden"].clone(), cache["cif_alphas"].clone()
        with torch.no_grad():
            embeds, lengths, _, _ = predictor.forward_chunk(hidden, cache)
            out = torch.relu(predictor.cif_conv1d(predictor.pad(hidden.transpose(1, 2)))).transpose(1, 2)
            alphas = torch.nn.functional.relu(torch.sigmoid(predictor.cif_output(out)) * predictor.smooth_factor
                                              - predictor.noise_threshold).squeeze(-1)
        alphas[:, :0] = 0.0
        alphas[:, 10:] = 0.0
        frames, integrate, rest = _cif(np.concatenate((h0.numpy().reshape(1, -1), hidden.numpy()[0])),
                                       np.concatenate((a0.numpy().reshape(1), alphas.numpy()[0])),
                                       np.float32(predictor.threshold))
        assert len(frames) == int(lengths[0])
        if frames:
            fired_any += 1
            np.testing.assert_array_equal(np.stack(frames), embeds[0, :len(frames)].numpy())
        assert integrate == cache["cif_alphas"].reshape(-1)[0].item()
        np.testing.assert_array_equal(rest, cache["cif_hidden"].reshape(-1).numpy())
    assert fired_any, "no trial fired a token: the frames were never compared"


def test_one_sessions_bad_chunk_is_its_own(tiny_funasr_pool, speech):
    """A chunk that is not one chunk of audio is that session's error; the others go on in the
    same batch from their own caches (nothing reset, no retry)."""
    from daemon.errors import EngineError

    first, second = _chunks(speech[0])[:2]
    reqs = [StreamChunk(first, {}), StreamChunk(first, {})]
    tiny_funasr_pool.stream_requests(reqs)
    lone: dict = {}
    tiny_funasr_pool.stream_requests([StreamChunk(first, lone)])
    expected = tiny_funasr_pool.stream_requests([StreamChunk(second, lone)])[0]
    bad = StreamChunk(second[:100], {})
    answers = tiny_funasr_pool.stream_requests([StreamChunk(second, reqs[0].cache), bad,
                                                StreamChunk(second, reqs[1].cache)])
    assert isinstance(answers[1], EngineError) and "9600" in str(answers[1])
    assert bad.cache == {}
    assert answers[0] == answers[2] == expected
    # Two chunks' positions: the good sessions' caches were carried on, not started afresh.
    assert reqs[0].cache["encoder"]["start_idx"] == lone["encoder"]["start_idx"] > 0
    assert reqs[0].cache["encoder"]["start_idx"] == reqs[1].cache["encoder"]["start_idx"]


def test_a_failed_batch_starts_each_session_afresh_alone(tiny_funasr_pool, speech, monkeypatch):
    """If the batched forward itself fails, every session's cache is spent: each is run alone
    from a fresh cache, and a session whose lone run fails too gets its own error."""
    first, second = _chunks(speech[0])[:2]
    caches = [{}, {}]
    tiny_funasr_pool.stream_requests([StreamChunk(first, c) for c in caches])
    fresh = tiny_funasr_pool.stream_requests([StreamChunk(second, {})])[0]
    calls = []
    real = BatchedStreaming.run

    def failing_when_batched(self, chunks, caches_, options):
        calls.append(len(chunks))
        if len(chunks) > 1:
            raise RuntimeError("fake: the batched forward failed")
        return real(self, chunks, caches_, options)

    monkeypatch.setattr(BatchedStreaming, "run", failing_when_batched)
    answers = tiny_funasr_pool.stream_requests([StreamChunk(second, c) for c in caches])
    assert calls == [2, 1, 1]
    assert answers == [fresh, fresh]


def test_a_lone_chunk_whose_forward_fails_is_answered_not_raised(tiny_funasr_pool, speech, monkeypatch):
    """A round's only streaming chunk failing is that session's error as an answer: a raise
    would fail every other session's request in the same round (decodes, VAD) too."""
    from daemon.errors import EngineError

    def failing(self, chunks, caches_, options):
        raise RuntimeError("fake: the streaming forward failed")

    monkeypatch.setattr(BatchedStreaming, "run", failing)
    answers = tiny_funasr_pool.stream_requests([StreamChunk(_chunks(speech[0])[0], {})])
    assert len(answers) == 1 and isinstance(answers[0], EngineError)


def _quantized(model):
    return any("quantized" in type(x).__module__ for x in model.modules())


def test_small_models_keep_float32_one_thread_and_the_prior(tiny_funasr_pool):
    """The full-size policy is chosen by model size: the tiny models (the 32-stream capacity
    figure) keep float32 partials, one torch thread and no calibration at load."""
    p = tiny_funasr_pool
    assert not p.large and p.cost_curve is None and not _quantized(p._stream.model)
    threads = torch.get_num_threads()
    p.decode(np.zeros(16000, np.float32))
    assert torch.get_num_threads() == threads == p.config.ncpu == 1


def test_a_full_size_pool_runs_int8_threaded_decodes_and_measures_its_cost(models_dir, monkeypatch):
    """The same tiny models taken as full size (the threshold lowered), with the default
    `asr.funasr.quantize` (auto): the streaming and the offline models are int8, the offline
    decode runs on `ncpu_large` threads and the count is back after it, and the pool measured
    its cost curve at load (daemon/asr/calibrate.py) for admission."""
    import dataclasses

    from daemon.asr import funasr_engine
    from daemon.asr.funasr_engine import FunASRPool
    from helpers.funasr_tiny import make_config

    monkeypatch.setattr(funasr_engine, "LARGE_MODEL_BYTES", 0)
    seen = []
    pool = FunASRPool(dataclasses.replace(make_config(models_dir), ncpu=1, ncpu_large=2))
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real_set(n)))
    try:
        pool.load()
        assert pool.config.quantize == "auto" == Config().asr.funasr.quantize
        assert pool.large and _quantized(pool._stream.model) and _quantized(pool._asr.model)
        scale, exponent = pool.cost_curve
        assert scale > 0 and 0.5 <= exponent <= 1.0
        seen.clear()
        during = []
        offline = pool._asr.generate
        monkeypatch.setattr(pool._asr, "generate", lambda *a, **k: (during.append(torch.get_num_threads()),
                                                                     offline(*a, **k))[1])
        pool.decode(np.zeros(16000, np.float32))
        # the offline forward on ncpu_large threads; punctuation (funasr sets its model's 1) and
        # the restore after it leave the calling thread at 1
        assert during == [2] and seen[0] == 2 and seen[-1] == 1 and torch.get_num_threads() == 1
        assert any("finals run int8" in n for n in pool.notes)
    finally:
        pool.shutdown()
        real_set(1)


@pytest.mark.parametrize("quantize, stream_int8, offline_int8", [("partials", True, False), ("off", False, False)])
def test_quantize_partials_keeps_float32_finals_and_off_keeps_both(models_dir, monkeypatch, quantize, stream_int8,
                                                                   offline_int8):
    """`asr.funasr.quantize` is the one switch: "partials" int8 for the streaming model only
    (finals float32), "off" float32 for both, on a full-size pool on the CPU."""
    import dataclasses

    from daemon.asr import funasr_engine
    from daemon.asr.funasr_engine import FunASRPool
    from helpers.funasr_tiny import make_config

    monkeypatch.setattr(funasr_engine, "LARGE_MODEL_BYTES", 0)
    pool = FunASRPool(dataclasses.replace(make_config(models_dir), quantize=quantize))
    pool._load_models("cpu", "float32")
    assert pool.large
    assert (_quantized(pool._stream.model), _quantized(pool._asr.model)) == (stream_int8, offline_int8)


def test_a_full_size_pool_runs_a_due_chunk_at_the_next_tick_and_gathers_the_feeds(models_dir, monkeypatch):
    """`chunk_due`: small models, or a session speaking alone, run a chunk the moment it is due;
    a full-size pool with 2+ sessions running chunks (speaking; one fed silence runs none) runs it
    once a tick of the shared clock (every CHUNK_PERIOD of monotonic time) has passed since it
    was due, and never more than CHUNK_MAX_WAIT after the session's last chunk."""
    from daemon.asr import funasr_engine
    from daemon.asr.funasr_engine import CHUNK_ACTIVE, CHUNK_GATHER, CHUNK_MAX_WAIT, CHUNK_PERIOD, FunASRPool
    from helpers.funasr_tiny import make_config

    pool = FunASRPool(make_config(models_dir))
    now = [10 * CHUNK_PERIOD + 0.25]  # the last tick 0.25 s ago
    monkeypatch.setattr(funasr_engine.time, "monotonic", lambda: now[0])
    assert pool.chunk_due("a", 0.0)  # small models, and nothing remembered of their sessions
    assert pool._chunk_ran == {}
    pool.large = True
    now[0] += 0.3
    assert pool.chunk_due("a", 0.0) and pool.streaming_sessions() == 1  # speaking alone
    now[0] = 11 * CHUNK_PERIOD + 0.25
    assert pool.chunk_due("b", 0.0)  # b's first chunk: at once (a's ran 0.35 s ago)
    assert pool.streaming_sessions() == 2
    assert not pool.chunk_due("a", 0.0) and not pool.chunk_due("b", 0.2)  # due after the last tick: the next
    assert pool.chunk_due("a", 0.26) and pool.chunk_due("b", 0.4)  # due before it: now
    now[0] = 12 * CHUNK_PERIOD - 0.001  # just before a tick, 0.349 s after their last chunks
    assert not pool.chunk_due("a", CHUNK_PERIOD - 0.01) and pool.chunk_due("a", CHUNK_PERIOD)
    now[0] += CHUNK_MAX_WAIT  # b's last chunk that long ago: now, whatever the tick
    assert pool.chunk_due("b", 0.0)
    now[0] += CHUNK_ACTIVE + 0.01  # both quiet since: nobody else is speaking
    assert pool.streaming_sessions() == 0 and pool.chunk_due("a", 0.0)
    # the daemon holds the worker's next call for CHUNK_GATHER after a tick, until all are in;
    # never without a streaming model (no chunks to gather: partials off)
    monkeypatch.setattr(pool, "streaming_sessions", lambda: 2)
    now[0] = 20 * CHUNK_PERIOD + 0.03
    assert pool._stream is None and pool.gather_wait(1) == 0.0
    pool._stream = object()
    assert pool.gather_wait(1) == pytest.approx(CHUNK_GATHER - 0.03) and pool.gather_wait(2) == 0.0
    now[0] = 20 * CHUNK_PERIOD + CHUNK_GATHER + 0.01
    assert pool.gather_wait(1) == 0.0
    monkeypatch.setattr(pool, "streaming_sessions", lambda: 1)
    now[0] = 20 * CHUNK_PERIOD + 0.03
    assert pool.gather_wait(0) == 0.0


def test_sessions_due_at_different_times_stream_their_chunks_in_the_same_forward(models_dir, speech, monkeypatch):
    """Two sessions fed together in real time, the second speaking 0.3 s after the first: their
    chunks come due half a period apart. A full-size pool gathers them at the shared tick: after
    each session's first, every chunk runs in a forward with the other session's (before: none),
    and each session still gets a partial for every chunk of its speech."""
    from daemon.asr import funasr_engine
    from daemon.asr.funasr_engine import FunASRPool
    from daemon.asr.steps import drive
    from helpers.funasr_tiny import make_config

    monkeypatch.setattr(funasr_engine, "LARGE_MODEL_BYTES", 0)
    pool = FunASRPool(make_config(models_dir))
    pool.load()
    try:
        a = np.concatenate([speech[0], np.zeros(16000, np.float32)])
        b = np.concatenate([np.zeros(4800, np.float32), speech[0], np.zeros(11200, np.float32)])
        frame = 960  # 60 ms, as the bench and the page send
        sizes = []
        run_chunks = pool.stream_requests
        monkeypatch.setattr(pool, "stream_requests", lambda reqs: (sizes.append(len(reqs)), run_chunks(reqs))[1])

        def run(large):
            pool.large = large  # False: each chunk at once, as small models
            sizes.clear()
            sessions = [pool.open(f"s{large}{i}", partials=True) for i in range(2)]
            partials = [0, 0]
            t0 = 1000.0 if large else 100.0  # the runs' clocks apart (chunks run: remembered a while)
            for pos in range(0, len(a), frame):
                monkeypatch.setattr(funasr_engine.time, "monotonic", lambda t=t0 + pos / 16000: t)

                def done(i, events, error):
                    assert error is None, error
                    partials[i] += sum(e["type"] == "partial" for e in events)
                drive(pool.run_requests, [s.feed_steps(x[pos:pos + frame]) for s, x in zip(sessions, (a, b))], done)
            return list(sizes), partials

        alone, partials_alone = run(False)
        gathered, partials_gathered = run(True)
        assert alone and set(alone) == {1}  # due half a period apart: one forward each
        # each session's first chunk at once (its first partial is never held), then together; but
        # the first session's last chunk is silence after its speech, and its utterance ends (0.8 s
        # of silence, seen at the VAD's 100 ms tail step) before the tick that chunk waits for: it
        # is not decoded (its partial would come with the final), and the second's last runs alone
        assert gathered[:2] == [1, 1] and set(gathered[2:-1]) == {2} and gathered[-1] == 1, (gathered, alone)
        assert sum(gathered) == sum(alone) - 1, (gathered, alone)
        assert partials_gathered == [partials_alone[0] - 1, partials_alone[1]] and min(partials_alone) > 0
    finally:
        pool.shutdown()
