"""`python -m daemon.tools.bench_gpu` (run by scripts/gpu-check.sh): the seed's acceptance figures on
a GPU in one pass, against one daemon + bridge started on the given device.

    python -m daemon.tools.bench_gpu --device cuda --engines full --models DIR --out DIR
                                     [--streams 1,32,128] [--budget 330] [--quick] [--junit FILE]

Runs, in order of importance, each within what is left of --budget seconds: describe (device and
dtype of both engines), VRAM with both engines loaded, MeloTTS per sentence, the Paraformer's real-time
factor, final latency at each --streams count of real-time streams (VRAM sampled throughout),
speech end -> first reply audio with a stand-in agent 200 ms to its first token, and each engine's
peak allocation in this process. The measuring is s2s-bench's own (daemon/tools/bench/). Writes
OUT/gpu-check.json and OUT/gpu-check.md; a figure that could not be measured is there with why.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from daemon.tools.bench_gpu_report import (
    environment,
    e2e_ok,
    figure,
    markdown,
    omitted,
    read_junit,
    tts_ok,
    vram_ok,
    whisper_ok,
)

logger = logging.getLogger(__name__)

DEFAULT_STREAMS = "1,32,128"
# Rough cost of each phase (s), full size on a GPU: a phase starts only when this much budget is left.
PHASE_COST_S = {"tts": 20, "asr": 20, "capacity": 35, "e2e": 40, "engine_peaks": 45}


def fixed_keys(streams: List[int]) -> List[str]:
    """Every figure the report must hold, measured or named as not measured."""
    return (["asr_device", "tts_device", "vram_loaded", "vram_under_load", "engine_peaks", "tts_per_sentence",
             "paraformer_rtf"] + [f"final_latency_{n}" for n in streams] + ["e2e_first_audio", "whisper_1_vs_4",
                                                                             "gpu_tests"])


# --- VRAM from nvidia-smi, sampled in a thread ----------------------------------------------------


class VramSampler:
    """Peak GPU memory of the daemon process (per-process, nvidia-smi) and of the whole card
    (memory.used minus what was used before the daemon started), sampled every `period` s."""

    def __init__(self, index: int, period: float = 0.5):
        self.exe = shutil.which("nvidia-smi")
        self.index, self.period = index, period
        self.pid: Optional[int] = None
        self.baseline: Optional[int] = None
        self.peak_proc = self.peak_card = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _query(self, *args: str) -> List[List[str]]:
        assert self.exe
        out = subprocess.run([self.exe, *args, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10).stdout
        return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]

    def sample(self) -> Dict[str, Optional[int]]:
        """(MiB) the daemon's own and the card's used memory now."""
        if not self.exe:
            return {"proc": None, "card": None}
        try:
            card = int(self._query("--query-gpu=index,memory.used", f"--id={self.index}")[0][1])
            proc = sum(int(r[1]) for r in self._query("--query-compute-apps=pid,used_memory")
                       if self.pid and r[0].isdigit() and int(r[0]) == self.pid) if self.pid else None
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return {"proc": None, "card": None}
        return {"proc": proc or None, "card": card}

    def start_baseline(self) -> None:
        self.baseline = self.sample()["card"]

    def reset_peak(self) -> None:
        self.peak_proc = self.peak_card = 0

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            s = self.sample()
            self.peak_proc = max(self.peak_proc, s["proc"] or 0)
            if s["card"] is not None and self.baseline is not None:
                self.peak_card = max(self.peak_card, s["card"] - self.baseline)

    def __enter__(self) -> "VramSampler":
        if self.exe:
            self._thread = threading.Thread(target=self._run, name="vram", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def peak_mib(self) -> Optional[int]:
        return self.peak_proc or self.peak_card or None


# --- the run -----------------------------------------------------------------------------------------


def bench_args(a: argparse.Namespace, streams: List[int], out: Path) -> argparse.Namespace:
    """s2s-bench's own arguments for the stack and its modes (daemon/tools/bench/cli.py)."""
    from daemon.tools.bench.cli import parse_args

    q = a.quick
    return parse_args(["acceptance", "--engines", a.engines, "--models", str(a.models), "--device", a.device,
                       "--agent", "fixed", "--agent-ttft", "0.2", "--speculation", "on",
                       "--streams", ",".join(map(str, streams)), "--seconds", "3" if q else "12",
                       "--drain-timeout", "20" if q else "60", "--utterances", "1" if q else "4",
                       "--replies", "1" if q else "5", "--repeat", "1", "--files", "1" if q else "4",
                       "--tail", "4" if q else "8", "--start-timeout", str(a.start_timeout), "--out", str(out)]
                      + (["--keep-logs"] if a.keep_logs else []))


