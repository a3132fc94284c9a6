"""Mode acceptance (asr + tts + e2e judged against the seed's targets) and the command line."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional


from daemon.tools.bench.common import DEFAULT_MANIFEST, ENGINES, EN_REPLIES, MODES, TARGET_CER, TARGET_E2E_MS, TARGET_TTS_MS, TARGET_VRAM_BYTES, ZH_REPLIES, gpu_names, load_manifest, machine, table, write_result
from daemon.tools.bench.stack import Stack, default_models, open_stack, stack_language
from daemon.tools.bench.asr import _engine_transcribe, print_asr, print_ipc, run_asr, run_ipc
from daemon.tools.bench.e2e import print_e2e, print_tts, run_e2e, run_tts
from daemon.tools.bench.load import print_load, print_soak, run_load, run_soak
from daemon.tools.bench.capacity import DEFAULT_STREAMS, parse_streams, parse_warmup, print_capacity, run_capacity, stack_sessions

logger = logging.getLogger(__name__)


# --- acceptance --------------------------------------------------------------------------------


def gpu_memory(st: Stack) -> Dict[str, Any]:
    """Peak allocated per engine (torch, in this process, on the configured devices) and the
    daemon's total from nvidia-smi while both its engines are loaded."""
    try:
        import torch
    except ImportError:
        return {"available": False, "why": "torch not installed"}
    if not torch.cuda.is_available():
        return {"available": False, "why": "no GPU"}
    out: Dict[str, Any] = {"available": True, "devices": gpu_names()}
    exe = shutil.which("nvidia-smi")
    if exe and st.daemon_pid:
        try:
            q = subprocess.run([exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=10).stdout
            used = sum(int(l.split(",")[1]) for l in q.splitlines() if l.strip() and int(l.split(",")[0]) == st.daemon_pid)
            out["daemon_nvidia_smi_mib"] = used
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            out["daemon_nvidia_smi_mib"] = None
    if st.cfg is None:
        return out
    from daemon.serving.factory import build_asr, build_tts

    utt = load_manifest(DEFAULT_MANIFEST, 1)[0]
    torch.cuda.reset_peak_memory_stats()
    pool = build_asr(st.cfg)[0]
    _engine_transcribe(pool, utt)
    out["asr_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tts = build_tts(st.cfg)[0]
    tts.synthesize(ZH_REPLIES[0] if stack_language(st) == "zh" else EN_REPLIES[0], stack_language(st))
    out["tts_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated() - base)
    if exe:
        try:
            q = subprocess.run([exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=10).stdout
            out["bench_nvidia_smi_mib"] = sum(int(l.split(",")[1]) for l in q.splitlines()
                                              if l.strip() and int(l.split(",")[0]) == os.getpid())
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    pool.shutdown()
    tts.shutdown()
    return out


def judge(asr: Dict[str, Any], tts: Dict[str, Any], e2e: Dict[str, Any], gpu: Dict[str, Any]) -> List[Dict[str, Any]]:
    """PASS/FAIL rows against the seed's table (pure: unit-tested)."""
    rows = []
    cer = asr.get("paths", {}).get("daemon", {}).get("cer_zh")
    rows.append({"criterion": "ASR CER (Chinese) < 5 %", "value": None if cer is None else f"{cer * 100:.1f} %",
                 "result": "n/a" if cer is None else ("PASS" if cer < TARGET_CER else "FAIL")})
    p95 = tts.get("per_sentence", {}).get("p95")
    rows.append({"criterion": "TTS < 500 ms per sentence (p95)", "value": None if p95 is None else f"{p95:.0f} ms",
                 "result": "n/a" if p95 is None else ("PASS" if p95 < TARGET_TTS_MS else "FAIL")})
    e = e2e.get("speech_end_to_first_audio", {}).get("p95")
    rows.append({"criterion": "end-to-end < 2 s (speech end -> first reply audio, p95)",
                 "value": None if e is None else f"{e / 1000:.2f} s",
                 "result": "n/a" if e is None or e2e.get("missing") else ("PASS" if e < TARGET_E2E_MS else "FAIL")})
    if e2e.get("missing"):
        rows[-1]["result"] = "FAIL"
        rows[-1]["value"] = f"{rows[-1]['value']}, {e2e['missing']} without a reply"
    if not gpu.get("available"):
        rows.append({"criterion": "P100 VRAM < 4 GB", "value": f"n/a ({gpu.get('why', 'no GPU')})", "result": "n/a"})
    else:
        total = gpu.get("daemon_nvidia_smi_mib")
        peak = (gpu.get("asr_peak_allocated_bytes") or 0) + (gpu.get("tts_peak_allocated_bytes") or 0)
        val = total * 2 ** 20 if total else peak
        rows.append({"criterion": "P100 VRAM < 4 GB", "value": f"{val / 2 ** 30:.2f} GiB" +
                     (" (daemon, nvidia-smi)" if total else " (peak allocated, both engines)"),
                     "result": "PASS" if val < TARGET_VRAM_BYTES else "FAIL"})
    return rows


def run_acceptance(st: Stack, args: argparse.Namespace) -> Dict[str, Any]:
    # The targets concern what users get, the daemon path: the in-process and library
    # comparisons (`asr` mode) would only double the run time.
    args.no_inprocess = True
    asr = run_asr(st, args)
    print(print_asr(asr), flush=True)
    tts = run_tts(st, args)
    print(print_tts(tts), flush=True)
    e2e = run_e2e(st, args)
    print(print_e2e(e2e), flush=True)
    gpu = gpu_memory(st)
    rows = judge(asr, tts, e2e, gpu)
    return {"asr": asr, "tts": tts, "e2e": e2e, "gpu": gpu, "criteria": rows,
            "models": {"asr": st.info.get("asr", {}).get("model") or st.info.get("asr", {}).get("models"),
                       "tts": st.info.get("tts", {}).get("model_dir") or st.info.get("tts", {}).get("voice")}}


def print_acceptance(r: Dict[str, Any]) -> str:
    return table("Acceptance (the seed's targets)", ["criterion", "measured", "result"],
                 [[c["criterion"], c["value"] or "n/a", c["result"]] for c in r["criteria"]])


# --- command line ----------------------------------------------------------------------------------


RUNNERS = {"ipc": (run_ipc, print_ipc, False), "asr": (run_asr, print_asr, False), "tts": (run_tts, print_tts, False),
           "e2e": (run_e2e, print_e2e, True), "load": (run_load, print_load, True),
           "soak": (run_soak, print_soak, True), "capacity": (run_capacity, print_capacity, False),
           "acceptance": (run_acceptance, print_acceptance, True)}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="s2s-bench", description=__doc__.split("\n\n")[0],
                                epilog="Modes: " + ", ".join(MODES) + ". See BENCHMARKS.md.")
    p.add_argument("mode", choices=MODES)
    g = p.add_argument_group("what to run against")
    g.add_argument("--engines", choices=ENGINES, help="models for a self-started stack (default: config with --config, "
                                                      "else bundled)")
    g.add_argument("--config", help="YAML config (--engines config; or for in-process comparisons when attaching)")
    g.add_argument("--models", default=str(default_models()), help="models root (default: $S2S_MODELS or ./.models)")
    g.add_argument("--device", default="cpu", help="asr/tts device for bundled/tiny/full (cpu, auto, cuda:N)")
    g.add_argument("--agent", default="echo", choices=("echo", "fixed", "langgraph", "openai"),
                   help="bridge agent (default echo; fixed: a stand-in LLM with --agent-ttft to its first token)")
    g.add_argument("--agent-url", default="", help="agent URL for langgraph/openai")
    g.add_argument("--agent-ttft", type=float, default=0.2, help="--agent fixed: seconds to the first token (0.2)")
    g.add_argument("--speculation", default="both", choices=("on", "off", "both"),
                   help="e2e: speculative turns (turn.speculate) on, off, or both side by side (default both)")
    g.add_argument("--tts-engine", default="", choices=("", "piper", "kokoro", "kokoro+piper"),
                   help="--engines bundled: the TTS engine (default piper)")
    g.add_argument("--whisper-beam", type=int, default=0,
                   help="--engines bundled: Whisper's beam size (0 = the config default, 5); e.g. `asr --whisper-beam 1`"
                        " beside the default shows the accuracy/speed trade-off")
    g.add_argument("--asr-ncpu", type=int, default=0,
                   help="--engines bundled/tiny/full: asr.ncpu, the ASR models' intra-op threads (0 = the config "
                        "default); e.g. `capacity --asr-ncpu 1` beside `--asr-ncpu 2` measures the thread policy")
    g.add_argument("--tts-threads", type=int, default=0,
                   help="--tts-engine kokoro: onnxruntime intra-op threads (0 = one per core, at most 4)")
    g.add_argument("--asr", help="attach: daemon ASR endpoint (ipc://... or tcp://...)")
    g.add_argument("--tts", help="attach: daemon TTS endpoint")
    g.add_argument("--bridge", help="attach: bridge websocket URL ws://HOST:PORT/ws")
    g.add_argument("--bridge-pid", type=int, help="attach: bridge pid, for its CPU and RSS")
    g.add_argument("--start-timeout", type=float, default=300.0)
    g.add_argument("--keep-logs", action="store_true", help="keep the started processes' logs and config")
    s = p.add_argument_group("sizes")
    s.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="manifest.jsonl (id, path, text, lang)")
    s.add_argument("--files", type=int, default=0, help="asr: first N manifest rows only (0 = all)")
    s.add_argument("--repeat", type=int, default=2, help="asr: best of N per file; tts: passes over the replies")
    s.add_argument("--no-inprocess", action="store_true", help="asr: daemon only (no engine/library comparison)")
    s.add_argument("--chunks", type=int, default=300, help="ipc: quiet 100 ms chunks")
    s.add_argument("--requests", type=int, default=20, help="ipc: TTS requests")
    s.add_argument("--replies", type=int, default=5, help="tts: multi-sentence replies per pass")
    s.add_argument("--utterances", type=int, default=6, help="e2e: utterances spoken")
    s.add_argument("--tail", type=float, default=8.0, help="e2e: seconds of open microphone after speech, at most")
    s.add_argument("--sessions", type=int, default=None, help="load: concurrent (32); soak: sequential (1000)")
    s.add_argument("--seconds", type=float, default=30.0,
                   help="load: seconds of audio per session; capacity: cap on each recording (11-19 s; 30 = whole)")
    s.add_argument("--drain-timeout", type=float, default=60.0,
                   help="load, capacity: seconds to wait, after a session stops, for its last final")
    s.add_argument("--streams", type=parse_streams, default=DEFAULT_STREAMS,
                   help=f"capacity: the sweep's concurrent stream counts (default {DEFAULT_STREAMS})")
    s.add_argument("--warmup", type=parse_warmup, default=[],
                   help="capacity: stream counts served first, in order and not measured (e.g. 1,8: the "
                        "daemon has seen light load before the sweep)")
    s.add_argument("--speech-every", type=int, default=25,
                   help="soak: every Nth session speaks an utterance and waits for the reply (others send 0.5 s of "
                        "quiet audio)")
    p.add_argument("--out", default="bench-results", help="directory for MODE.json (default bench-results/)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.sessions is None:
        args.sessions = 1000 if args.mode == "soak" else 32
    return args


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["voices"]:  # in-process, no stack: its own arguments (daemon/tools/bench/voices.py)
        from daemon.tools.bench import voices

        return voices.main(argv[1:])
    if argv[:1] == ["turns"]:  # in-process: the turn judge's signals (daemon/tools/bench/turns.py)
        from daemon.tools.bench import turns

        return turns.main(argv[1:])
    if argv[:1] == ["scaleout"]:  # several daemons against one (daemon/tools/bench/scaleout.py)
        from daemon.tools.bench import scaleout

        return scaleout.main(argv[1:], parse_args)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run, show, bridge = RUNNERS[args.mode]
    t0 = time.monotonic()
    sessions = {"load": args.sessions, "capacity": stack_sessions(args.streams + args.warmup)}.get(args.mode, 32)
    with open_stack(args, need_bridge=bridge, sessions=sessions) as st:
        print(f"s2s-bench {args.mode}: {st.label()}", flush=True)
        if st.info.get("fallbacks"):
            print(f"  fallbacks: {st.info['fallbacks']}")
        result = run(st, args)
        data = {"mode": args.mode, "machine": machine(), "stack": st.summary(),
                "args": {k: v for k, v in vars(args).items() if k not in ("mode",)}, "result": result,
                "elapsed_s": round(time.monotonic() - t0, 1)}
    print(show(result))
    path = write_result(Path(args.out), args.mode, data)
    print(f"wrote {path} ({data['elapsed_s']:.0f} s)")
    if args.mode == "acceptance":
        return 0 if all(c["result"] != "FAIL" for c in result["criteria"]) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
