"""s2s-bench turns: how well the turn judge tells a finished sentence from a pause (issue 24).

    s2s-bench turns [--models DIR] [--kokoro N] [--cuts 0.35,0.5,0.65,0.8] [--out DIR]

In process, the daemon's own parts: the real fsmn-vad segmenter finds each pause at
turn.early_silence (0.3 s) exactly as a session does, the bundled Whisper base (beam 5, the
daemon's engine) decodes the speech so far, and Smart Turn v3.2 (daemon/asr/turn_judge.py) gets
the audio up to the pause. Clips: the Mandarin fixtures (tests/fixtures/zh) and N more
sentences spoken by Kokoro's bundled Mandarin voices (synthetic speech, like the fixtures;
none of the fixtures' texts), each whole and cut at several points of its speech, 2.5 s of
silence after. What each pause is:

- whole: the pause after a whole sentence -> should be judged finished;
- cut: the pause at a cut -> should not be (the speaker paused mid-sentence);
- inner: a pause inside a whole clip after which the speech goes on (a comma) -> should not be;
- long: long.wav's four sentences: pauses that the next sentence follows after a gap are turn
  ends; ones inside a sentence are inner pauses.

Reported, for each signal alone and for combinations: whole judged finished, cut and inner
judged not finished; and the judge's cost per call and per batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from daemon.tools.bench.common import fmt, table, write_result
from daemon.tools.bench.stack import default_models

SR = 16000
FIXTURES = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "zh"
# Sentences for Kokoro to speak (none of the fixtures' texts; ordinary assistant requests and
# statements, with and without commas).
SENTENCES = (
    "今天下午三点有一个重要的会议。", "请帮我把客厅的灯调暗一点。", "明天北京的天气怎么样，会下雨吗？",
    "我想订两张周六晚上的电影票。", "这家餐厅的饺子特别好吃。", "他每天早上六点起床去跑步。",
    "请提醒我下周一交房租。", "冰箱里还有牛奶和鸡蛋吗？", "火车十分钟以后就要开了，我们快走吧。",
    "孩子们在公园里放风筝。", "帮我查一下去上海的航班。", "把音乐的声音开大一点。", "我今天有点累，想早点休息。",
    "周末我们一起去爬山好不好？", "这本书我已经看完了。", "请把明天的闹钟设在七点半。", "附近有没有好吃的火锅店？",
    "我的快递到哪里了？", "给妈妈打个电话。", "外面下雨了，记得带伞。", "帮我翻译一下这句话。",
    "现在几点了？", "我想听一个笑话。", "晚饭吃面条还是米饭？",
)
VOICES = ("zf_xiaobei", "zm_yunxi", "zf_xiaoni", "zm_yunjian")
EARLY_SILENCE = 0.3
STEP = 3200  # 200 ms feeds, as the VAD steps

logger = logging.getLogger(__name__)


def speech_bounds(x: np.ndarray, thr: float = 0.02) -> Tuple[int, int]:
    loud = np.where(np.abs(x) > thr)[0]
    return (int(loud[0]), int(loud[-1]) + 1) if loud.size else (0, x.size)


def kokoro_clips(models: Path, n: int, cache: Path) -> List[Tuple[str, np.ndarray, str]]:
    """(id, 16 kHz float audio, text) for the first n SENTENCES, cached as WAV in `cache`."""
    import soxr

    from daemon.audio import float_to_pcm16, read_wav, write_wav

    out: List[Tuple[str, np.ndarray, str]] = []
    engine: Any = None
    cache.mkdir(parents=True, exist_ok=True)
    try:
        for i, text in enumerate(SENTENCES[:n]):
            voice = VOICES[i % len(VOICES)]
            path = cache / f"k{i:02d}-{voice}.wav"
            if not path.is_file():
                if engine is None:
                    from daemon.tts.kokoro_engine import KokoroConfig, KokoroEngine

                    engine = KokoroEngine(KokoroConfig(model_dir=models / "kokoro", voice=voice))
                    engine.load()
                engine.voice = voice
                with np.load(models / "kokoro" / "voices.npz") as npz:
                    if voice not in npz.files:
                        continue
                    engine._style = np.asarray(npz[voice], dtype=np.float32).reshape(-1, 256)
                pcm = np.frombuffer(engine.synthesize(text, "zh"), dtype="<i2").astype(np.float32) / 32768.0
                x16 = soxr.resample(pcm, engine.sample_rate, SR).astype(np.float32)
                write_wav(str(path), float_to_pcm16(x16), SR)
            x, _sr = read_wav(str(path))
            out.append((path.stem, x, text))
    finally:
        if engine is not None:
            engine.shutdown()
    return out


def pauses(pool: Any, audio: np.ndarray, tail_s: float = 2.5) -> List[Dict[str, Any]]:
    """Every pause the segmenter finds in audio + silence: the audio up to it (the judge's
    input), the speech before it, and whether speech followed (resume) or the VAD ended it."""
    seg = pool.vad.segmenter(30.0, "bench")
    seg.early_silence_ms = int(EARLY_SILENCE * 1000)
    x = np.concatenate([audio, np.zeros(int(tail_s * SR), np.float32)])
    found: List[Dict[str, Any]] = []
    for i in range(0, x.size, STEP):
        for ev in seg.push(x[i:i + STEP]):
            if ev.kind == "pause" and ev.audio is not None:
                start = seg.utterance_start or ev.start
                now = seg.total
                found.append({"speech": ev.audio, "judge_audio": seg.audio(max(start - SR // 2, now - 8 * SR), now),
                              "end_s": ev.end / SR, "at_s": now / SR, "went_on": None})
            elif ev.kind in ("resume", "end") and found and found[-1]["went_on"] is None:
                found[-1]["went_on"] = ev.kind == "resume"
    seg.flush()
    for f in found:
        if f["went_on"] is None:
            f["went_on"] = False
    return found


def collect(pool: Any, clips: Sequence[Tuple[str, np.ndarray, str]], cuts: Sequence[float],
            long_wav: Optional[np.ndarray]) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    for cid, x, text in clips:
        s, e = speech_bounds(x)
        for p in pauses(pool, x):
            label = "inner" if p["went_on"] else "whole"
            rows.append(dict(p, clip=cid, variant="whole", label=label, ref=text))
        for c in cuts:
            cut = s + int((e - s) * c)
            ps = [p for p in pauses(pool, x[:cut]) if p["end_s"] * SR > cut - SR // 4]
            for p in ps[-1:]:  # the pause at the cut (the inner ones are counted from the whole clip)
                rows.append(dict(p, clip=cid, variant=f"cut{int(c * 100)}", label="cut", ref=text))
    if long_wav is not None:
        for p in pauses(pool, long_wav):
            rows.append(dict(p, clip="long", variant="long", label="inner" if p["went_on"] else "turn_end", ref=""))
    return rows


def score(pool: Any, judge: Any, rows: List[Dict[str, Any]]) -> None:
    """Fill in each pause's signals: text (Whisper), text_end (the engine's), words, p (Smart Turn)."""
    from daemon.asr.base import Decode, SentenceEnd
    from daemon.asr.turn_judge import text_says_end, text_signal, unfinished_words

    for r in rows:
        ans = pool.decode_requests([Decode(r["speech"], (), "zh")])[0]  # the daemon's path (its window)
        r["text"] = ans if isinstance(ans, str) else str(ans[0] if isinstance(ans, tuple) else ans)
        r["text_mark"] = text_says_end(r["text"])
        # What the judge gets: Whisper's P(end mark | words, audio) (daemon/asr/end_mark.py).
        r["text_end"] = (text_signal(pool.sentence_end_request(SentenceEnd(r["text"], r["speech"], "zh")))
                         if r["text"].strip() else False)
        r["words_unfinished"] = unfinished_words(r["text"])
    probs = judge.predict([r["judge_audio"] for r in rows]) if rows else []
    for r, p in zip(rows, probs):
        r["p"] = float(p)


def rates(rows: List[Dict[str, Any]], finished: Any) -> Dict[str, Optional[float]]:
    """Per label: the share judged as it should be (whole/turn_end finished; cut/inner not)."""
    out: Dict[str, Optional[float]] = {}
    for label in ("whole", "cut", "inner", "turn_end"):
        rs = [r for r in rows if r["label"] == label]
        good = [bool(finished(r)) == (label in ("whole", "turn_end")) for r in rs]
        out[label] = round(100 * sum(good) / len(good), 1) if good else None
        out[label + "_n"] = len(good)  # type: ignore[assignment]
    return out


def signal_table(rows: List[Dict[str, Any]], th: Any) -> List[Dict[str, Any]]:
    from daemon.asr.turn_judge import COMPLETE, Thresholds, decide

    table_rows: List[Dict[str, Any]] = []
    for t in (0.5, 0.7, 0.9, 0.95, 0.97, 0.99):
        table_rows.append(dict(signal=f"Smart Turn alone, P >= {t}", **rates(rows, lambda r, t=t: r["p"] >= t)))
    table_rows.append(dict(signal="Whisper's final mark alone (。？！)", **rates(rows, lambda r: r["text_mark"])))
    for t in (0.3, 0.45, 0.6):
        table_rows.append(dict(signal=f"Whisper's P(end mark) alone >= {t}",
                               **rates(rows, lambda r, t=t: float(r["text_end"] or 0.0) >= t)))
    table_rows.append(dict(signal="words alone (no unfinished tail)", **rates(rows, lambda r: not r["words_unfinished"])))
    table_rows.append(dict(signal="mark and words", **rates(rows, lambda r: r["text_mark"] and not r["words_unfinished"])))
    grid = []
    for c in (0.9, 0.95, 0.97, 0.98, 0.99, 1.01):
        for w in (0.3, 0.5, 0.9):
            if w > c:
                continue
            t2 = Thresholds(complete=c, with_text=min(w, c), unfinished=min(th.unfinished, w), text_end=th.text_end,
                            text_unfinished=th.text_unfinished)
            rr = rates(rows, lambda r, t2=t2: decide(r["p"], r["text_end"], r["text"], t2) == COMPLETE)
            grid.append(dict(signal=f"combined: complete {c}, with text {w}", **rr))
    table_rows.append(dict(signal=f"combined (configured: complete {th.complete}, with text {th.with_text})",
                           **rates(rows, lambda r: decide(r["p"], r["text_end"], r["text"], th) == COMPLETE)))
    return table_rows + grid


def cost(judge: Any, reps: int = 5) -> Dict[str, Any]:
    from daemon.asr.turn_judge import features

    rng = np.random.default_rng(0)
    clip = (rng.standard_normal(6 * SR) * 0.05).astype(np.float32)
    out: Dict[str, Any] = {}
    for b in (1, 4, 16):
        model_t, feat_t = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            features([clip] * b)
            feat_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            judge.predict([clip] * b)
            model_t.append(time.perf_counter() - t0)
        out[f"batch_{b}"] = {"ms_per_batch": round(statistics.median(model_t) * 1000, 1),
                             "ms_per_call": round(statistics.median(model_t) * 1000 / b, 1),
                             "features_ms_per_call": round(statistics.median(feat_t) * 1000 / b, 1)}
    return out


def print_turns(r: Dict[str, Any]) -> str:
    head = ["signal", "whole finished", "cut not finished", "inner pauses not finished", "long.wav turn ends finished"]
    body = [[x["signal"], fmt(x["whole"], " %"), fmt(x["cut"], " %"), fmt(x["inner"], " %"), fmt(x["turn_end"], " %")]
            for x in r["table"]]
    n = r["table"][0]
    title = (f"Turn judge at the {EARLY_SILENCE} s pause ({r['clips']} clips; pauses: {n['whole_n']} whole, "
             f"{n['cut_n']} cut, {n['inner_n']} inner, {n['turn_end_n']} long.wav turn ends)")
    c = r["cost"]
    costs = "; ".join(f"batch {k.split('_')[1]}: {v['ms_per_batch']} ms ({v['ms_per_call']} ms a call, features "
                      f"{v['features_ms_per_call']})" for k, v in c.items())
    return table(title, head, body) + f"\nSmart Turn cost: {costs}\nload during the run: {r.get('load')}"


# --- e2e: the judge on and off through the bridge ------------------------------------------------


async def _e2e_clips(bridge: str, clips: List[Tuple[str, str, bytes, float]], tail_s: float) -> List[Dict[str, Any]]:
    """Each (id, kind, pcm, speech end s) spoken in real time on its own connection; the
    microphone stays open (quiet noise) until the reply's first audio or tail_s."""
    import asyncio

    from daemon.tools.bench.common import noise_pcm
    from daemon.tools.bench.e2e import WS, stream_realtime

    rows: List[Dict[str, Any]] = []
    tail = noise_pcm(tail_s)
    for cid, kind, pcm, end_s in clips:
        for attempt in range(4):  # a busy daemon (Whisper on 2 shared cores) may not answer open in time
            ws = await WS.open(bridge)
            if await ws.start("zh"):
                break
            await ws.close()
            if attempt == 3:
                raise SystemExit(f"s2s-bench turns: the bridge did not start a session: {ws.events[-3:]}")
            await asyncio.sleep(5.0)
        try:
            t0 = time.monotonic()
            await stream_realtime(ws, pcm, t0)
            await stream_realtime(ws, tail, t0 + len(pcm) / 2 / SR, until=lambda: ws.first_audio_at is not None)
            await ws.wait(lambda: ws.first_audio_at is not None, 3.0)
            finals = [(t, e) for t, e in ws.of("final") if e.get("text")]
            row: Dict[str, Any] = {"id": cid, "kind": kind, "finals": len(finals)}
            if finals:
                row.update(final_ms=round((finals[0][0] - t0 - end_s) * 1000, 1), reason=finals[0][1].get("reason"),
                           text=finals[0][1]["text"])
            if ws.first_audio_at is not None:
                row["first_audio_ms"] = round((ws.first_audio_at - t0 - end_s) * 1000, 1)
            rows.append(row)
        finally:
            await ws.close()
    return rows