class Run:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.t0 = time.monotonic()
        self.figures: List[Dict[str, Any]] = []
        self.errors: List[str] = []
        self.raw: Dict[str, Any] = {}

    def left(self) -> float:
        return self.a.budget - (time.monotonic() - self.t0)

    def phase(self, name: str, fn: Callable[[], Any]) -> Any:
        """fn() when the budget allows, else None with the reason recorded in self.raw[name]."""
        cost = PHASE_COST_S.get(name, 0) * (0.2 if self.a.quick else 1.0)
        if self.left() < cost:
            self.raw[name] = {"skipped": f"the time budget ({self.a.budget:g} s) had {max(0.0, self.left()):.0f} s "
                                         f"left, this phase needs about {cost:g} s"}
            return None
        t = time.monotonic()
        try:
            out = fn()
            self.raw[name] = out
            logger.info("bench_gpu: %s done in %.1f s", name, time.monotonic() - t)
            return out
        except (Exception, SystemExit) as e:  # noqa: BLE001 - one phase's failure is reported, the rest run
            logger.exception("bench_gpu: %s failed", name)
            self.errors.append(f"{name}: {type(e).__name__}: {e}"[:600])
            self.raw[name] = {"skipped": f"failed: {type(e).__name__}: {str(e)[:200]}"}
            return None

    def why(self, name: str) -> str:
        r = self.raw.get(name)
        return r.get("skipped", "not run") if isinstance(r, dict) else "not run"


def measure(a: argparse.Namespace) -> Dict[str, Any]:
    from daemon.tools.bench.capacity import run_capacity, stack_sessions
    from daemon.tools.bench.asr import run_asr
    from daemon.tools.bench.cli import gpu_memory
    from daemon.tools.bench.e2e import run_e2e, run_tts
    from daemon.tools.bench.stack import open_stack

    streams = sorted({int(x) for x in a.streams.split(",") if x.strip()})
    run = Run(a)
    out = Path(a.out)
    args = bench_args(a, streams, out / "bench")
    cuda = a.device != "cpu"
    index = int(a.device.split(":", 1)[1]) if ":" in a.device else 0
    no_gpu = "" if cuda else "the device is cpu (dry run): no GPU memory to measure"
    sampler = VramSampler(index)
    if cuda and not sampler.exe:
        no_gpu = "nvidia-smi is not on this machine"
    sampler.start_baseline()
    f = run.figures
    try:
        with sampler, open_stack(args, need_bridge=True, sessions=stack_sessions(streams)) as st:
            sampler.pid = st.daemon_pid
            time.sleep(1.5 if cuda else 0.0)
            loaded = sampler.sample()
            info = st.info
            a_info, t_info = info.get("asr", {}), info.get("tts", {})
            f.append(figure("asr_device", "ASR device / dtype (describe)",
                            f"{a_info.get('engine')} on {a_info.get('device')} {a_info.get('dtype')}",
                            kind="correctness", detail={"fallbacks": info.get("fallbacks", [])}))
            f.append(figure("tts_device", "TTS device / dtype (describe)",
                            f"{t_info.get('engine')} on {t_info.get('device')} {t_info.get('dtype', 'float32')}",
                            kind="correctness"))
            mib = loaded["proc"] or (loaded["card"] - sampler.baseline if loaded["card"] is not None and
                                     sampler.baseline is not None else None)
            f.append(figure("vram_loaded", "VRAM, ASR + TTS loaded (daemon)", mib, "MiB", why=no_gpu or
                            "nvidia-smi gave no reading", target="< 4 GB", ok=vram_ok(mib), kind="memory",
                            detail=loaded))
            sampler.reset_peak()
            tts = run.phase("tts", lambda: run_tts(st, args))
            ps = (tts or {}).get("per_sentence", {})
            f.append(figure("tts_per_sentence", "MeloTTS per sentence p50 / p95",
                            None if not tts else {"p50": ps.get("p50"), "p95": ps.get("p95")}, "ms",
                            why=run.why("tts"), target="p95 < 500 ms", ok=tts_ok(ps.get("p95")),
                            detail=None if not tts else {"first_audio": tts.get("first_audio"),
                                                         "rtf_p50": tts.get("rtf_p50"), "sentences": tts.get("sentences")}))
            args.no_inprocess = True
            asr = run.phase("asr", lambda: run_asr(st, args))
            d = (asr or {}).get("paths", {}).get("daemon", {})
            f.append(figure("paraformer_rtf", f"Paraformer real-time factor ({a.engines} size, offline decode, daemon)",
                            d.get("rtf"), "", why=run.why("asr"),
                            detail=None if not asr else {"files": asr.get("files"), "audio_s": asr.get("audio_s"),
                                                         "note": "random weights: the text (CER) means nothing"}))
            cap = run.phase("capacity", lambda: run_capacity(st, args))
            points = {p["streams"]: p for p in (cap or {}).get("points", [])}
            for n in streams:
                p = points.get(n)
                lat = (p or {}).get("final_latency_s", {})
                f.append(figure(f"final_latency_{n}", f"final latency, {n} real-time streams p50 / p95",
                                None if p is None else {"p50": lat.get("p50"), "p95": lat.get("p95")}, "s",
                                why=run.why("capacity") if cap is None else "no such point in the sweep",
                                target="p95 <= 1 s", ok=None if p is None else bool(p.get("holds")),
                                detail=None if p is None else {k: p.get(k) for k in (
                                    "admitted", "refused_busy", "undrained", "errors", "cpu_s_per_audio_s")}))
            e2e = run.phase("e2e", lambda: run_e2e(st, args))
            s = (e2e or {}).get("speech_end_to_first_audio", {})
            f.append(figure("e2e_first_audio", "speech end -> first reply audio, agent 200 ms to first token, p50 / p95",
                            None if not e2e or s.get("p95") is None else {"p50": s.get("p50"), "p95": s.get("p95")},
                            "ms", why=run.why("e2e") if not e2e else f"{e2e.get('missing')} utterance(s) without a reply",
                            target="< 2 s", ok=e2e_ok(s.get("p95")),
                            detail=None if not e2e else {"speech_end_to_final": e2e.get("speech_end_to_final"),
                                                         "missing": e2e.get("missing")}))
            peak = sampler.peak_mib()
            f.append(figure("vram_under_load", "VRAM peak under load (daemon, TTS + ASR streams + e2e)", peak,
                            "MiB", why=no_gpu or "nvidia-smi gave no reading", target="< 4 GB", ok=vram_ok(peak),
                            kind="memory"))
            eng = run.phase("engine_peaks", lambda: gpu_memory(st)) if cuda else None
            peaks = None if not eng or not eng.get("available") else {
                "asr": round(eng.get("asr_peak_allocated_bytes", 0) / 2 ** 20), "tts": round(
                    eng.get("tts_peak_allocated_bytes", 0) / 2 ** 20)}
            f.append(figure("engine_peaks", "torch peak allocated per engine (this process)", peaks, "MiB",
                            why=no_gpu or run.why("engine_peaks") if not eng else eng.get("why", ""), kind="memory"))
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the stack did not start: every figure says so
        logger.exception("bench_gpu: the stack failed")
        run.errors.append(f"stack: {type(e).__name__}: {str(e)[-1500:]}")
    have = {x["key"] for x in f}
    for key in fixed_keys(streams):
        if key not in have and key not in ("whisper_1_vs_4", "gpu_tests"):
            f.append(figure(key, key.replace("_", " "), None, why="the daemon + bridge did not start (see errors)"))
    f.append(whisper_figure())
    junit = read_junit(Path(a.junit) if a.junit else None)
    counts = junit.get("counts", {})
    f.append(figure("gpu_tests", "tests that need a GPU (passed / failed / skipped)",
                    None if not junit["ran"] else {k: counts.get(k, 0) for k in ("passed", "failed", "error", "skipped")},
                    why=junit.get("why", ""), ok=None if not junit["ran"] or not (counts.get("passed") or counts.get(
                        "failed") or counts.get("error")) else not (counts.get("failed") or counts.get("error")),
                    kind="correctness"))
    return {"mode": "dry run" if a.quick else "full", "device": a.device, "engines": a.engines,
            "streams": streams, "budget_s": a.budget, "elapsed_s": round(time.monotonic() - run.t0, 1),
            "environment": environment(a.device), "figures": f, "gpu_tests": junit, "errors": run.errors,
            "raw": run.raw}


