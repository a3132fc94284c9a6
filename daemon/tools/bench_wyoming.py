"""Wyoming utterance latency: s2s-wyoming (this stack) beside wyoming-faster-whisper, the way
Home Assistant's voice pipeline uses them. One command:

    python -m daemon.tools.bench_wyoming [--clients 1,4,8] [--wfw-python /tmp/wfw-venv/bin/python]

Starts the daemon on the bundled models (Whisper base, int8, beam 5, CPU) and s2s-wyoming;
with --wfw-python, also rhasspy's wyoming-faster-whisper (installed in that interpreter's venv)
on the same model directory, beam, compute type and CPU threads. Then, for each client count,
that many clients at once each send every Mandarin fixture utterance (tests/fixtures/zh) as
Home Assistant does (transcribe, audio-start, 1024-sample audio-chunks paced at real time,
audio-stop) and time audio-stop -> transcript: the wait a user has after they stop speaking.
Prints p50/p95 latency and CER per server and count (--json FILE keeps them).

The `ha_*` functions are Home Assistant's Wyoming integration's client code paths
(homeassistant/components/wyoming: data.py describe, stt.py, tts.py), kept in one place for
this benchmark and tests/test_wyoming.py.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped, SynthesizeVoice

ROOT = Path(__file__).resolve().parent.parent.parent
RATE, WIDTH, CHANNELS = 16000, 2, 1          # Home Assistant's stt format
CHUNK_SAMPLES = 1024

logger = logging.getLogger(__name__)


# --- Home Assistant's client code paths -------------------------------------------------------


async def ha_describe(host: str, port: int, timeout: float = 1.0) -> Optional[Info]:
    """data.load_wyoming_info: describe -> info within `timeout` (HA: 1 s), or None."""
    try:
        async with asyncio.timeout(timeout):
            async with AsyncTcpClient(host, port) as client:
                await client.write_event(Describe().event())
                while True:
                    event = await client.read_event()
                    if event is None:
                        return None
                    if Info.is_type(event.type):
                        return Info.from_event(event)
    except (TimeoutError, OSError):
        return None


@dataclass
class SttResult:
    text: Optional[str]                 # None: the connection ended without a transcript
    latency: float = 0.0                # audio-stop sent -> transcript read, seconds
    events: List[Event] = field(default_factory=list)
    error: Optional[Error] = None


async def ha_transcribe(host: str, port: int, pcm: bytes, language: Optional[str], realtime: bool = False,
                        rate: int = RATE, width: int = WIDTH, channels: int = CHANNELS) -> SttResult:
    """stt.async_process_audio_stream: transcribe(language), audio-start, audio-chunks, audio-stop,
    then events until `transcript` (or the end of the connection)."""
    res = SttResult(None)
    try:
        await _transcribe(host, port, pcm, language, realtime, rate, width, channels, res)
    except OSError as e:  # the server closed the connection (after an error event): HA's SpeechResultState.ERROR
        if res.error is None:
            res.error = Error(text=f"connection lost: {e}", code="connection_lost")
    return res


async def _transcribe(host: str, port: int, pcm: bytes, language: Optional[str], realtime: bool, rate: int,
                      width: int, channels: int, res: SttResult) -> None:
    step = CHUNK_SAMPLES * width * channels
    async with AsyncTcpClient(host, port) as client:
        try:
            await client.write_event(Transcribe(language=language).event())
            await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
            t0 = time.monotonic()
            for i, off in enumerate(range(0, len(pcm), step)):
                await client.write_event(AudioChunk(rate=rate, width=width, channels=channels,
                                                    audio=pcm[off:off + step]).event())
                if realtime:  # the microphone's pace
                    await asyncio.sleep(max(0.0, t0 + (i + 1) * CHUNK_SAMPLES / rate - time.monotonic()))
            await client.write_event(AudioStop().event())
        except OSError:  # refused mid-stream: what did the server say (HA would only see the failure)?
            while (event := await client.read_event()) is not None:
                res.events.append(event)
                if Error.is_type(event.type):
                    res.error = Error.from_event(event)
            raise
        t_stop = time.monotonic()
        while True:
            event = await client.read_event()
            if event is None:
                return
            res.events.append(event)
            if Error.is_type(event.type):
                res.error = Error.from_event(event)
            if Transcript.is_type(event.type):
                res.text = Transcript.from_event(event).text
                res.latency = time.monotonic() - t_stop
                return


@dataclass
class TtsResult:
    wav: Optional[bytes]                # None: the connection ended without audio-stop / synthesize-stopped
    events: List[str] = field(default_factory=list)
    error: Optional[Error] = None


def _wav(pcm: bytes, rate: int, width: int, channels: int) -> bytes:
    bio = io.BytesIO()
    with wave.open(bio, "wb") as w:
        w.setframerate(rate)
        w.setsampwidth(width)
        w.setnchannels(channels)
        w.writeframes(pcm)
    return bio.getvalue()


async def ha_synthesize(host: str, port: int, text: str, voice: Optional[str] = None) -> TtsResult:
    """tts.async_get_tts_audio: synthesize -> audio-chunks until audio-stop, as one WAV."""
    res = TtsResult(None)
    pcm, fmt = bytearray(), (0, 2, 1)
    async with AsyncTcpClient(host, port) as client:
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice) if voice else None).event())
        while True:
            event = await client.read_event()
            if event is None:
                return res
            res.events.append(event.type)
            if Error.is_type(event.type):
                res.error = Error.from_event(event)
            if AudioStop.is_type(event.type):
                break
            if AudioChunk.is_type(event.type):
                chunk = AudioChunk.from_event(event)
                fmt = (chunk.rate, chunk.width, chunk.channels)
                pcm += chunk.audio
    res.wav = _wav(bytes(pcm), *fmt) if fmt[0] else b""
    return res


async def ha_stream_synthesize(host: str, port: int, pieces: Sequence[str], voice: Optional[str] = None,
                               gap: float = 0.0) -> TtsResult:
    """tts.async_stream_tts_audio: synthesize-start, synthesize-chunks (an LLM's text as it comes,
    `gap` seconds apart), the whole text as `synthesize` (compatibility), synthesize-stop, written
    by one task while another reads audio until synthesize-stopped."""
    res = TtsResult(None)
    v = SynthesizeVoice(name=voice) if voice else None
    client = AsyncTcpClient(host, port)
    await client.connect()

    async def write() -> None:
        await client.write_event(SynthesizeStart(voice=v).event())
        message = ""
        for piece in pieces:
            message += piece
            await client.write_event(SynthesizeChunk(text=piece).event())
            if gap:
                await asyncio.sleep(gap)
        await client.write_event(Synthesize(text=message, voice=v).event())
        await client.write_event(SynthesizeStop().event())

    writer = asyncio.create_task(write())
    pcm, fmt = bytearray(), (0, 2, 1)
    try:
        while True:
            event = await client.read_event()
            if event is None:
                return res
            res.events.append(event.type)
            if Error.is_type(event.type):
                res.error = Error.from_event(event)
            if AudioStart.is_type(event.type) and not fmt[0]:
                start = AudioStart.from_event(event)
                fmt = (start.rate, start.width, start.channels)
            elif AudioChunk.is_type(event.type):
                pcm += AudioChunk.from_event(event).audio
            elif SynthesizeStopped.is_type(event.type):
                break
        res.wav = _wav(bytes(pcm), *fmt) if fmt[0] else b""
        return res
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await client.disconnect()


# --- the benchmark ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise SystemExit(f"{proc.name} exited:\n{proc.text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"{proc.name} did not listen on {port} within {timeout:g} s:\n{proc.text()[-3000:]}")


def pctl(xs: List[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


async def run_level(port: int, utts: List[Any], clients: int, tail: bytes) -> Dict[str, Any]:
    from daemon.tools.metrics import cer_counts

    async def client(k: int) -> List[Tuple[float, int, int]]:
        out = []
        order = utts[k % len(utts):] + utts[:k % len(utts)]
        for u in order:
            r = await ha_transcribe("127.0.0.1", port, u.pcm + tail, "zh", realtime=True)
            edits, n = cer_counts(u.text, r.text or "")
            if edits:
                logger.info("%s: heard %r for %r (%d edits)", getattr(u, "id", "?"), r.text, u.text, edits)
            out.append((r.latency if r.text is not None else float("nan"), edits, n))
        return out

    rows = [x for xs in await asyncio.gather(*(client(k) for k in range(clients))) for x in xs]
    lat = [r[0] for r in rows if r[0] == r[0]]
    return {"clients": clients, "utterances": len(rows), "failed": len(rows) - len(lat),
            "p50_s": round(pctl(lat, 0.5), 3), "p95_s": round(pctl(lat, 0.95), 3),
            "mean_s": round(statistics.fmean(lat), 3) if lat else None,
            "cer": round(sum(r[1] for r in rows) / max(1, sum(r[2] for r in rows)), 4)}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemon.tools.bench_wyoming", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,4,8", help="client counts, comma-separated (default 1,4,8)")
    p.add_argument("--models", default=str(ROOT / ".models"), help="models root with whisper-base and fsmn-vad")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for Whisper on both servers (default 2)")
    p.add_argument("--tail-silence", type=float, default=0.5,
                   help="quiet seconds after each utterance before audio-stop (Home Assistant's VAD waits)")
    p.add_argument("--wfw-python", help="python of a venv with wyoming-faster-whisper: run it beside ours")
    p.add_argument("--only", choices=("s2s", "wfw"), help="run one server only")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--keep-logs", help="copy the servers' logs (daemon.log, wy.log, wfw.log) into this folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the results table goes to the log
    import yaml

    from daemon.tools.bench.common import DEFAULT_MANIFEST, load_manifest, noise_pcm
    from daemon.tools.bench.stack import Proc, _env, engine_config, wait_daemon

    levels = [int(x) for x in args.clients.split(",") if x.strip()]
    utts = [u for u in load_manifest(DEFAULT_MANIFEST) if u.lang == "zh" and u.kind == "utt"]
    tail = noise_pcm(args.tail_silence)
    models = Path(args.models)
    tmp = Path(tempfile.mkdtemp(prefix="s2s-bench-wyoming-"))
    procs: List[Any] = []
    results: Dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()},
                               "threads": args.threads, "tail_silence_s": args.tail_silence, "servers": {}}
    try:
        servers: List[Tuple[str, int]] = []
        if args.only != "wfw":
            data = engine_config("bundled", models, tmp / "run", "cpu", 16)
            data["asr"]["ncpu"] = args.threads
            port = free_port()
            data["wyoming"] = {"host": "127.0.0.1", "asr_port": port, "tts_port": port}
            cfg = tmp / "s2s.yaml"
            cfg.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
            from daemon.config import load_config

            c = load_config(str(cfg), env={})
            d = Proc("daemon", [sys.executable, "-m", "daemon", "--config", str(cfg)], tmp / "daemon.log", _env())
            procs.append(d)
            wait_daemon(d, [c.daemon.endpoint("asr"), c.daemon.endpoint("tts")], 300.0)
            w = Proc("s2s-wyoming", [sys.executable, "-m", "bridge.wyoming", "--config", str(cfg)], tmp / "wy.log", _env())
            procs.append(w)
            wait_port(port, w, 60.0)
            servers.append(("s2s-wyoming", port))
        if args.wfw_python and args.only != "s2s":
            port = free_port()
            env = dict(_env(), HF_HUB_OFFLINE="1")
            f = Proc("wyoming-faster-whisper", [args.wfw_python, "-m", "wyoming_faster_whisper", "--uri",
                                                f"tcp://127.0.0.1:{port}", "--model", str(models / "whisper-base"),
                                                "--data-dir", str(tmp / "wfw"), "--language", "zh", "--beam-size", "5",
                                                "--compute-type", "int8", "--cpu-threads", str(args.threads),
                                                "--stt-library", "faster-whisper", "--local-files-only"],
                     tmp / "wfw.log", env)
            procs.append(f)
            wait_port(port, f, 60.0)
            servers.append(("wyoming-faster-whisper", port))
        for name, port in servers:
            asyncio.run(ha_transcribe("127.0.0.1", port, utts[0].pcm, "zh"))  # warm-up (wfw loads its model here)
            results["servers"][name] = []
        # Each count on each server in turn: a machine whose load drifts (others' work) treats both alike.
        for n in levels:
            for name, port in servers:
                r = asyncio.run(run_level(port, utts, n, tail))
                r["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
                results["servers"][name].append(r)
                logger.info(f"{name:24s} clients={n:2d}  p50 {r['p50_s']:.2f} s  p95 {r['p95_s']:.2f} s  "
                      f"CER {r['cer'] * 100:.1f} %  ({r['utterances']} utterances, {r['failed']} failed; "
                      f"load {r['loadavg_1min_after']})")
        results["machine"]["loadavg_after"] = os.getloadavg()
        logger.info(f"load average before {results['machine']['loadavg_before']}, after {results['machine']['loadavg_after']}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    finally:
        for pr in reversed(procs):
            pr.stop()
        if args.keep_logs:
            Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
            for log in tmp.glob("*.log"):
                shutil.copy(log, Path(args.keep_logs) / log.name)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