def run_e2e(args: argparse.Namespace) -> Dict[str, Any]:
    """The same whole and cut utterances through two stacks in turn, the judge on then off."""
    import asyncio
    import tempfile

    import yaml

    from daemon.tools.bench.common import load_manifest
    from daemon.tools.bench.e2e import _bridge_speculative
    from daemon.tools.bench.stack import engine_config, open_stack

    utts = [u for u in load_manifest(Path(args.manifest)) if u.lang == "zh" and u.kind == "utt"][: args.utterances]
    clips: List[Tuple[str, str, bytes, float]] = []
    for u in utts:
        x = np.frombuffer(u.pcm, dtype="<i2")
        s, e = speech_bounds(x.astype(np.float32) / 32768.0)
        clips.append((u.id, "whole", u.pcm, e / SR))
        cut = s + int((e - s) * 0.65)
        clips.append((u.id, "cut65", x[:cut].tobytes(), cut / SR))
    out: Dict[str, Any] = {"engines": args.engines, "agent_ttft_ms": round(args.agent_ttft * 1000), "runs": {},
                           "judge_complete": args.judge_complete, "early_silence": args.early_silence}
    for judge in (("off", "on") if args.off_first else ("on", "off")):
        tmp = Path(tempfile.mkdtemp(prefix="s2s-turns-"))
        data = engine_config(args.engines, Path(args.models), tmp / "run")
        data["turn"] = {"judge": judge == "on"}
        if args.early_silence is not None:
            data["turn"]["early_silence"] = args.early_silence
        if args.judge_complete is not None:
            data["turn"].update(judge_complete=args.judge_complete,
                                judge_with_text=min(args.judge_complete, 0.5), judge_unfinished=0.0)
        path = tmp / "s2s.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        ns = argparse.Namespace(mode="e2e", asr=None, tts=None, bridge=None, bridge_pid=None, engines="config",
                                config=str(path), models=args.models, device="cpu", agent="fixed", agent_url="",
                                agent_ttft=args.agent_ttft, tts_engine="", tts_threads=0, whisper_beam=0,
                                asr_ncpu=0, start_timeout=300.0, keep_logs=False)
        with open_stack(ns, need_bridge=True) as st:
            spec0 = _bridge_speculative(st.bridge)
            rows = asyncio.run(_e2e_clips(st.bridge, clips, tail_s=args.tail))
            spec1 = _bridge_speculative(st.bridge)
            counters = st.describe().get("counters", {})
        shutil.rmtree(tmp, ignore_errors=True)
        spec = {o: int(spec1.get(o, 0) - spec0.get(o, 0)) for o in ("released", "cancelled")}
        out["runs"][judge] = {"rows": rows, "speculative": spec,
                              "judge_counters": {k: v for k, v in counters.items() if k.startswith("turn_judge")}}
    out["summary"] = summarise(out["runs"])
    return out


