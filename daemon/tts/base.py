"""`SentenceTTS`: what every TTS engine (MeloTTS, Piper, Kokoro) shares: its load-time settings
(`TTSSettings`, the base of each engine's config), text validation and sentence splitting, one device worker thread, sentence-by-sentence streaming, the CUDA ->
fallback_device retry, silence trim, resampling to the output rate, and engine info.
Subclasses implement `_load_model(device)`, `_calls(sentence, language, speed)` and
`_synth_float(call, language, speed)`.

**What one engine call is given is bounded**, after normalisation: a sentence's limit is counted
in characters before number spelling (777777 is 70 phonemes) and `speed` stretches the audio up
to 4x, so each engine cuts a sentence's normalised text (or phonemes) into calls of at most
`call_budget(speed)` units: MAX_CALL_AUDIO_SECONDS of predicted audio (units / UNITS_PER_SECOND
/ speed) and at most MAX_CALL_UNITS. A 56-character request had been one 50 s, 8 GB call (at
speed 0.25 it took the daemon to 22 GB). After a call of more than LARGE_CALL_AUDIO_SECONDS the
memory it took is handed back (`release_memory`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type

import numpy as np

from daemon import audio
from daemon import devices
from daemon.tts import textsplit
from daemon.config import Config, TTSConfig
from daemon.engines import Capabilities, EngineInfo, Fallback
from daemon.rules import LANGUAGES, check_speed
from daemon.errors import ErrorCode, S2SError, TextError, UnsupportedError

logger = logging.getLogger(__name__)

# Predicted audio of one engine call at most (seconds, speed included): the worker's "sentence"
# budget is 3 watchdog periods (45 s with WatchdogSec=30) and an engine's memory grows with it.
MAX_CALL_AUDIO_SECONDS = 20.0
# After a call of more audio than this the memory it took is handed back.
LARGE_CALL_AUDIO_SECONDS = 8.0
# No call budget below this many units (a long word is cut, never a phoneme).
MIN_CALL_UNITS = 16

_libc: Optional[ctypes.CDLL] = None


def release_memory() -> None:
    """Hand freed memory back to the system: glibc's malloc_trim(0) (the heap keeps what a large
    call freed otherwise); a no-op without glibc. No gc.collect(): the audio arrays are freed by
    reference counting, and a full collection of the daemon's ~360,000 objects holds the GIL,
    so the event loop, for 0.4-0.6 s. ctypes releases the GIL for the trim."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def pack(pieces: List[str], cost: Callable[[str], int], budget: int, sep: str = " ") -> List[str]:
    """Join pieces (words) greedily into calls of at most `budget` cost; a piece over the budget
    alone is halved until it fits (or is one character)."""
    out: List[str] = []
    cur, cur_cost = "", 0
    stack = list(reversed(pieces))
    while stack:
        piece = stack.pop()
        c = cost(piece)
        if c > budget and len(piece) > 1:
            half = len(piece) // 2
            stack += [piece[half:], piece[:half]]
            continue
        if cur and cur_cost + c > budget:
            out.append(cur)
            cur, cur_cost = "", 0
        cur = f"{cur}{sep}{piece}" if cur else piece
        cur_cost += c
    if cur:
        out.append(cur)
    return out


# Silence kept at each end of a sentence's audio.
MAX_EDGE_SILENCE_S = 0.1
# Anything below this fraction of the peak (-40 dB) counts as silence when trimming.
SILENCE_REL = 0.01


def trim_silence(x: np.ndarray, sr: int, keep_s: float = MAX_EDGE_SILENCE_S) -> np.ndarray:
    """Cut leading/trailing silence down to at most keep_s seconds each side."""
    if x.size == 0:
        return x
    mag = np.abs(x)
    peak = float(mag.max())
    if peak <= 1e-4:
        return x[: int(keep_s * sr)]  # all silence: a short gap, not seconds of nothing
    loud = np.flatnonzero(mag > peak * SILENCE_REL)
    keep = int(keep_s * sr)
    start = max(0, int(loud[0]) - keep)
    end = min(x.size, int(loud[-1]) + 1 + keep)
    return x[start:end]


@dataclass(frozen=True, kw_only=True)
class TTSSettings:
    """What every TTS engine is built with, taken from the config's `tts` section at load: the base
    of each engine's config (MeloConfig, PiperConfig, KokoroConfig add their models). Nothing
    reloadable: a request's text limit (limits.max_text_chars) and default speed (tts.speed) are
    the daemon's, checked and resolved per request (daemon/tts/jobs.py)."""

    device: str = "cpu"
    fallback_device: str = "cpu"
    sample_rate: int = TTSConfig.sample_rate
    max_sentence_chars: int = textsplit.DEFAULT_MAX_CHARS

    @staticmethod
    def of(cfg: Config) -> Dict[str, Any]:
        """These settings' values in a daemon.config.Config (for an engine config's from_config)."""
        t = cfg.tts
        return {"device": t.device, "fallback_device": t.fallback_device, "sample_rate": t.sample_rate}

    @classmethod
    def from_config(cls, cfg: Config) -> "TTSSettings":
        """From a daemon.config.Config (an engine's config adds its models)."""
        return cls(**cls.of(cfg))


