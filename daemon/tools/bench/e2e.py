"""Modes tts (per-sentence latency, first audio) and e2e (through the bridge, in real time)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple


from daemon.tools.bench.common import EN_REPLIES, RATE, WS_FRAME_S, ZH_REPLIES, fmt, load_manifest, noise_pcm, pct, stats_ms, table
from daemon.tools.bench.stack import Proc, Stack, _env, _wait_bridge, stack_language

logger = logging.getLogger(__name__)


# --- tts -------------------------------------------------------------------------------------------


def run_tts(st: Stack, args: argparse.Namespace) -> Dict[str, Any]:
    from daemon.wire.client import TTSClient, new_id

    lang = stack_language(st)
    texts = list(ZH_REPLIES if lang == "zh" else EN_REPLIES)[: max(1, args.replies)]
    per_sentence, ttfa, whole, ratio, rtf = [], [], [], [], []
    sentences = 0
    with TTSClient(st.tts, timeout=120) as t:
        t.speak(texts[0], language=lang)  # warm-up
        for _ in range(args.repeat):
            for text in texts:
                rid = new_id()
                t0 = time.perf_counter()
                last_end = t0
                first: Optional[float] = None
                ends: Dict[int, float] = {}
                audio = 0
                rate = 24000
                for chunk in t.synthesize(text, language=lang, request_id=rid):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    ends[chunk.sentence] = now
                    audio += len(chunk.pcm) // 2
                    rate = chunk.sample_rate
                done = time.perf_counter()
                for i in sorted(ends):
                    per_sentence.append(ends[i] - last_end)
                    last_end = ends[i]
                sentences += len(ends)
                ttfa.append((first or done) - t0)
                whole.append(done - t0)
                ratio.append(((first or done) - t0) / max(1e-9, done - t0))
                rtf.append((done - t0) / max(1e-9, audio / rate))
    details = st.info.get("tts", {}).get("details", {})
    return {"engine": st.info.get("tts", {}).get("engine"), "language": lang, "replies": len(texts) * args.repeat,
            "threads": details.get("threads", details.get("kokoro.threads")),
            "sentences": sentences, "per_sentence": stats_ms(per_sentence), "first_audio": stats_ms(ttfa),
            "whole_reply": stats_ms(whole), "first_over_whole_p50": round(pct(ratio, 50) or 0.0, 3),
            "rtf_p50": round(pct(rtf, 50) or 0.0, 4), "texts": texts}


def print_tts(r: Dict[str, Any]) -> str:
    rows = [[k.replace("_", " "), r[k]["n"], fmt(r[k]["p50"], digits=0), fmt(r[k]["p95"], digits=0),
             fmt(r[k]["max"], digits=0)] for k in ("per_sentence", "first_audio", "whole_reply")]
    threads = f", {r['threads']} intra-op threads" if r.get("threads") else ""
    return (table(f"TTS ({r['engine']}, {r['language']}{threads}): {r['replies']} replies, {r['sentences']} sentences (ms)",
                  ["measure", "n", "p50", "p95", "max"], rows)
            + f"\nfirst audio / whole reply p50 {r['first_over_whole_p50']:.2f}; RTF p50 {r['rtf_p50']:.3f}")


# --- websockets client for the bridge ------------------------------------------------------------


class WS:
    """One bridge connection: records events with arrival times (monotonic)."""

    def __init__(self, ws: Any):
        self.ws = ws
        self.events: List[Tuple[float, Any]] = []
        self.first_audio_at: Optional[float] = None
        self.audio_bytes = 0
        self.closed = False
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, url: str) -> "WS":
        from websockets.asyncio.client import connect

        ws = await connect(url, proxy=None, compression=None, open_timeout=30, max_size=2 ** 22)
        return cls(ws)

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for m in self.ws:
                now = time.monotonic()
                if isinstance(m, bytes):
                    if self.first_audio_at is None:
                        self.first_audio_at = now
                    self.audio_bytes += len(m)
                else:
                    self.events.append((now, json.loads(m)))
        except ConnectionClosed:
            pass
        finally:
            self.closed = True

    def of(self, kind: str) -> List[Tuple[float, Dict[str, Any]]]:
        return [(t, e) for t, e in self.events if e.get("type") == kind]

    async def wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline or self.closed:
                return pred()
            await asyncio.sleep(0.005)
        return True

    async def send_json(self, obj: Dict[str, Any]) -> None:
        await self.ws.send(json.dumps(obj, ensure_ascii=False))

    async def start(self, language: str, timeout: float = 30.0) -> bool:
        await self.send_json({"type": "start", "language": language})
        return await self.wait(lambda: bool(self.of("ready")) or bool(self.of("error")), timeout) and bool(self.of("ready"))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 10)


async def stream_realtime(ws: WS, pcm: bytes, t0: float, frame_s: float = WS_FRAME_S,
                          until: Optional[Callable[[], bool]] = None, lag: Optional[List[float]] = None) -> int:
    """Send pcm in frame_s frames, frame i at t0 + (i+1) * frame_s (when a microphone would
    have it); stop early when until() is true. Returns frames sent; appends sender lag (s)."""
    fb = int(frame_s * RATE) * 2
    n = 0
    for i, off in enumerate(range(0, len(pcm), fb)):
        due = t0 + (i + 1) * frame_s
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        elif lag is not None:
            lag.append(-wait)
        await ws.ws.send(pcm[off:off + fb])
        n += 1
        if until is not None and until():
            break
    return n


# --- e2e -------------------------------------------------------------------------------------------


def _bridge_speculative(ws_url: str) -> Dict[str, float]:
    import urllib.request

    m = re.match(r"wss?://([^/]+)/", ws_url)
    try:
        with urllib.request.urlopen(f"http://{m.group(1) if m else ''}/metrics", timeout=5) as r:
            body = r.read().decode()
    except (OSError, ValueError):
        return {}
    return {o: float(v) for o, v in re.findall(r'^s2s_bridge_speculative_turns_total\{outcome="(\w+)"\} (\S+)$',
                                                body, re.M)}


async def _e2e(st: Stack, args: argparse.Namespace) -> Dict[str, Any]:
    """Both ways when asked (--speculation both) and the stack is ours: a second bridge on the same
    daemon with turn.speculate false runs the same utterances right after."""
    modes = ("on", "off") if args.speculation == "both" else (args.speculation,)
    if len(modes) == 2 and st.tmp is None:
        modes = ("attached",)  # an attached bridge runs as configured
    results: Dict[str, Any] = {}
    for mode in modes:
        bridge, proc = st.bridge, None
        if mode == "off" and st.tmp is not None:
            bridge, proc = _second_bridge(st, speculate=False)
        try:
            results[mode] = await _e2e_once(st, args, bridge)
        finally:
            if proc is not None:
                proc.stop()
    if len(results) == 1:
        return next(iter(results.values()))
    out = dict(results["on"])
    out["speculation_off"] = results["off"]
    return out


def _second_bridge(st: Stack, speculate: bool) -> Tuple[str, Proc]:
    import yaml

    assert st.tmp is not None
    data = yaml.safe_load((st.tmp / "s2s.yaml").read_text(encoding="utf-8"))
    data["turn"] = dict(data.get("turn") or {}, speculate=speculate)
    path = st.tmp / f"s2s-speculate-{str(speculate).lower()}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    agent = data.get("agent", {}).get("kind", "echo")
    b = Proc("bridge", [sys.executable, "-m", "bridge", "--config", str(path), "--agent", agent],
             st.tmp / f"bridge-speculate-{str(speculate).lower()}.log", _env())
    port = _wait_bridge(b, 60.0)
    return f"ws://127.0.0.1:{port}/ws", b


async def _e2e_once(st: Stack, args: argparse.Namespace, bridge: str) -> Dict[str, Any]:
    lang = stack_language(st)
    utts = [u for u in load_manifest(Path(args.manifest)) if u.lang == lang and u.kind == "utt"]
    if not utts:
        raise SystemExit(f"s2s-bench: no {lang} utterances in {args.manifest}")
    to_final, final_to_audio, to_audio, bridge_final, bridge_first = [], [], [], [], []
    missing = 0
    samples = []
    tail = noise_pcm(args.tail)
    spec0 = _bridge_speculative(bridge)
    for k in range(args.utterances):
        u = utts[k % len(utts)]
        ws = await WS.open(bridge)
        try:
            if not await ws.start(lang):
                raise SystemExit(f"s2s-bench: the bridge did not start a session: {ws.events[-3:]}")
            t0 = time.monotonic()
            speech_end = t0 + u.speech_end()
            await stream_realtime(ws, u.pcm, t0)
            # The microphone stays open: quiet noise in real time until the reply's first audio.
            t1 = t0 + u.seconds
            await stream_realtime(ws, tail, t1, until=lambda: ws.first_audio_at is not None)
            await ws.wait(lambda: ws.first_audio_at is not None, 5.0)
            finals = [(t, e) for t, e in ws.of("final") if e.get("text")]
            fa = [e for _, e in ws.of("first_audio")]
            row = {"id": u.id, "final": finals[0][1]["text"] if finals else None}
            if finals and ws.first_audio_at is not None:
                tf = finals[0][0]
                to_final.append(tf - speech_end)
                final_to_audio.append(ws.first_audio_at - tf)
                to_audio.append(ws.first_audio_at - speech_end)
                row.update(speech_end_to_final_ms=round((tf - speech_end) * 1000, 1),
                           speech_end_to_first_audio_ms=round((ws.first_audio_at - speech_end) * 1000, 1))
                if finals[0][1].get("latency_ms") is not None:
                    bridge_final.append(finals[0][1]["latency_ms"] / 1000.0)
                if fa and fa[0].get("latency_ms") is not None:
                    bridge_first.append(fa[0]["latency_ms"] / 1000.0)
            else:
                missing += 1
                row["error"] = [e for _, e in ws.events if e.get("type") == "error"][:3]
            samples.append(row)
        finally:
            await ws.close()
    spec1 = _bridge_speculative(bridge)
    spec = {o: int(spec1.get(o, 0) - spec0.get(o, 0)) for o in ("released", "cancelled")}
    real_turns = len(to_audio)
    return {"language": lang, "utterances": args.utterances, "missing": missing,
            "speculation": "on" if spec1 and (spec["released"] or spec["cancelled"]) else
            ("off" if spec1 else "unknown"), "speculative_turns": spec,
            "wasted_per_turn": round(spec["cancelled"] / real_turns, 3) if real_turns else None,
            "agent_ttft_ms": round(args.agent_ttft * 1000) if args.agent == "fixed" else None,
            "speech_end_to_final": stats_ms(to_final), "final_to_first_audio": stats_ms(final_to_audio),
            "speech_end_to_first_audio": stats_ms(to_audio),
            "bridge_reported": {"final_latency": stats_ms(bridge_final), "final_to_first_audio": stats_ms(bridge_first)},
            "agent": "echo" if args.agent == "echo" else args.agent, "samples": samples}


def run_e2e(st: Stack, args: argparse.Namespace) -> Dict[str, Any]:
    return asyncio.run(_e2e(st, args))


def print_e2e(r: Dict[str, Any]) -> str:
    runs = [("", r)] + ([("speculation off: ", r["speculation_off"])] if r.get("speculation_off") else [])
    rows = []
    for prefix, x in runs:
        rows += [[prefix + k.replace("_", " "), x[k]["n"], fmt(x[k]["p50"], digits=0), fmt(x[k]["p95"], digits=0),
                  fmt(x[k]["max"], digits=0)]
                 for k in ("speech_end_to_final", "final_to_first_audio", "speech_end_to_first_audio")]
    ttft = f", first token after {r['agent_ttft_ms']} ms" if r.get("agent_ttft_ms") is not None else ""
    spec = r.get("speculative_turns") or {}
    note = (f"; speculation {r.get('speculation', '?')}: {spec.get('released', 0)} speculative turns released, "
            f"{spec.get('cancelled', 0)} wasted ({fmt(r.get('wasted_per_turn'), digits=2)} per turn)")
    return (table(f"End to end through the bridge ({r['language']}, agent {r['agent']}{ttft}): {r['utterances']} "
                  f"utterances, {r['missing']} without a reply{note} (ms)", ["measure", "n", "p50", "p95", "max"], rows))