def _p50(xs: List[float]) -> Optional[float]:
    return round(statistics.median(xs), 1) if xs else None


def summarise(runs: Dict[str, Any]) -> List[Dict[str, Any]]:
    table_rows = []
    for judge, r in runs.items():
        rows = r["rows"]
        real = sum(1 for x in rows if x.get("finals"))
        for kind in ("whole", "cut65"):
            ks = [x for x in rows if x["kind"] == kind]
            turn = [x for x in ks if x.get("reason") == "turn"]
            table_rows.append({
                "judge": judge, "kind": kind, "n": len(ks), "judged_finished": len(turn),
                "final_p50": _p50([x["final_ms"] for x in ks if "final_ms" in x]),
                "first_audio_p50": _p50([x["first_audio_ms"] for x in ks if "first_audio_ms" in x]),
                "first_audio_p50_judged_finished": _p50([x["first_audio_ms"] for x in turn if "first_audio_ms" in x]),
                "finals_per_clip": round(sum(x.get("finals", 0) for x in ks) / max(1, len(ks)), 2)})
        table_rows[-1]["wasted_per_turn"] = table_rows[-2]["wasted_per_turn"] = (
            round(r["speculative"]["cancelled"] / real, 2) if real else None)
    return table_rows


def print_e2e(r: Dict[str, Any]) -> str:
    head = ["judge", "utterances", "n", "judged finished", "speech end -> final p50", "-> first audio p50",
            "-> first audio p50 (judged finished)", "finals a clip", "wasted spec. a turn"]
    body = [[x["judge"], x["kind"], x["n"], x["judged_finished"], fmt(x["final_p50"], digits=0),
             fmt(x["first_audio_p50"], digits=0), fmt(x["first_audio_p50_judged_finished"], digits=0),
             x["finals_per_clip"], fmt(x.get("wasted_per_turn"), digits=2)] for x in r["summary"]]
    return table(f"Turn judge end to end ({r['engines']} engines, agent first token {r['agent_ttft_ms']} ms; ms)",
                 head, body)


