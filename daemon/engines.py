"""The contracts every engine keeps, so the daemon can serve any of them.

Nothing heavy is imported here. Concrete engines live in asr_funasr.py, asr_whisper.py,
tts_melo.py and tts_piper.py; `build_asr()` / `build_tts()` pick one from the config,
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
from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, runtime_checkable


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
             hotwords: Optional[Sequence[str]] = None, partials: bool = True) -> ASRSession:
        """Raises BusyError at the session cap, UnsupportedError for unusable hotwords."""

    def get(self, session_id: str) -> Optional[ASRSession]: ...

    def close(self, session_id: str) -> None: ...

    def gc_idle(self, now: Optional[float] = None) -> List[str]:
        """Close sessions idle past the timeout; return their ids."""

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run fn on this pool's device worker thread."""

    def info(self) -> Dict[str, Any]:
        """engine, device, dtype, model dirs, capabilities, sessions, fallbacks taken."""

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

    def info(self) -> Dict[str, Any]: ...

    def shutdown(self) -> None: ...
