"""Modes ipc (daemon round trip vs in-process call) and asr (RTF and CER/WER on three paths)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from daemon.tools.bench.common import CHUNK_BYTES, RATE, Utterance, fmt, load_manifest, noise_pcm, stats_ms, table
from daemon.tools.bench.stack import Stack, in_process_engines, stack_language
from daemon.rules import SPOKEN_LANGUAGES

logger = logging.getLogger(__name__)


# --- ipc -------------------------------------------------------------------------------------------


def run_ipc(st: Stack, args: argparse.Namespace) -> Dict[str, Any]:
    """Overhead of the daemon hop, measured with engine work that is cheap and constant.

    ASR: 100 ms chunks of quiet noise: the VAD runs on each, nothing is decoded, so the
    engine's share of a round trip is small and stable and the paired difference
    (round trip - the same feed() in this process) is the hop itself: client encode, ZeroMQ,
    the daemon's loop, its worker thread hand-off, the ack. Speech chunks (with decodes,
    whose time varies by hundreds of ms) are reported separately for reference.
    TTS: one short sentence, round trip to `done` vs engine.synthesize() in this process.
    """
    from daemon.wire.client import ASRClient, TTSClient

    n = args.chunks
    quiet = noise_pcm(n * CHUNK_BYTES / 2 / RATE)
    pool, tts = in_process_engines(st)
    res: Dict[str, Any] = {"chunks": n, "chunk_ms": 100}
    pings = []
    with ASRClient(st.asr, timeout=60) as c:
        for _ in range(50):
            pings.append(c.ping())
        res["ping"] = stats_ms(pings)
        stream = c.open(language="zh")
        eng = pool.submit(pool.open, "bench-ipc", "zh").result() if pool else None
        rtt, feed, diff = [], [], []
        for i in range(n):
            chunk = quiet[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES]
            t0 = time.perf_counter()
            seq = stream.send(chunk, ack=True)
            stream.wait_ack(seq, timeout=30)
            r = time.perf_counter() - t0
            rtt.append(r)
            if eng is not None:
                # Timed on the engine's worker thread: the engine's own time, no hand-off.
                f = pool.submit(_timed, eng.feed, chunk).result()
                feed.append(f)
                diff.append(r - f)
        stream.close(timeout=30)
        res["asr_quiet"] = {"daemon_round_trip": stats_ms(rtt), "in_process_feed": stats_ms(feed),
                            "overhead": stats_ms(diff)}
        # Speech: decodes happen inside some chunks; reference only.
        speech = load_manifest(Path(args.manifest))
        pcm = max(speech, key=lambda u: u.seconds).pcm
        sp_rtt, sp_feed = [], []
        stream = c.open(language="zh")
        eng = pool.submit(pool.open, "bench-ipc-speech", "zh").result() if pool else None
        for off in range(0, len(pcm), CHUNK_BYTES):
            chunk = pcm[off:off + CHUNK_BYTES]
            t0 = time.perf_counter()
            seq = stream.send(chunk, ack=True)
            stream.wait_ack(seq, timeout=60)
            sp_rtt.append(time.perf_counter() - t0)
            if eng is not None:
                sp_feed.append(pool.submit(_timed, eng.feed, chunk).result())
        stream.finalize(timeout=60)
        res["asr_speech"] = {"daemon_round_trip": stats_ms(sp_rtt), "in_process_feed": stats_ms(sp_feed),
                             "overhead": stats_ms([a - b for a, b in zip(sp_rtt, sp_feed)]) if sp_feed else stats_ms([])}
    lang = stack_language(st)
    sentence = "好的，我马上为你打开。" if lang == "zh" else "Okay, I will open it right away."
    t_rtt, t_lib = [], []
    with TTSClient(st.tts, timeout=60) as t:
        t.speak(sentence, language=lang)  # warm-up
        if tts is not None:
            tts.synthesize(sentence, lang)
        for _ in range(args.requests):
            t0 = time.perf_counter()
            t.speak(sentence, language=lang)
            t_rtt.append(time.perf_counter() - t0)
            if tts is not None:
                t_lib.append(tts.submit(_timed, tts.synthesize, sentence, lang).result())
    res["tts"] = {"sentence": sentence, "daemon_round_trip": stats_ms(t_rtt), "in_process": stats_ms(t_lib),
                  "overhead": stats_ms([a - b for a, b in zip(t_rtt, t_lib)]) if t_lib else stats_ms([])}
    for e in (pool, tts):
        if e is not None:
            e.shutdown()
    res["in_process_compared"] = pool is not None
    return res


def print_ipc(r: Dict[str, Any]) -> str:
    rows = []

    def add(name: str, s: Dict[str, Any]) -> None:
        rows.append([name, s["n"], fmt(s["p50"], digits=2), fmt(s["p99"], digits=2), fmt(s["max"], digits=2)])

    add("ping round trip (no engine)", r["ping"])
    for key, label in (("asr_quiet", "ASR 100 ms quiet chunk"), ("asr_speech", "ASR 100 ms speech chunk"), ("tts", "TTS sentence")):
        add(f"{label}: daemon round trip", r[key]["daemon_round_trip"])
        add(f"{label}: in-process call", r[key]["in_process_feed" if key != "tts" else "in_process"])
        add(f"{label}: overhead (paired)", r[key]["overhead"])
    return table("IPC overhead (ms)", ["path", "n", "p50", "p99", "max"], rows)


# --- asr -------------------------------------------------------------------------------------------


def _daemon_transcribe(client: Any, u: Utterance) -> Tuple[float, str]:
    from daemon.wire import protocol as P

    t0 = time.perf_counter()
    s = client.open(language=u.lang)
    # The whole file is queued at once (it is far below the daemon's 60 s backlog limit), so
    # the daemon works as fast as the engine allows; then finalize and wait for `closed`.
    for off in range(0, len(u.pcm), CHUNK_BYTES):
        s.send(u.pcm[off:off + CHUNK_BYTES])
    events = s.finalize(timeout=300)
    secs = time.perf_counter() - t0
    sep = "" if u.lang == "zh" else " "
    return secs, sep.join(e.text for e in events if isinstance(e, P.Final) and e.text).strip()


def _timed(fn: Any, *a: Any) -> float:
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def _engine_transcribe(pool: Any, u: Utterance) -> Tuple[float, str]:
    # On the pool's worker thread, as the daemon calls it (the engine contract): FunASR called
    # from another thread ran ~5x slower here (per-thread torch/OpenMP settings).
    return pool.submit(_engine_transcribe_here, pool, u).result()


def _engine_transcribe_here(pool: Any, u: Utterance) -> Tuple[float, str]:
    t0 = time.perf_counter()
    eng = pool.open("bench-asr", language=u.lang)
    events = []
    for off in range(0, len(u.pcm), CHUNK_BYTES):
        events += eng.feed(u.pcm[off:off + CHUNK_BYTES])
    events += eng.finalize_events()
    secs = time.perf_counter() - t0
    sep = "" if u.lang == "zh" else " "
    return secs, sep.join(e["text"] for e in events if e["type"] == "final" and e["text"]).strip()


def _library(st: Stack, engine: str) -> Optional[Callable[[Utterance], Tuple[float, str]]]:
    """The bare library on a whole file, with the daemon's model dirs and settings."""
    cfg = st.cfg
    if cfg is None:
        return None
    if engine == "whisper":
        from faster_whisper import WhisperModel

        w = cfg.asr.whisper
        model = WhisperModel(str(cfg.model_path(w.model)), device="cpu", compute_type=w.compute_type,
                             cpu_threads=cfg.asr.ncpu)

        def run(u: Utterance) -> Tuple[float, str]:
            x = np.frombuffer(u.pcm, dtype="<i2").astype(np.float32) / 32768.0
            t0 = time.perf_counter()
            segs, _info = model.transcribe(x, language=u.lang if u.lang in SPOKEN_LANGUAGES else None,
                                           beam_size=w.beam_size, vad_filter=False,
                                           condition_on_previous_text=False, without_timestamps=True)
            text = ("" if u.lang == "zh" else " ").join(s.text.strip() for s in segs)
            return time.perf_counter() - t0, text
        return run
    if engine == "funasr":
        from funasr import AutoModel

        f = cfg.asr.funasr
        kw: Dict[str, Any] = dict(model=str(cfg.model_path(f.paraformer)), vad_model=str(cfg.model_path(f.vad)),
                                  device=cfg.asr.device if cfg.asr.device.startswith("cuda") else "cpu",
                                  ncpu=cfg.asr.ncpu, frontend_conf={"dither": 0.0}, disable_update=True,
                                  disable_pbar=True, disable_log=True)
        if f.punc:
            kw["punc_model"] = str(cfg.model_path(f.punc))
        model = AutoModel(**kw)

        def run(u: Utterance) -> Tuple[float, str]:
            x = np.frombuffer(u.pcm, dtype="<i2").astype(np.float32) / 32768.0
            t0 = time.perf_counter()
            out = model.generate(input=x, disable_pbar=True)
            text = "".join(r.get("text", "") for r in out) if isinstance(out, list) else str(out)
            return time.perf_counter() - t0, text
        return run
    return None