# --- cpu: what the judge adds to the ASR worker ----------------------------------------------------


def run_cpu(models: Path, engines: str, streams: int, seconds: float) -> Dict[str, Any]:
    """`streams` sessions (tentatives on, as the bridge's) each fed long.wav (four sentences and
    their pauses) from a different offset, in 200 ms rounds driven together as the daemon's
    worker drives them (daemon/asr/steps.py drive + pool.run_requests: one batch per request kind);
    the worker's CPU seconds with the judge off and on (process time, the same audio)."""
    from daemon.audio import read_wav
    from daemon.config import parse_config
    from daemon.asr.steps import drive
    from daemon.asr.turn_judge import attach

    x = read_wav(str(FIXTURES / "long.wav"))[0]
    n = int(seconds * SR)
    feeds = [np.resize(np.roll(x, -int(i * x.size / max(1, streams))), n) for i in range(streams)]
    if engines == "tiny":
        from daemon.asr.funasr_engine import FunASRConfig, FunASRPool

        pool: Any = FunASRPool(FunASRConfig(paraformer_dir=models / "tiny" / "paraformer", vad_dir=models / "fsmn-vad",
                                            punc_dir=models / "tiny" / "ct-punc", streaming_dir=None, device="cpu",
                                            ncpu=1))
    else:
        from daemon.asr.whisper_engine import WhisperConfig, WhisperPool

        pool = WhisperPool(WhisperConfig(model_dir=models / "whisper-base", vad_dir=models / "fsmn-vad"))
    pool.load()
    out: Dict[str, Any] = {"engines": engines, "streams": streams, "audio_s_per_stream": seconds}
    for judge in ("off", "on"):
        attach(pool, parse_config({"models_root": str(models), "turn": {"judge": judge == "on"}}))
        sessions = []
        for i in range(streams):
            e = pool.open(f"cpu-{judge}-{i}", partials=False)
            e.set_early_silence(EARLY_SILENCE)
            e.set_sentence_end(True)
            sessions.append(e)
        c0, t0 = time.process_time(), time.perf_counter()
        for k in range(0, n, STEP):
            drive(pool.run_requests, [e.feed_steps(f[k:k + STEP]) for e, f in zip(sessions, feeds)],
                  lambda i, v, err: None)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        j = pool.judge
        out[judge] = {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
                      "cpu_s_per_audio_s": round(cpu / (streams * seconds), 4),
                      "judge": dict(j.counts, model_s=round(j.seconds, 2)) if j is not None else None}
    out["judge_adds"] = round(out["on"]["cpu_s"] / out["off"]["cpu_s"] - 1, 3) if out["off"]["cpu_s"] else None
    pool.shutdown()
    return out