def whisper_figure() -> Dict[str, Any]:
    """Whisper base, 1 vs 4 concurrent utterances: only where ctranslate2 came along (and weights)."""
    try:
        import ctranslate2  # noqa: F401
        import faster_whisper  # noqa: F401
    except ImportError:
        why = omitted("ctranslate2") or "ctranslate2 is not installed"
        return figure("whisper_1_vs_4", "Whisper base: 4 concurrent utterances / 1", None,
                      why=f"ctranslate2 is not in the wheelhouse: {why}", target="< 2.5x")
    return figure("whisper_1_vs_4", "Whisper base: 4 concurrent utterances / 1", None, target="< 2.5x",
                  why="Whisper base's weights (145 MB) cannot be carried and random CTranslate2 weights would decode "
                      "to the length limit: not measured; on a host with the weights: s2s-bench asr --engines bundled")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (dry run)")
    p.add_argument("--engines", default="full", choices=("full", "tiny"))
    p.add_argument("--models", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--streams", default=DEFAULT_STREAMS)
    p.add_argument("--budget", type=float, default=330.0, help="seconds for all the measuring")
    p.add_argument("--start-timeout", type=float, default=240.0)
    p.add_argument("--quick", action="store_true", help="dry-run sizes: 1 reply, 1 utterance, 3 s streams")
    p.add_argument("--junit", help="pytest --junitxml of tests/test_gpu_*.py, merged into the report")
    p.add_argument("--keep-logs", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a.out.mkdir(parents=True, exist_ok=True)
    report = measure(a)
    (a.out / "gpu-check.json").write_text(json.dumps(report, ensure_ascii=False, indent=1, default=str) + "\n",
                                          encoding="utf-8")
    md_text = markdown(report)
    (a.out / "gpu-check.md").write_text(md_text, encoding="utf-8")
    sys.stdout.write(md_text)
    logger.info(f"wrote {a.out / 'gpu-check.json'} and {a.out / 'gpu-check.md'}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