def _normalise_language(language: Optional[str]) -> str:
    lang = (language or "zh").strip().lower().replace("_", "-").split("-")[0]
    if lang not in LANGUAGES:
        raise UnsupportedError(f"language {language!r} is not supported (use {', '.join(LANGUAGES)})")
    return lang


class SentenceTTS:
    """Shared engine machinery. Subclasses implement `_load_model(device)` and
    `_synth_float(call, language, speed) -> (float32 audio, sample_rate)` for one item of
    `_calls(sentence, language, speed)` (default: the normalised text, cut to the call budget),
    and may override `_prepare(text, language)` and `_speakable(text)`."""

    name = "base"
    Settings: Type[TTSSettings] = TTSSettings  # the engine's config class
    # Units (phonemes, tokens or characters, the engine's `_calls` says) per second of audio at
    # speed 1: a low estimate, so that the predicted audio is never short of the real one.
    UNITS_PER_SECOND = 15.0
    MAX_CALL_UNITS = 400

    def __init__(self, settings: Any):
        """settings: the engine's config (`Settings`) or a daemon.config.Config it is made from."""
        if not isinstance(settings, self.Settings):
            settings = self.Settings.from_config(settings)
        self.config = settings
        self.sample_rate = int(settings.sample_rate)
        self.max_sentence_chars = int(settings.max_sentence_chars)
        self.requested_device = settings.device
        self.fallback_device = settings.fallback_device
        self.device = "cpu"
        self.fallbacks: List[Fallback] = []
        self.loaded = False
        self.load_seconds = 0.0
        self.sentences_synthesized = 0
        self._worker_ident: Optional[int] = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"tts-{self.name}", initializer=self._mark_worker)
        self._load_lock = threading.Lock()

    # --- worker -----------------------------------------------------------------

    def _mark_worker(self) -> None:
        self._worker_ident = threading.get_ident()

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run fn on this engine's single device worker thread."""
        return self._executor.submit(fn, *args, **kwargs)

    def _on_worker(self, fn: Any, *args: Any) -> Any:
        # Already on the worker (a caller used submit(engine.synthesize, ...)): run inline,
        # waiting on our own single thread would deadlock.
        if threading.get_ident() == self._worker_ident:
            return fn(*args)
        return self.submit(fn, *args).result()

    # --- lifecycle ----------------------------------------------------------------

    def load(self) -> None:
        """Load the model on the configured device (on the worker thread); a CUDA failure
        moves to fallback_device once. Idempotent."""
        with self._load_lock:
            if not self.loaded:
                self._on_worker(self._load)

    def _load(self) -> None:
        t0 = time.monotonic()
        self.device = devices.load_with_fallback(
            self.requested_device, "float32", f"tts.{self.name}", lambda device, _dtype: self._load_model(device),
            lambda src, dst, why: self._record_fallback(src, dst, why, "load"), to=self.fallback_device,
            any_error=True).device
        self.loaded = True
        self.load_seconds = time.monotonic() - t0
        logger.info("tts.%s: loaded on %s in %.1f s", self.name, self.device, self.load_seconds)

    def _record_fallback(self, src: str, dst: str, reason: str, when: str) -> None:
        self.fallbacks.append(Fallback("tts.device", src, dst, reason, when))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    # --- text ------------------------------------------------------------------------

    def _speakable(self, text: str) -> bool:
        return textsplit.is_speakable(text)

    def _prepare(self, text: str, language: str) -> str:
        return text

    def sentences(self, text: str, language: str = "zh") -> List[str]:
        """Validate text and split it into the sentences that will be synthesised.

        Raises TextError (bad_text) for non-text, empty or unspeakable input. Sentences with
        nothing speakable are skipped when others remain. How long a request's text may be is
        the daemon's rule (limits.max_text_chars, reloadable), checked before the engine is asked.
        """
        if not isinstance(text, str):
            raise TextError(f"text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise TextError("text is empty")
        pieces = textsplit.split_sentences(text, self.max_sentence_chars)
        out = [s for s in pieces if self._speakable(self._prepare(s, language))]
        if not out:
            raise TextError(f"nothing speakable in the text ({text[:40]!r}): only punctuation, "
                            f"symbols or characters this voice cannot pronounce")
        if len(out) < len(pieces):
            logger.info("tts.%s: skipped %d unspeakable sentence(s)", self.name, len(pieces) - len(out))
        return out

    def _check_speed(self, speed: Optional[float]) -> float:
        """A call's speed; None: the voice's own (1.0). The daemon passes tts.speed, live."""
        return check_speed(1.0 if speed is None else speed)

    def call_budget(self, speed: float) -> int:
        """Units one engine call may be given at `speed` (MAX_CALL_AUDIO_SECONDS of audio)."""
        predicted = int(MAX_CALL_AUDIO_SECONDS * self.UNITS_PER_SECOND * speed)
        return max(MIN_CALL_UNITS, min(self.MAX_CALL_UNITS, predicted))

    def _calls(self, sentence: str, language: str, speed: float) -> List[Any]:
        """One sentence as the engine calls that speak it, each within `call_budget(speed)`.
        The default: normalised text, cut at commas, spaces or between CJK characters."""
        text = self._prepare(sentence, language)
        budget = self.call_budget(speed)
        if len(text) <= budget:
            return [text]
        return [p for p in textsplit.split_sentences(text, max(budget, textsplit.MIN_CLAUSE_CHARS * 2))
                if self._speakable(p)]

    # --- synthesis -------------------------------------------------------------------

    def synthesize_stream(self, text: str, language: str = "zh",
                          speed: Optional[float] = None) -> Iterator[Tuple[int, str, bytes]]:
        """Yield (index, sentence, PCM16 bytes) per sentence; each sentence is synthesised
        only when the consumer asks for it, so the first chunk is ready after one sentence."""
        if not self.loaded:
            raise S2SError(f"tts.{self.name} is not loaded", code=ErrorCode.UNAVAILABLE)
        lang = _normalise_language(language)
        spd = self._check_speed(speed)
        for i, sentence in enumerate(self.sentences(text, lang)):
            # A sentence the engine cannot take in one call is several chunks, each its own call
            # (the daemon makes each `next` one worker step): same index, same sentence text.
            for call in self._on_worker(self._calls, sentence, lang, spd):
                yield i, sentence, self._on_worker(self._synth_pcm, call, lang, spd)

    def synthesize(self, text: str, language: str = "zh", speed: Optional[float] = None) -> bytes:
        """The whole text as one PCM16 buffer (the concatenation of the stream's chunks)."""
        return b"".join(chunk for _, _, chunk in self.synthesize_stream(text, language, speed))

    async def synthesize_async(self, text: str, language: str = "zh", speed: Optional[float] = None) -> bytes:
        return await asyncio.wrap_future(self.submit(self.synthesize, text, language, speed))

    def _synth_pcm(self, call: Any, language: str, speed: float) -> bytes:
        """On the worker: one call (from `_calls`) -> trimmed, resampled, peak-safe PCM16."""
        def move() -> None:
            self._move_to(self.fallback_device)
            self.device = self.fallback_device

        x, sr = devices.run_with_fallback(
            lambda: self._synth_float(call, language, speed), f"tts.{self.name}", "synthesis", self.device,
            self.fallback_device, move, lambda why: self._record_fallback(self.device, self.fallback_device, why,
                                                                          "synthesis"),
            passthrough=(S2SError, MemoryError))
        x = np.nan_to_num(np.asarray(x, dtype=np.float32).reshape(-1))
        large = x.size > LARGE_CALL_AUDIO_SECONDS * sr
        x = trim_silence(x, sr)
        x = audio.resample(x, sr, self.sample_rate)
        self.sentences_synthesized += 1
        pcm = audio.float_to_pcm16(audio.below_full_scale(x))
        if large:
            del x
            release_memory()
        return pcm

    # --- subclass hooks ----------------------------------------------------------------

    def _load_model(self, device: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _synth_float(self, call: Any, language: str, speed: float) -> Tuple[np.ndarray, int]:  # pragma: no cover
        raise NotImplementedError

    def _move_to(self, device: str) -> None:
        self._load_model(device)

    def languages(self) -> Tuple[str, ...]:
        return LANGUAGES

    def _info(self, models: Dict[str, str], **details: Any) -> EngineInfo:
        return EngineInfo(
            kind="tts", engine=self.name, device=self.device, requested_device=self.requested_device,
            dtype="float32", sample_rate=self.sample_rate,
            capabilities=Capabilities(streaming=True, languages=self.languages()), loaded=self.loaded,
            models=models, fallbacks=tuple(self.fallbacks),
            details={"fallback_device": self.fallback_device, "load_seconds": round(self.load_seconds, 3),
                     "sentences_synthesized": self.sentences_synthesized, **details})
