"""The contracts every engine keeps, so the daemon can serve any of them.

Nothing heavy is imported here. Concrete engines live in asr/funasr_engine.py, asr/whisper_engine.py,
tts/melo_engine.py, tts/kokoro_engine.py and tts/piper_engine.py; `build_asr()` / `build_tts()` pick one from the config,
falling back to the bundled models when the selected engine's weights are absent.

ASR events (plain dicts with a ``type`` key; times are seconds from session start):

    {"type": "speech_start", "start": 1.23, "utterance": 0}
    {"type": "partial", "text": "...", "start": 1.23, "end": 2.40, "utterance": 0}
    {"type": "final", "text": "...", "start": 1.23, "end": 3.10, "utterance": 0,
     "reason": "vad" | "max_length" | "finalize"}

An ASR *pool* holds the loaded models (once per process) and hands out per-session
*engines* (FunASREngine / WhisperEngine) holding only that session's streaming state.
Engine methods are synchronous and run on the pool's device worker (`pool.submit`);
the daemon's socket loop never calls them directly.

A TTS engine synthesises PCM16 mono at `sample_rate` (24000); `synthesize_stream`
yields one chunk per sentence so the first audio is ready after the first sentence.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

# --- records every engine reports (one schema, shown whole by describe / s2s-ctl / the bridge) ---

# Where a fallback happened: which part of which engine moved.
FALLBACK_COMPONENTS = ("asr.engine", "asr.device", "tts.engine", "tts.device", "tts.voice", "turn.judge")
# When: choosing engines at startup, loading a model, or recovering during inference.
FALLBACK_WHEN = ("startup", "load", "recognition", "synthesis")
FALLBACK_REASON_CHARS = 300
Scalar = Union[str, int, float, bool, None]


class SchemaError(ValueError):
    """A record read back from the wire does not have the shape this module defines."""


def _want(d: Mapping[str, Any], key: str, kind: Any, where: str) -> Any:
    if key not in d:
        raise SchemaError(f"{where}: missing {key!r}")
    v = d[key]
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
        raise SchemaError(f"{where}: {key!r} must be {getattr(kind, '__name__', kind)}, got {type(v).__name__}")
    return v


@dataclass(frozen=True)
class Fallback:
    """One fallback taken: `component` moved `from_` -> `to` because of `reason`, at `when`.

    The only shape a fallback has anywhere (engines, factory, describe, s2s-ctl, /healthz, page).
    On the wire it is ``{"component", "from", "to", "reason", "when", "time"}``."""

    component: str
    from_: str
    to: str
    reason: str
    when: str = "load"
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.component not in FALLBACK_COMPONENTS:
            raise SchemaError(f"fallback component {self.component!r} not in {FALLBACK_COMPONENTS}")
        if self.when not in FALLBACK_WHEN:
            raise SchemaError(f"fallback when {self.when!r} not in {FALLBACK_WHEN}")
        for name in ("from_", "to", "reason"):
            if not isinstance(getattr(self, name), str):
                raise SchemaError(f"fallback {name} must be str")
        reason = " ".join(self.reason.split())[:FALLBACK_REASON_CHARS]
        object.__setattr__(self, "reason", reason)

    def line(self) -> str:
        return f"{self.component}: {self.from_} -> {self.to} ({self.when}): {self.reason}"

    def key(self) -> Tuple[str, str, str, str]:
        return (self.component, self.from_, self.to, self.when)

    def to_dict(self) -> Dict[str, Any]:
        return {"component": self.component, "from": self.from_, "to": self.to, "reason": self.reason,
                "when": self.when, "time": round(self.time, 3)}

    @classmethod
    def from_dict(cls, d: Any) -> "Fallback":
        if not isinstance(d, Mapping):
            raise SchemaError(f"fallback must be an object, got {type(d).__name__}")
        extra = set(d) - {"component", "from", "to", "reason", "when", "time"}
        if extra:
            raise SchemaError(f"fallback: unknown keys {sorted(extra)}")
        w = "fallback"
        return cls(_want(d, "component", str, w), _want(d, "from", str, w), _want(d, "to", str, w),
                   _want(d, "reason", str, w), _want(d, "when", str, w), _want(d, "time", float, w))


@dataclass(frozen=True)
class Capabilities:
    partials: bool = False      # ASR: streaming partial transcripts
    hotwords: bool = False      # ASR: per-session hotword biasing
    punctuation: bool = False   # ASR: finals carry punctuation
    streaming: bool = False     # TTS: sentence-by-sentence audio
    languages: Tuple[str, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        return {"partials": self.partials, "hotwords": self.hotwords, "punctuation": self.punctuation,
                "streaming": self.streaming, "languages": list(self.languages)}

    @classmethod
    def from_dict(cls, d: Any) -> "Capabilities":
        if not isinstance(d, Mapping):
            raise SchemaError("capabilities must be an object")
        w = "capabilities"
        langs = _want(d, "languages", list, w)
        if not all(isinstance(x, str) for x in langs):
            raise SchemaError("capabilities: languages must be strings")
        return cls(_want(d, "partials", bool, w), _want(d, "hotwords", bool, w), _want(d, "punctuation", bool, w),
                   _want(d, "streaming", bool, w), tuple(langs))


@dataclass(frozen=True)
class EngineInfo:
    """What an engine (ASR pool or TTS engine) says about itself: one schema for every engine.

    `models` maps a role ("paraformer", "vad", "voice", ...) to the local path loaded for it;
    `details` holds engine-specific scalars (model class, voice, compute type, ...)."""

    kind: str                   # "asr" | "tts"
    engine: str                 # "funasr" | "whisper" | "melo" | "piper" | "kokoro" | "fake"
    device: str                 # where it runs now
    requested_device: str       # what the config asked for
    dtype: str
    sample_rate: int            # ASR: input rate; TTS: output rate
    capabilities: Capabilities
    loaded: bool
    models: Mapping[str, str] = field(default_factory=dict)
    sessions: int = 0
    max_sessions: int = 0
    fallbacks: Tuple[Fallback, ...] = ()
    notes: Tuple[str, ...] = ()
    details: Mapping[str, Scalar] = field(default_factory=dict)
    fake: bool = False          # a test double, never in production

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "engine": self.engine, "device": self.device,
                "requested_device": self.requested_device, "dtype": self.dtype, "sample_rate": self.sample_rate,
                "capabilities": self.capabilities.to_dict(), "loaded": self.loaded,
                "models": {k: str(v) for k, v in self.models.items()}, "sessions": self.sessions,
                "max_sessions": self.max_sessions, "fallbacks": [f.to_dict() for f in self.fallbacks],
                "notes": list(self.notes), "details": dict(self.details), "fake": self.fake}

    @classmethod
    def from_dict(cls, d: Any) -> "EngineInfo":
        if not isinstance(d, Mapping):
            raise SchemaError(f"engine info must be an object, got {type(d).__name__}")
        w = f"engine info ({d.get('engine', '?')})"
        extra = set(d) - {"kind", "engine", "device", "requested_device", "dtype", "sample_rate", "capabilities",
                          "loaded", "models", "sessions", "max_sessions", "fallbacks", "notes", "details", "fake"}
        if extra:
            raise SchemaError(f"{w}: unknown keys {sorted(extra)}")
        models = _want(d, "models", dict, w)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in models.items()):
            raise SchemaError(f"{w}: models must map str -> str")
        details = _want(d, "details", dict, w)
        for k, v in details.items():
            if v is not None and not isinstance(v, (str, int, float, bool)):
                raise SchemaError(f"{w}: details[{k!r}] must be a scalar, got {type(v).__name__}")
        notes = _want(d, "notes", list, w)
        if not all(isinstance(n, str) for n in notes):
            raise SchemaError(f"{w}: notes must be strings")
        return cls(_want(d, "kind", str, w), _want(d, "engine", str, w), _want(d, "device", str, w),
                   _want(d, "requested_device", str, w), _want(d, "dtype", str, w), _want(d, "sample_rate", int, w),
                   Capabilities.from_dict(_want(d, "capabilities", dict, w)), _want(d, "loaded", bool, w),
                   models, _want(d, "sessions", int, w), _want(d, "max_sessions", int, w),
                   tuple(Fallback.from_dict(f) for f in _want(d, "fallbacks", list, w)), tuple(notes), details,
                   _want(d, "fake", bool, w))


def merge_fallbacks(*groups: Sequence[Fallback]) -> List[Fallback]:
    """Every fallback once (same component, from, to, when), in the order first seen."""
    seen: Dict[Tuple[str, str, str, str], Fallback] = {}
    for g in groups:
        for f in g:
            seen.setdefault(f.key(), f)
    return list(seen.values())



@runtime_checkable
class ASRSession(Protocol):
    session_id: str

    def feed(self, pcm: Any) -> List[Dict[str, Any]]:
        """Feed 16 kHz audio (PCM16 bytes, int16 or float32 array); return all new events."""

    def feed_audio(self, pcm: Any) -> Optional[Dict[str, Any]]:
        """Seed interface: like feed(), returning one event or None (extra events queue
        up and are returned by the next calls; nothing is dropped)."""

    def finalize(self) -> Dict[str, Any]:
        """Flush buffered audio; return the last final event (text may be empty)."""

    def finalize_events(self) -> List[Dict[str, Any]]:
        """Flush buffered audio; return every event that produces (ends with a final)."""

    def reset(self) -> None:
        """Forget all streaming state; the next audio starts a new session timeline."""

    def set_language(self, lang: str) -> None:
        """"zh", "en" or "auto"."""

    def set_hotwords(self, hotwords: Sequence[str]) -> None:
        """Raise UnsupportedError when the model cannot use hotwords."""


@runtime_checkable
class ASRPool(Protocol):
    name: str  # "funasr" | "whisper"

    def load(self) -> None: ...

    def open(self, session_id: str, language: Optional[str] = None,
             hotwords: Optional[Sequence[str]] = None, partials: bool = True, *,
             partial_interval: Optional[float] = None,
             max_utterance_seconds: Optional[float] = None) -> ASRSession:
        """Raises UnsupportedError for unusable hotwords. No session cap: the daemon admits.
        partial_interval / max_utterance_seconds: this session's values (None: the pool's
        configured defaults); the daemon passes its live, reloadable config."""

    def get(self, session_id: str) -> Optional[ASRSession]: ...

    def close(self, session_id: str) -> None: ...

    def gc_idle(self, now: Optional[float] = None) -> List[str]:
        """Close sessions idle past the timeout; return their ids."""

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run fn on this pool's device worker thread."""

    def info(self) -> EngineInfo:
        """engine, device, dtype, model paths, capabilities, sessions, fallbacks taken."""

    def shutdown(self) -> None: ...


@runtime_checkable
class TTSEngine(Protocol):
    name: str  # "melo" | "piper"
    sample_rate: int

    def load(self) -> None: ...

    def synthesize(self, text: str, language: str = "zh", speed: Optional[float] = None) -> bytes: ...

    def synthesize_stream(self, text: str, language: str = "zh",
                          speed: Optional[float] = None) -> Iterator[Tuple[int, str, bytes]]:
        """Yield (sentence index, sentence text, PCM16 bytes) per sentence."""

    async def synthesize_async(self, text: str, language: str = "zh", speed: Optional[float] = None) -> bytes: ...

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future: ...

    def info(self) -> EngineInfo: ...

    def shutdown(self) -> None: ...
