"""s2s-speechd: load config, load engines, serve ASR and TTS on ZeroMQ ROUTER sockets.

    s2s-speechd [--config FILE] [--check-config] [--strict] [-v]
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from daemon.config import Config, ConfigError, load_config

logger = logging.getLogger("daemon")


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
    p = argparse.ArgumentParser(prog="s2s-speechd", description="s2s speech daemon (FunASR ASR + MeloTTS TTS over ZeroMQ)")
    p.add_argument("--config", help="YAML config (default: $S2S_CONFIG, /etc/s2s/s2s.yaml, repo etc/s2s.yaml)")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit without loading models")
    p.add_argument("--strict", action="store_true", help="refuse to start when configured weights are absent")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"s2s-speechd: config error: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        return check_config(cfg)
    logging.basicConfig(level=logging.DEBUG if args.verbose else getattr(logging, cfg.logging.level),
                        format=cfg.logging.format)
    from daemon import server  # heavy imports happen in server.run(), not here

    return server.run(cfg, strict=args.strict or cfg.daemon.strict)


if __name__ == "__main__":
    sys.exit(main())
