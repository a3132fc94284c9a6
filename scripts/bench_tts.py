#!/usr/bin/env python3
"""Benchmark the TTS engines (not a test): per-sentence latency p50/p95, and time to the
first streamed chunk against whole-text synthesis.

    python scripts/bench_tts.py --models .models            # tiny melo + bundled piper
    python scripts/bench_tts.py --models /var/lib/s2s/models --melo melo-zh --hf hf --nltk nltk_data
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ZH_TEXT = ("你好，我是你的语音助手。今天北京晴，气温25℃到30℃。明天上午10:30你有一个会议，"
           "记得带上笔记本电脑。另外，打开WiFi然后播放Taylor Swift的歌吧！")
EN_TEXT = ("Hello, I am your voice assistant. Today will be sunny and warm. "
           "You have a meeting at ten thirty tomorrow morning. Remember to bring your laptop!")


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def bench(engine, text, language, repeats):
    per_sentence, first, whole = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        last = t0
        for i, _, _ in engine.synthesize_stream(text, language):
            now = time.perf_counter()
            per_sentence.append(now - last)
            if i == 0:
                first.append(now - t0)
            last = now
        t0 = time.perf_counter()
        pcm = engine.synthesize(text, language)
        whole.append(time.perf_counter() - t0)
    audio_s = len(pcm) / 2 / engine.sample_rate
    ttfc, total = statistics.median(first), statistics.median(whole)
    print(f"{engine.name:6s} device={engine.device} sentences={len(per_sentence) // repeats} audio={audio_s:.1f}s")
    print(f"  per-sentence latency p50={pct(per_sentence, 0.5) * 1000:.0f} ms  p95={pct(per_sentence, 0.95) * 1000:.0f} ms")
    print(f"  first chunk {ttfc * 1000:.0f} ms vs whole text {total * 1000:.0f} ms: ratio {ttfc / total:.2f}; "
          f"RTF {total / audio_s:.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=Path(".models"))
    p.add_argument("--melo", default="tiny/melo-zh")
    p.add_argument("--hf", default="tiny/hf")
    p.add_argument("--nltk", default="tiny/nltk_data")
    p.add_argument("--voice", default="piper/en_US-joe-medium.onnx")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=("melo", "piper"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from daemon.tts_melo import MeloConfig, MeloTTSEngine
    from daemon.tts_piper import PiperConfig, PiperEngine

    m = args.models
    if args.only in (None, "melo"):
        t0 = time.perf_counter()
        eng = MeloTTSEngine(MeloConfig(model_dir=m / args.melo, hf_home=m / args.hf, nltk_data=m / args.nltk,
                                       device=args.device))
        eng.load()
        print(f"melo   import+load {time.perf_counter() - t0:.1f} s")
        bench(eng, ZH_TEXT, "zh", args.repeats)
        eng.shutdown()
    if args.only in (None, "piper"):
        t0 = time.perf_counter()
        eng = PiperEngine(PiperConfig(voice=m / args.voice, device=args.device))
        eng.load()
        print(f"piper  load {time.perf_counter() - t0:.1f} s")
        bench(eng, EN_TEXT, "en", args.repeats)
        eng.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