def main(argv: Optional[List[str]] = None) -> int:
    import os

    from daemon.asr.whisper_engine import WhisperConfig, WhisperPool
    from daemon.audio import read_wav
    from daemon.asr.turn_judge import SmartTurn, Thresholds

    p = argparse.ArgumentParser(prog="s2s-bench turns", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=str(default_models()))
    p.add_argument("--kokoro", type=int, default=len(SENTENCES), help="Kokoro-spoken sentences beside the fixtures")
    p.add_argument("--cuts", default="0.35,0.5,0.65,0.8", help="cut points, fractions of the speech")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--e2e", action="store_true", help="instead: through daemon + bridge, the judge on and off")
    p.add_argument("--engines", default="tiny", choices=("tiny", "bundled"), help="--e2e: the stack's engines")
    p.add_argument("--utterances", type=int, default=9, help="--e2e: fixtures spoken (each whole and cut at 65 %%)")
    p.add_argument("--agent-ttft", type=float, default=0.2, help="--e2e: the stand-in LLM's first token (s)")
    p.add_argument("--tail", type=float, default=4.0, help="--e2e: seconds of open microphone after the speech")
    p.add_argument("--manifest", default=str(FIXTURES.parent / "manifest.jsonl"))
    p.add_argument("--off-first", action="store_true", help="--e2e: run the stack without the judge first")
    p.add_argument("--judge-complete", type=float, default=None,
                   help="--e2e: turn.judge_complete for the judged stack (default: the config's)")
    p.add_argument("--early-silence", type=float, default=None,
                   help="--e2e: turn.early_silence for both stacks (default: the config's)")
    p.add_argument("--cpu", action="store_true", help="instead: the ASR worker's CPU with the judge off and on")
    p.add_argument("--streams", type=int, default=16, help="--cpu: sessions")
    p.add_argument("--seconds", type=float, default=30.0, help="--cpu: seconds of audio per session")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the results go to the log
    t0 = time.monotonic()
    if args.cpu:
        load0 = os.getloadavg()
        res = run_cpu(Path(args.models), args.engines, args.streams, args.seconds)
        res["load"] = f"{load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end (2 cores)"
        logger.info(json.dumps(res, indent=1))
        write_result(Path(args.out), f"turns-cpu-{args.engines}", {"mode": "turns-cpu", "result": res})
        return 0
    if args.e2e:
        load0 = os.getloadavg()
        res = run_e2e(args)
        res["load"] = f"{load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end (2 cores)"
        logger.info(print_e2e(res) + f"\nload: {res['load']}")
        tag = f"-{args.judge_complete:g}" if args.judge_complete is not None else ""
        path = write_result(Path(args.out), f"turns-e2e-{args.engines}{tag}", {"mode": "turns-e2e", "result": res,
                                                                          "elapsed_s": round(time.monotonic() - t0, 1)})
        logger.info(f"wrote {path}")
        return 0
    models = Path(args.models)
    load0 = os.getloadavg()
    clips = []
    for f in sorted(FIXTURES.glob("0*.wav")):
        x, _ = read_wav(str(f))
        clips.append((f"zh_{f.stem}", x, ""))
    if args.kokoro:
        clips += kokoro_clips(models, args.kokoro, Path(args.out) / "turn-clips")
    long_wav = read_wav(str(FIXTURES / "long.wav"))[0] if (FIXTURES / "long.wav").is_file() else None
    pool = WhisperPool(WhisperConfig(model_dir=models / "whisper-base", vad_dir=models / "fsmn-vad"))
    pool.load()
    judge = SmartTurn(models / "smart-turn" / "smart-turn-v3.2-cpu.onnx")
    judge.load()
    rows = collect(pool, clips, [float(c) for c in args.cuts.split(",") if c], long_wav)
    score(pool, judge, rows)
    from daemon.config import TurnConfig

    tc = TurnConfig()
    th = Thresholds(tc.judge_complete, tc.judge_with_text, tc.judge_unfinished, tc.judge_text_end,
                    tc.judge_text_unfinished)
    result = {"clips": len(clips) + (long_wav is not None), "table": signal_table(rows, th), "cost": cost(judge),
              "load": f"{load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end (2 cores)",
              "pauses": [{k: v for k, v in r.items() if k not in ("speech", "judge_audio")} for r in rows]}
    logger.info(print_turns(result))
    path = write_result(Path(args.out), "turns", {"mode": "turns", "result": result,
                                                 "elapsed_s": round(time.monotonic() - t0, 1)})
    logger.info(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