def run_asr(st: Stack, args: argparse.Namespace) -> Dict[str, Any]:
    from daemon.tools import metrics
    from daemon.wire.client import ASRClient

    utts = load_manifest(Path(args.manifest), args.files)
    engine = st.info.get("asr", {}).get("engine", "?")
    pool = in_process_engines(st, tts=False)[0] if not args.no_inprocess else None
    lib = _library(st, engine) if not args.no_inprocess else None
    paths = ["daemon"] + (["engine"] if pool else []) + (["library"] if lib else [])
    best: Dict[str, Dict[str, float]] = {p: {} for p in paths}
    hyps: Dict[str, Dict[str, str]] = {p: {} for p in paths}
    with ASRClient(st.asr, timeout=300) as c:
        # Warm-up (first decode allocates), not counted.
        _daemon_transcribe(c, utts[0])
        if pool:
            _engine_transcribe(pool, utts[0])
        if lib:
            lib(utts[0])
        for u in utts:
            for _ in range(args.repeat):
                # Interleaved: a burst of load from elsewhere hits all paths alike.
                for p in paths:
                    if p == "daemon":
                        secs, text = _daemon_transcribe(c, u)
                    elif p == "engine":
                        secs, text = _engine_transcribe(pool, u)
                    else:
                        assert lib is not None  # "library" is in paths only when lib is
                        secs, text = lib(u)
                    best[p][u.id] = min(best[p].get(u.id, float("inf")), secs)
                    hyps[p][u.id] = text
    if pool:
        pool.shutdown()
    audio_s = sum(u.seconds for u in utts)
    res: Dict[str, Any] = {"engine": engine, "files": len(utts), "audio_s": round(audio_s, 2), "repeat": args.repeat,
                           "manifest": str(args.manifest), "paths": {}}
    for p in paths:
        total = sum(best[p].values())
        zh = [(u.text, hyps[p][u.id]) for u in utts if u.lang == "zh"]
        en = [(u.text, hyps[p][u.id]) for u in utts if u.lang == "en"]
        res["paths"][p] = {"seconds": round(total, 3), "rtf": round(total / audio_s, 4),
                           "cer_zh": round(metrics.corpus_cer(zh), 4) if zh else None,
                           "wer_en": round(metrics.corpus_wer(en), 4) if en else None,
                           "per_file_s": {k: round(v, 3) for k, v in best[p].items()},
                           "hyps": hyps[p]}
    d = res["paths"]["daemon"]["seconds"]
    res["ratio_daemon_engine"] = round(d / res["paths"]["engine"]["seconds"], 4) if "engine" in res["paths"] else None
    res["ratio_daemon_library"] = round(d / res["paths"]["library"]["seconds"], 4) if "library" in res["paths"] else None
    # Single-utterance files only: the daemon decodes each VAD segment, a library call the
    # whole file at once, which on multi-utterance files (zh/long) is a different workload.
    single = [u.id for u in utts if u.kind == "utt"]
    if "library" in res["paths"] and single and len(single) < len(utts):
        res["ratio_daemon_library_single_utterances"] = round(
            sum(best["daemon"][i] for i in single) / sum(best["library"][i] for i in single), 4)
    res["cer_normalisation"] = ("daemon.tools.metrics.normalize: NFKC (full->half width), OpenCC t2s, lower case, "
                                "punctuation/symbols removed, whitespace collapsed; CER: whitespace removed, "
                                "Arabic numbers read as Chinese numerals")
    return res


def print_asr(r: Dict[str, Any]) -> str:
    rows = []
    for p, v in r["paths"].items():
        rows.append([p, fmt(v["seconds"], digits=2), fmt(v["rtf"], digits=3),
                     fmt(None if v["cer_zh"] is None else v["cer_zh"] * 100, "%"),
                     fmt(None if v["wer_en"] is None else v["wer_en"] * 100, "%")])
    t = table(f"ASR ({r['engine']}): {r['files']} files, {r['audio_s']} s audio, best of {r['repeat']}",
              ["path", "seconds", "RTF", "CER zh", "WER en"], rows)
    return (t + f"\nratio daemon/engine {fmt(r['ratio_daemon_engine'], digits=3)}, "
            f"daemon/library {fmt(r['ratio_daemon_library'], digits=3)}"
            + (f" (single-utterance files: {r['ratio_daemon_library_single_utterances']:.3f})"
               if r.get("ratio_daemon_library_single_utterances") else ""))


