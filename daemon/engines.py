"""The contract between the daemon and its engines: the Protocols it calls, the events an ASR
session reports, and the records every engine describes itself with. Nothing heavy is imported here.

Concrete engines live in asr/funasr_engine.py, asr/whisper_engine.py, tts/melo_engine.py,
tts/kokoro_engine.py and tts/piper_engine.py; daemon/serving/factory.py picks one from the config,
falling back to the bundled models when the selected engine's weights are absent.

ASR: an `ASRPool` holds the loaded models (once per process) and opens an `ASRSession` per client
session, holding only that session's streaming state; the daemon's serving core
(daemon/asr/sessions.py) keeps the sessions, the pool keeps none. A session's audio goes in as
steps (`feed_steps`): a generator that yields model requests and takes their answers, so the
daemon answers many sessions' requests in one batch through the pool's `run_requests`
(daemon/asr/batch.py). Everything an engine does runs on the pool's device worker (`submit`);
the daemon's socket loop never calls an engine directly.

ASR events (`ASREvent`, a TypedDict per kind; times are seconds from session start,
`utterance` counts from 0) are turned into wire messages in one place,
daemon/asr/sessions.py:event_to_message:

    speech_start  {start, utterance}                     speech began
    partial       {text, start, end, utterance}          the utterance so far (may be dropped)
    tentative     {text, start, end, utterance}          at a pause inside the utterance, for a
                                                         session that asked (set_early_silence)
    resume        {start, utterance}                     speech went on after a tentative
    final         {text, start, end, utterance, reason}  reason: one of FINAL_REASONS

A `TTSEngine` synthesises PCM16 mono at `sample_rate`; `synthesize_stream` yields one chunk per
sentence so the first audio is ready after the first sentence.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Generator, Iterable, Iterator, List, Literal, Mapping,
                    NotRequired, Optional, Protocol, Sequence, Tuple, TypedDict, Union, runtime_checkable)

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



# --- ASR events: what an engine session reports (see the module docstring) ---

FINAL_REASONS = ("vad", "max_length", "finalize", "sentence", "turn")


class SpeechStartEvent(TypedDict):
    type: Literal["speech_start"]
    start: float
    utterance: int


class PartialEvent(TypedDict):
    type: Literal["partial"]
    text: str
    start: float
    end: float
    utterance: int


class TentativeEvent(TypedDict):
    type: Literal["tentative"]
    text: str
    start: float
    end: float
    utterance: int


class ResumeEvent(TypedDict):
    type: Literal["resume"]
    start: float
    utterance: int


class FinalEvent(TypedDict):
    type: Literal["final"]
    text: str
    start: float
    end: float
    utterance: int
    reason: str                   # one of FINAL_REASONS
    language: NotRequired[str]    # Whisper: the language it heard (not on the wire)


ASREvent = Union[SpeechStartEvent, PartialEvent, TentativeEvent, ResumeEvent, FinalEvent]

# A session's work as steps: yields model requests, takes their answers, returns its events.
Steps = Generator[Any, Any, List[ASREvent]]


# --- the Protocols: exactly what the daemon calls ---


@runtime_checkable
class ASRSession(Protocol):
    """One session's streaming state. Every method runs on the pool's worker."""

    def feed_steps(self, pcm: Any) -> Steps:
        """Feed 16 kHz audio (PCM16 bytes, int16 or float32 array) as steps: yields each model
        request, answered by the pool's `run_requests`; returns every new event."""

    def finalize_events(self) -> List[ASREvent]:
        """Flush buffered audio; return every event that produces (ends with a final)."""

    def finalize_steps(self) -> Steps:
        """finalize_events as steps (the daemon finalizes in a worker batch like a feed)."""

    def reset(self) -> None:
        """Forget all streaming state; the next audio starts a new session timeline."""

    def set_early_silence(self, seconds: float) -> None:
        """Report `tentative` after this much silence inside an utterance (and `resume` when
        speech goes on); 0: never."""

    def set_sentence_end(self, on: bool, text_end: Optional[float] = None) -> None:
        """At such a pause after a whole sentence, the final comes at once (reason `sentence`
        or `turn`); `text_end`: turn.judge_text_end, the engine's P(end) that makes it whole."""


@runtime_checkable
class ASRPool(Protocol):
    name: str  # "funasr" | "whisper"
    fallbacks: List[Fallback]  # taken so far; daemon/asr/turn_judge.py adds the judge's
    judge: Any  # daemon.asr.turn_judge.TurnJudge or None: set by its attach() (turn.judge)
    # Set by the daemon (daemon/asr/batch.py): feeds waiting for the worker, so an engine may
    # skip optional work (partials) under load.
    feeds_waiting: Callable[[], int]
    # The worker's cost per stream, measured at load (daemon/asr/calibrate.py; None: not
    # measured), read by the daemon's admission (daemon/asr/capacity.py).
    cost_curve: Optional[Tuple[float, float]]
    decode_cost_curve: Optional[Tuple[float, float]]  # ... its decode thread's, where it has one

    def load(self) -> None: ...

    def open(self, session_id: str, language: Optional[str] = None,
             hotwords: Optional[Sequence[str]] = None, partials: bool = True, *,
             partial_interval: Optional[float] = None,
             max_utterance_seconds: Optional[float] = None) -> ASRSession:
        """A new session (the pool keeps no table of them). Raises UnsupportedError for unusable
        hotwords. partial_interval / max_utterance_seconds: this session's values (None: the
        pool's configured defaults); the daemon passes its live, reloadable config."""

    def run_requests(self, reqs: Sequence[Any]) -> Iterable[Tuple[int, Any]]:
        """Answer many sessions' step requests, batched by kind: (index into reqs, answer or the
        exception that request raised), in any order."""

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run fn on this pool's device worker thread."""

    def offloads(self, req: Any) -> bool:
        """Is this step request answered on the pool's decode thread (`submit_decode`) rather than
        in the worker's batch (daemon/asr/batch.py)?"""

    def submit_decode(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run fn on this pool's decode thread."""

    def gather_wait(self, pending: int) -> float:
        """Seconds the daemon holds the worker's next call, `pending` feeds waiting, for more
        sessions' feeds to answer together (0: start it now)."""

    def info(self) -> EngineInfo:
        """engine, device, dtype, model paths, capabilities, fallbacks taken."""

    def shutdown(self) -> None: ...


@runtime_checkable
class TTSEngine(Protocol):
    name: str  # "melo" | "kokoro" | "piper" | "kokoro+piper"
    sample_rate: int

    def load(self) -> None: ...

    def synthesize_stream(self, text: str, language: str = "zh",
                          speed: Optional[float] = None) -> Iterator[Tuple[int, str, bytes]]:
        """Yield (sentence index, sentence text, PCM16 bytes) per sentence."""

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future: ...

    def info(self) -> EngineInfo: ...

    def shutdown(self) -> None: ...
