"""s2s-speechd: load config, load engines, serve ASR and TTS on ZeroMQ ROUTER sockets.

    s2s-speechd [--config FILE] [--check-config] [--strict] [-v]

`main()` owns the models: it loads them (on a thread, while the main thread keeps systemd's
start timeout extended), then hands them to `server.Daemon`, which serves until stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from daemon import devices
from daemon.config import Config
from daemon.engines import ASRPool, Fallback, TTSEngine
from daemon.errors import S2SError
from daemon.serving import entry
from daemon.serving.notify import Notifier

logger = logging.getLogger("daemon")
EXTEND_SECONDS = 60.0


def model_status(cfg: Config) -> List[str]:
    """One line per model path the selected engines need: present or absent (cheap, no loading)."""
    lines = []
    wanted = []
    if cfg.asr.engine == "funasr":
        f = cfg.asr.funasr
        wanted += [("asr.funasr.paraformer", f.paraformer), ("asr.funasr.vad", f.vad)]
        wanted += [(k, v) for k, v in (("asr.funasr.punc", f.punc), ("asr.funasr.streaming", f.streaming)) if v]
    else:
        wanted += [("asr.whisper.model", cfg.asr.whisper.model), ("asr.whisper.vad", cfg.asr.whisper.vad)]
    if cfg.tts.engine == "melo":
        wanted += [("tts.melo.model", cfg.tts.melo.model), ("tts.melo.hf_home", cfg.tts.melo.hf_home),
                   ("tts.melo.nltk_data", cfg.tts.melo.nltk_data)]
    else:
        wanted += [("tts.piper.voice", cfg.tts.piper.voice)]
    for key, rel in wanted:
        p = cfg.model_path(rel)
        lines.append(f"{key:24s} {'ok     ' if p.exists() else 'ABSENT '} {p}")
    return lines


def check_config(cfg: Config) -> int:
    print(f"config: {cfg.source}: ok")
    for o in cfg.overrides:
        print(f"override: {o}")
    print(f"asr: engine={cfg.asr.engine} device={cfg.asr.device} dtype={cfg.asr.dtype} language={cfg.asr.language}")
    print(f"tts: engine={cfg.tts.engine} device={cfg.tts.device} fallback_device={cfg.tts.fallback_device} "
          f"language={cfg.tts.language} sample_rate={cfg.tts.sample_rate}")
    print(f"endpoints: asr={cfg.daemon.endpoint('asr')} tts={cfg.daemon.endpoint('tts')}")
    print(f"models_root: {cfg.models_root}")
    absent = 0
    for line in model_status(cfg):
        print(f"model: {line}")
        absent += "ABSENT" in line
    if absent and cfg.daemon.strict:
        print(f"error: {absent} model path(s) absent and daemon.strict is set", file=sys.stderr)
        return 1
    if absent:
        print(f"note: {absent} model path(s) absent: the daemon will fall back to the bundled models "
              f"(asr -> {cfg.asr.fallback_engine}, tts -> {cfg.tts.fallback_engine})")
    return 0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = entry.parser("s2s-speechd", "s2s speech daemon (FunASR ASR + MeloTTS TTS over ZeroMQ)")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit without loading models")
    p.add_argument("--strict", action="store_true", help="refuse to start when configured weights are absent")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cfg = entry.load("s2s-speechd", args)
    if cfg is None:
        return entry.CONFIG_ERROR
    if args.check_config:
        return check_config(cfg)
    devices.quiet_thread_pools()  # before any model library loads its OpenMP runtime
    entry.setup_logging(cfg, args.verbose)
    return run(cfg, strict=args.strict or cfg.daemon.strict)


def load_engines(cfg: Config, strict: bool, notifier: Notifier) -> Tuple[ASRPool, TTSEngine, List[Fallback], bool]:
    """Build ASR then TTS on a thread; meanwhile keep systemd's start timeout extended.

    SIGTERM/SIGINT while loading exit at once (0); a SIGHUP is remembered (the last value in
    the tuple) and the config re-read once serving: its default action would kill us."""
    from daemon.serving.factory import build_asr, build_tts

    result: Dict[str, Any] = {}
    stage = {"now": "loading ASR engine"}

    def work() -> None:
        try:
            notifier.status(f"loading ASR engine ({cfg.asr.engine} on {cfg.asr.device})")
            asr, fb1 = build_asr(cfg, strict)
            result["asr"] = asr
            stage["now"] = "loading TTS engine"
            notifier.status(f"loading TTS engine ({cfg.tts.engine} on {cfg.tts.device})")
            tts, fb2 = build_tts(cfg, strict)
            result.update(tts=tts, fallbacks=fb1 + fb2)
        except BaseException as e:  # handed to the main thread
            result["error"] = e

    got: Dict[str, int] = {"stop": 0, "hup": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            got["hup"] = 1
        else:
            got["stop"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    t = threading.Thread(target=work, name="engine-load", daemon=True)
    started = time.monotonic()
    t.start()
    try:
        while t.is_alive():
            notifier.extend_timeout(EXTEND_SECONDS)
            t.join(1.0)
            if got["stop"]:
                logger.info("signal %d while %s: exiting", got["stop"], stage["now"])
                notifier.stopping("stopped while loading engines")
                logging.shutdown()
                os._exit(0)
    finally:
        for s, h in old.items():
            signal.signal(s, h if s != signal.SIGHUP else signal.SIG_IGN)
    if "error" in result:
        raise result["error"]
    if got["hup"]:
        logger.info("SIGHUP while loading engines: the config is re-read once serving")
    logger.info("engines loaded in %.1f s", time.monotonic() - started)
    return result["asr"], result["tts"], result["fallbacks"], bool(got["hup"])


def shutdown_engines(engines: List[Any], timeout: float) -> bool:
    """Shut engines down on a helper thread; False when a hung worker did not let go in time."""
    def work() -> None:
        for e in engines:
            try:
                e.shutdown()
            except Exception:
                logger.exception("engine shutdown failed")

    t = threading.Thread(target=work, name="engine-shutdown", daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive()


def run(cfg: Config, strict: bool = False) -> int:
    """Load, serve until SIGTERM/SIGINT (or a fatal failure), drain, exit code."""
    from daemon.serving.factory import StartupError
    from daemon.serving.server import Daemon

    notifier = Notifier()
    notifier.status("starting: loading engines")
    # SIGHUP's default action kills the process: until the loop handles it, remember it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        asr, tts, fallbacks, hup = load_engines(cfg, strict, notifier)
    except StartupError as e:
        logger.error("%s", e)
        notifier.status(f"failed: {e}")
        return 1
    except S2SError as e:
        logger.error("engine load failed: %s", e)
        notifier.status(f"failed: {e}")
        return 1
    for f in fallbacks:
        logger.warning("running on a fallback: %s", f.line())
    d = Daemon(cfg, asr, tts, fallbacks, notifier, reload_pending=hup)
    rc = asyncio.run(d.serve())
    if not shutdown_engines([asr, tts], timeout=max(1.0, d.cfg.daemon.drain_timeout)):
        logger.warning("an engine worker did not stop; exiting anyway")
        logging.shutdown()
        os._exit(rc)
    if rc == 0:
        logger.info("stopped")
    else:
        logger.info("stopped after a fatal failure (exit %d)", rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
