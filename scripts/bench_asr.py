#!/usr/bin/env python3
"""ASR benchmark (not a test): real-time factor of our streaming engines over the fixtures,
and the ratio to calling the underlying library directly on each whole file.

    python scripts/bench_asr.py --models .models [--engines funasr-tiny,whisper] [--chunk-ms 100]

- engine: audio streamed in --chunk-ms chunks through pool.open() / feed() / finalize_events()
  (VAD endpointing, offline decode per utterance, punctuation, partials when configured).
- direct: funasr `AutoModel.generate` (Paraformer with fsmn-vad and punctuation attached) or
  faster-whisper `WhisperModel.transcribe` on the whole file.
RTF = processing seconds / audio seconds (lower is better); ratio = engine / direct. Each
measurement is the best of --repeat runs (other work on a shared machine only adds time).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon import metrics  # noqa: E402
from daemon.audio import read_wav  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


def load_fixtures():
    rows = [json.loads(l) for l in (FIXTURES / "manifest.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]
    return [(row, read_wav(FIXTURES / row["path"])[0]) for row in rows]


REPEAT = 3


def best_of(fn):
    """(min seconds, last result) over REPEAT runs of fn() -> (seconds, result)."""
    best, result = float("inf"), None
    for _ in range(REPEAT):
        secs, result = fn()
        best = min(best, secs)
    return best, result


def run_engine(pool, fixtures, chunk: int, language_of=lambda row: None):
    total = 0.0
    hyps = {}
    for row, x in fixtures:
        t0 = time.perf_counter()
        eng = pool.open(row["id"], language=language_of(row))
        events = []
        for i in range(0, len(x), chunk):
            events += eng.feed(x[i:i + chunk])
        events += eng.finalize_events()
        pool.close(row["id"])
        total += time.perf_counter() - t0
        sep = "" if row["lang"] == "zh" else " "
        hyps[row["id"]] = sep.join(e["text"] for e in events if e["type"] == "final" and e["text"])
    return total, hyps


def bench_funasr(models: Path, fixtures, chunk: int, ncpu: int):
    from funasr import AutoModel

    from daemon.asr_funasr import FunASRConfig, FunASRPool

    cfg = FunASRConfig(paraformer_dir=models / "tiny" / "paraformer", vad_dir=models / "fsmn-vad",
                       punc_dir=models / "tiny" / "ct-punc", streaming_dir=models / "tiny" / "paraformer-streaming",
                       device="cpu", ncpu=ncpu)
    pool = FunASRPool(cfg)
    pool.load()
    run_engine(pool, fixtures[:1], chunk)  # warm-up
    eng_s, hyps = best_of(lambda: run_engine(pool, fixtures, chunk))
    pool.shutdown()
    direct = AutoModel(model=str(cfg.paraformer_dir), vad_model=str(cfg.vad_dir), punc_model=str(cfg.punc_dir),
                       device="cpu", ncpu=ncpu, frontend_conf={"dither": 0.0}, disable_update=True,
                       disable_pbar=True, disable_log=True)
    direct.generate(input=fixtures[0][1], disable_pbar=True)  # warm-up

    def direct_run():
        t0 = time.perf_counter()
        for _row, x in fixtures:
            direct.generate(input=x, disable_pbar=True)
        return time.perf_counter() - t0, None

    return eng_s, best_of(direct_run)[0], hyps


def bench_whisper(models: Path, fixtures, chunk: int, ncpu: int):
    from faster_whisper import WhisperModel

    from daemon.asr_whisper import WhisperConfig, WhisperPool

    cfg = WhisperConfig(model_dir=models / "whisper-base", vad_dir=models / "fsmn-vad", device="cpu", ncpu=ncpu)
    pool = WhisperPool(cfg)
    pool.load()
    lang = lambda row: row["lang"]  # noqa: E731
    run_engine(pool, fixtures[:1], chunk, lang)
    eng_s, hyps = best_of(lambda: run_engine(pool, fixtures, chunk, lang))
    pool.shutdown()
    model = WhisperModel(str(cfg.model_dir), device="cpu", compute_type="int8", cpu_threads=ncpu)

    def direct_run():
        t0 = time.perf_counter()
        for row, x in fixtures:
            segs, _info = model.transcribe(x, language=row["lang"], beam_size=1, vad_filter=False,
                                           condition_on_previous_text=False, without_timestamps=True)
            list(segs)
        return time.perf_counter() - t0, None

    return eng_s, best_of(direct_run)[0], hyps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / ".models")
    ap.add_argument("--engines", default="funasr-tiny,whisper")
    ap.add_argument("--chunk-ms", type=int, default=100)
    ap.add_argument("--ncpu", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    global REPEAT
    REPEAT = max(1, args.repeat)
    logging.basicConfig(level=logging.WARNING)
    fixtures = load_fixtures()
    audio_s = sum(len(x) for _r, x in fixtures) / 16000
    chunk = args.chunk_ms * 16
    print(f"{len(fixtures)} files, {audio_s:.1f} s of audio, {args.chunk_ms} ms chunks, ncpu {args.ncpu}")
    print(f"{'engine':14s} {'RTF engine':>10s} {'RTF direct':>10s} {'ratio':>6s} {'CER zh':>7s} {'WER en':>7s}")
    for name in args.engines.split(","):
        fn = {"funasr-tiny": bench_funasr, "whisper": bench_whisper}[name]
        eng_s, direct_s, hyps = fn(args.models, fixtures, chunk, args.ncpu)
        utt = [(row, hyps[row["id"]]) for row, _x in fixtures if row["kind"] == "utt"]
        cer = metrics.corpus_cer((r["text"], h) for r, h in utt if r["lang"] == "zh")
        wer = metrics.corpus_wer((r["text"], h) for r, h in utt if r["lang"] == "en")
        print(f"{name:14s} {eng_s / audio_s:10.3f} {direct_s / audio_s:10.3f} {eng_s / direct_s:6.2f} "
              f"{cer:7.1%} {wer:7.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
