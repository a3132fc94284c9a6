"""s2s-bench voices: which Kokoro voice speaks Mandarin best, heard back by the bundled Whisper.

    s2s-bench voices [--models DIR] [--voices zm_yunxi,jf_alpha,...] [--out DIR]

Each voice speaks held-out sentences (Mandarin, and Mandarin with English words) through the
daemon's own Kokoro engine (daemon/tts/kokoro_engine.py, the production path: text frontend, G2P,
ONNX model); the bundled Whisper base (faster-whisper, beam 5, language detection on, i.e. an
independent listener that is not told the language) transcribes each sentence. Reported per
voice: CER over all sentences (daemon/tools/metrics.py normalisation: t2s, numbers as Chinese
characters), the sentences Whisper did not detect as Chinese, whether the English words came
back, and synthesis seconds per audio second. The sentences are none of the ASR fixtures' texts.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from daemon.tools.bench.common import fmt, report_logger, table, write_result
from daemon.tools.bench.stack import default_models
from daemon.tools.metrics import cer_counts

ZH_SENTENCES = (
    "今天下午三点有一个重要的会议。",
    "请帮我把客厅的灯调暗一点。",
    "明天北京的天气怎么样，会下雨吗？",
    "我想订两张周六晚上的电影票。",
    "这家餐厅的饺子特别好吃。",
    "他每天早上六点起床去跑步。",
    "请提醒我下周一交房租。",
    "冰箱里还有牛奶和鸡蛋吗？",
    "火车十分钟以后就要开了，我们快走吧。",
    "孩子们在公园里放风筝。",
)
MIXED_SENTENCES = (
    "帮我打开WiFi，然后放一首周杰伦的歌。",
    "我的iPhone没电了，帮我找一个充电器。",
    "明天上午十点在Zoom上开会。",
    "把这封email转发给老王。",
    "请把PPT发到我的邮箱。",
    "我刚买了一台MacBook，用起来很顺手。",
    "打开Bluetooth连接耳机。",
    "晚上用Netflix看一部电影吧。",
    "帮我在Google上查一下明天的天气。",
    "这个App需要更新到最新版本。",
    "我们下午用Teams开个短会。",
)
LATIN = re.compile(r"[A-Za-z]+")


def _letters(text: str) -> str:
    """Latin letters only, lower case: "Wi-Fi" is heard as "WiFi"."""
    return "".join(LATIN.findall(text)).lower()


def _listener(models: Path) -> Any:
    from faster_whisper import WhisperModel

    return WhisperModel(str(models / "whisper-base"), device="cpu", compute_type="int8", cpu_threads=2)


def _hear(model: Any, pcm24k: np.ndarray) -> Dict[str, Any]:
    import soxr

    audio = soxr.resample(pcm24k.astype(np.float32), 24000, 16000)
    segments, info = model.transcribe(audio, beam_size=5, language=None, vad_filter=False,
                                      condition_on_previous_text=False)
    return {"text": "".join(s.text for s in segments).strip(), "language": info.language}


def run_voices(models: Path, voices: Sequence[str], threads: int = 0, english_voice: str = "auto") -> Dict[str, Any]:
    from daemon.tts.kokoro_engine import KokoroConfig, KokoroEngine

    listener = _listener(models)
    rows: Dict[str, Any] = {}
    for voice in voices:
        engine = KokoroEngine(KokoroConfig(model_dir=models / "kokoro", voice=voice, threads=threads,
                                           english_voice=english_voice))
        engine.load()
        if engine.voice != voice:
            rows[voice] = {"missing": True, "spoken_by": engine.voice}
            engine.shutdown()
            continue
        edits = total = 0
        by_kind = {"zh": [0, 0], "mixed": [0, 0]}
        not_zh: List[str] = []
        english_kept = english_total = 0
        synth_s = audio_s = 0.0
        per: List[Dict[str, Any]] = []
        for text in ZH_SENTENCES + MIXED_SENTENCES:
            t0 = time.monotonic()
            pcm = np.frombuffer(engine.synthesize(text, "zh"), dtype="<i2").astype(np.float32) / 32768.0
            synth_s += time.monotonic() - t0
            audio_s += len(pcm) / engine.sample_rate
            heard = _hear(listener, pcm)
            e, n = cer_counts(text, heard["text"])
            edits, total = edits + e, total + n
            kind = by_kind["mixed" if LATIN.search(text) else "zh"]
            kind[0], kind[1] = kind[0] + e, kind[1] + n
            if heard["language"] != "zh":
                not_zh.append(text)
            letters = _letters(heard["text"])
            for word in LATIN.findall(text):
                english_total += 1
                english_kept += _letters(word) in letters
            per.append({"text": text, "heard": heard["text"], "language": heard["language"], "cer": e / n if n else 0})
        engine.shutdown()
        rows[voice] = {"cer": edits / total if total else None, "not_chinese": not_zh,
                       "cer_zh": by_kind["zh"][0] / max(1, by_kind["zh"][1]),
                       "cer_mixed": by_kind["mixed"][0] / max(1, by_kind["mixed"][1]),
                       "english_words_kept": english_kept, "english_words": english_total,
                       "synth_s_per_audio_s": synth_s / audio_s if audio_s else None, "sentences": per,
                       "english_voice": engine.english_voice}
    ranked = sorted((v for v in rows if not rows[v].get("missing")), key=lambda v: rows[v]["cer"])
    return {"voices": rows, "ranked": ranked, "sentences": len(ZH_SENTENCES) + len(MIXED_SENTENCES),
            "english_voice": english_voice}


def print_voices(r: Dict[str, Any]) -> str:
    out = []
    for v in r["ranked"]:
        row = r["voices"][v]
        out.append([v, fmt(row["cer"] * 100, " %"), fmt(row["cer_zh"] * 100, " %"), fmt(row["cer_mixed"] * 100, " %"),
                    f"{r['sentences'] - len(row['not_chinese'])}/{r['sentences']}",
                    f"{row['english_words_kept']}/{row['english_words']}", fmt(row["synth_s_per_audio_s"], "", 2)])
    missing = [v for v, row in r["voices"].items() if row.get("missing")]
    note = f"\n  not bundled (spoken by {r['voices'][missing[0]]['spoken_by']}): {', '.join(missing)}" if missing else ""
    return table("Kokoro voices heard back by Whisper base (held-out sentences, language detected)",
                 ["voice", "CER", "CER Mandarin", "CER mixed", "detected zh", "English words kept", "synth s / audio s"],
                 out) + note


def main(argv: Optional[List[str]] = None) -> int:
    from daemon.models.kokoro_voices import SUBSTITUTE, ZH_VOICES

    p = argparse.ArgumentParser(prog="s2s-bench voices", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=str(default_models()))
    p.add_argument("--voices", default=",".join([*ZH_VOICES, SUBSTITUTE]))
    p.add_argument("--threads", type=int, default=0, help="Kokoro intra-op threads (0 = one per core)")
    p.add_argument("--english-voice", default="auto",
                   help="tts.kokoro.english_voice for every voice (auto; '' = the voice itself)")
    p.add_argument("--out", default="bench-results")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    result = run_voices(Path(args.models), [v for v in args.voices.split(",") if v], args.threads, args.english_voice)
    say = report_logger("voices")
    say.info("%s", print_voices(result))
    path = write_result(Path(args.out), "voices", {"mode": "voices", "result": result,
                                                  "elapsed_s": round(time.monotonic() - t0, 1)})
    say.info("wrote %s", path)
    say.info("%s", json.dumps({v: round(result["voices"][v]["cer"], 3) for v in result["ranked"]}))
    return 0
