"""SIGHUP: re-read the config, apply what can change live, say exactly what changed.

Live values are read by the daemon per request and handed to the engines per call (a new
session's `partial_interval`, `max_utterance_seconds` and default hotwords, a request's
default speed), and no engine keeps a copy of a limit, so what is reported applied is
applied. Everything else is reported as needing a restart and left as it was.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, List, Optional, Tuple

from daemon.config import Config, ConfigError, load_config

logger = logging.getLogger(__name__)

# Keys (or key prefixes) applied without a restart, and where they take effect.
LIVE = (("limits.", "new requests"), ("logging.", "now"), ("asr.hotwords", "new sessions"),
        ("asr.partial_interval", "new sessions"), ("tts.speed", "new requests"), ("daemon.drain_timeout", "now"),
        ("turn.early_silence", "new sessions"), ("turn.sentence_end", "new sessions"))


def _fmt(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(map(str, v)) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


def changes(old: Config, new: Config) -> Tuple[List[str], List[str]]:
    """(applied: "key old -> new", needing a restart: "key") between two configs."""
    applied: List[str] = []
    restart: List[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if dataclasses.is_dataclass(a) and not isinstance(a, type):
            for f in dataclasses.fields(a):
                if f.name not in ("source", "overrides"):
                    walk(getattr(a, f.name), getattr(b, f.name), f"{prefix}{f.name}.")
        elif a != b:
            key = prefix[:-1]
            if any(key.startswith(p) for p, _ in LIVE):
                applied.append(f"{key} {_fmt(a)} -> {_fmt(b)}")
            else:
                restart.append(key)

    walk(old, new, "")
    return applied, restart


def merge(old: Config, new: Config) -> Config:
    """`old` with the live values of `new`."""
    return dataclasses.replace(
        old, limits=new.limits, logging=new.logging,
        asr=dataclasses.replace(old.asr, hotwords=new.asr.hotwords, partial_interval=new.asr.partial_interval),
        tts=dataclasses.replace(old.tts, speed=new.tts.speed),
        turn=dataclasses.replace(old.turn, early_silence=new.turn.early_silence, sentence_end=new.turn.sentence_end),
        daemon=dataclasses.replace(old.daemon, drain_timeout=new.daemon.drain_timeout))


def reload(old: Config) -> Tuple[Optional[Config], str]:
    """(the config to run with, or None when the file is bad; one line for the log and STATUS)."""
    try:
        new = load_config(old.source if old.source != "<defaults>" else None)
    except ConfigError as e:
        return None, f"reload failed, config unchanged: {e}"
    applied, restart = changes(old, new)
    cfg = merge(old, new)
    if new.logging != old.logging:
        root = logging.getLogger()
        root.setLevel(getattr(logging, new.logging.level))
        for h in root.handlers:
            h.setFormatter(logging.Formatter(new.logging.format))
    line = f"reloaded {old.source}: applied {', '.join(applied) or 'nothing'}"
    if restart:
        line += f"; needs a restart (unchanged): {', '.join(restart)}"
    return cfg, line
