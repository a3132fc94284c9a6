#!/usr/bin/env python3
"""Benchmark (not a test): what the daemon's ZeroMQ hop costs on top of the engine.

Starts `python -m daemon` on the bundled models (Whisper base + fsmn-vad, Piper; the default
funasr/melo config falls back to them when their weights are absent) and prints:
  1. IPC overhead per 100 ms chunk: round trip of an `audio` chunk sent with ack=true (the
     daemon acks after the engine's feed()) minus the same feed() called in-process, p50/p99;
  2. daemon-vs-library wall ratio for transcribing the fixtures with Whisper;
  3. ASR chunk round trip while a long TTS request streams (TTS must not starve ASR).

    python scripts/bench_ipc.py [--models .models] [--fixtures tests/fixtures] [--config FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon import protocol as P  # noqa: E402
from daemon.audio import float_to_pcm16, read_wav  # noqa: E402
from daemon.client import ASRClient, TTSClient  # noqa: E402
from daemon.config import parse_config  # noqa: E402

CHUNK = 3200  # 100 ms of PCM16 at 16 kHz


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1000, q))


def start_daemon(tmp: Path, models: Path, config: str):
    cfg = yaml.safe_load(Path(config).read_text()) if config else {}
    cfg.setdefault("daemon", {})["runtime_dir"] = str(tmp / "run")
    cfg["models_root"] = str(models)
    cfg.setdefault("asr", {})["device"] = "cpu"
    cfg.setdefault("tts", {})["device"] = "cpu"
    path = tmp / "s2s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ)
    env.pop("S2S_TEST_ENGINES", None)
    log = open(tmp / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(path)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    parsed = parse_config(cfg, str(path))
    eps = parsed.daemon.endpoint("asr"), parsed.daemon.endpoint("tts")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited: {(tmp / 'daemon.log').read_text()[-2000:]}")
        try:
            with ASRClient(eps[0], timeout=1.0) as c:
                c.ping()
            return proc, eps, parsed
        except Exception:
            time.sleep(0.5)
    raise SystemExit("daemon did not come up")


def load_fixtures(fixtures: Path):
    rows = [json.loads(l) for l in (fixtures / "manifest.jsonl").read_text().splitlines() if l.strip()]
    out = []
    for r in rows:
        x, sr = read_wav(str(fixtures / r["path"]))
        out.append((r["id"], float_to_pcm16(x)))
    return out


def daemon_chunk_rtts(asr_ep: str, pcm: bytes):
    rtts = []
    with ASRClient(asr_ep, timeout=60) as c:
        st = c.open()
        for off in range(0, len(pcm), CHUNK):
            t0 = time.perf_counter()
            seq = st.send(pcm[off:off + CHUNK], ack=True)
            st.wait_ack(seq)
            rtts.append(time.perf_counter() - t0)
        st.finalize(timeout=60)
    return rtts


def daemon_transcribe(asr_ep: str, pcm: bytes) -> float:
    t0 = time.perf_counter()
    with ASRClient(asr_ep, timeout=120) as c:
        st = c.open()
        for i, off in enumerate(range(0, len(pcm), CHUNK)):
            # Flow control: every 5 s of audio, wait until the daemon has caught up.
            seq = st.send(pcm[off:off + CHUNK], ack=(i % 50 == 49))
            if i % 50 == 49:
                st.wait_ack(seq)
        st.finalize(timeout=120)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=str(ROOT / ".models"))
    ap.add_argument("--fixtures", default=str(ROOT / "tests" / "fixtures"))
    ap.add_argument("--config", default="", help="YAML to start from (endpoints are replaced)")
    args = ap.parse_args()
    fixtures = load_fixtures(Path(args.fixtures))
    long_pcm = dict(fixtures)["zh_long"]
    with tempfile.TemporaryDirectory(prefix="s2s-bench-") as td:
        proc, (asr_ep, tts_ep), cfg = start_daemon(Path(td), Path(args.models), args.config)
        try:
            with ASRClient(asr_ep) as c:
                info = c.describe()
            print(f"daemon: asr={info['asr'].get('engine')} tts={info['tts'].get('engine')} "
                  f"fallbacks={info['fallbacks']}")
            # In-process engine, same model and chunks.
            from daemon.factory import build_asr

            pool, _fb = build_asr(cfg)
            s = pool.open("bench")
            inproc = []
            for off in range(0, len(long_pcm), CHUNK):
                t0 = time.perf_counter()
                s.feed(long_pcm[off:off + CHUNK])
                inproc.append(time.perf_counter() - t0)
            s.finalize_events()
            pool.close("bench")
            rtts = daemon_chunk_rtts(asr_ep, long_pcm)
            print(f"per 100 ms chunk ({len(rtts)} chunks of zh/long.wav):")
            print(f"  in-process feed   p50 {pct(inproc, 50):7.2f} ms  p99 {pct(inproc, 99):7.2f} ms")
            print(f"  daemon round trip p50 {pct(rtts, 50):7.2f} ms  p99 {pct(rtts, 99):7.2f} ms")
            # Same chunk, same deterministic engine work: the paired difference is the hop's cost.
            diff = [r - i for r, i in zip(rtts, inproc)]
            print(f"  IPC overhead (paired round trip - feed) p50 {pct(diff, 50):7.2f} ms  p99 {pct(diff, 99):7.2f} ms")
            # Whole-fixture wall ratio.
            lib = dmn = 0.0
            for _id, pcm in fixtures:
                s = pool.open("lib")
                t0 = time.perf_counter()
                for off in range(0, len(pcm), CHUNK):
                    s.feed(pcm[off:off + CHUNK])
                s.finalize_events()
                lib += time.perf_counter() - t0
                pool.close("lib")
                dmn += daemon_transcribe(asr_ep, pcm)
            audio_s = sum(len(p) for _i, p in fixtures) / 32000
            print(f"whisper on {len(fixtures)} fixtures ({audio_s:.1f} s audio): library {lib:.2f} s, "
                  f"daemon {dmn:.2f} s, ratio {dmn / lib:.3f}")
            pool.shutdown()
            # ASR under a long TTS request.
            text = "This is a long answer that keeps the speech engine busy. " * 12
            with TTSClient(tts_ep, timeout=120) as t:
                t.send(P.Synthesize(request_id="bench-long", text=text))
                busy = daemon_chunk_rtts(asr_ep, long_pcm[: 32000 * 5])
                first = t.recv(120)
                t.send(P.Cancel(request_id="bench-long"))
            idle = daemon_chunk_rtts(asr_ep, long_pcm[: 32000 * 5])
            print(f"ASR chunk round trip, TTS idle: p50 {pct(idle, 50):.2f} ms p99 {pct(idle, 99):.2f} ms; "
                  f"during a long TTS request: p50 {pct(busy, 50):.2f} ms p99 {pct(busy, 99):.2f} ms "
                  f"(TTS streamed: {isinstance(first, P.SynthAudio)})")
        finally:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
