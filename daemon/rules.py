"""Request rules every part checks the same way: the one owner of each limit and validation
that the bridge, the daemon and the engines share. Import from here; never redefine.

Configurable limits (max sessions, text length, queue sizes) live in `config.LimitsConfig`;
the rules here are fixed by the protocol and the models."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

from daemon.errors import ErrorCode, S2SError

# The languages s2s speaks and recognises, and those a request may ask for ("auto" = detect or,
# for TTS, choose per sentence). The one list: config choices, engines' capabilities and the
# front ends import these.
SPOKEN_LANGUAGES = ("zh", "en")
LANGUAGES = SPOKEN_LANGUAGES + ("auto",)
# Hotwords: at most this many words, each at most this many characters (SeACo biases on short terms).
MAX_HOTWORDS = 100
MAX_HOTWORD_CHARS = 32
# What a client may send before any word is looked at (a hotword list costs the reader only
# this much): at most MAX_HOTWORDS entries, and as many characters in all as MAX_HOTWORDS words
# of the longest length with a separator each.
MAX_HOTWORD_TOTAL_CHARS = MAX_HOTWORDS * (MAX_HOTWORD_CHARS + 1)
# TTS speed factor.
MIN_SPEED, MAX_SPEED = 0.25, 4.0
# Client-chosen ids (session ids, request ids).
MAX_ID_CHARS = 128
# Endpointing's clock (daemon/asr/vad.py): fsmn-vad runs on every VAD_STEP_MS of a session's audio,
# and on every VAD_TAIL_STEP_MS while it counts silence inside an utterance, so a pause and an
# utterance's end are seen up to that much sooner (BENCHMARKS.md "The VAD's tail step"). Front ends
# forward microphone audio to the daemon in pieces of FORWARD_BYTES (PCM16 16 kHz, one tail step):
# larger pieces would hold back the audio the tail step needs.
VAD_STEP_MS = 200
VAD_TAIL_STEP_MS = 100
FORWARD_BYTES = 16000 * 2 * VAD_TAIL_STEP_MS // 1000


def check_language(lang: Any) -> str:
    if lang not in LANGUAGES:
        raise S2SError(f"language {lang!r} is not one of {', '.join(LANGUAGES)}", ErrorCode.BAD_REQUEST)
    return str(lang)


def clean_hotwords(hotwords: Optional[Sequence[str]]) -> List[str]:
    """Validate a hotword list: strings, no URLs or file names (funasr would fetch or read
    those), bounded count and length. Whitespace inside an entry splits it into words;
    repeated words are kept once.

    The cost is bounded before any word is looked at: more than MAX_HOTWORDS entries, or more
    than MAX_HOTWORD_TOTAL_CHARS characters in all, is refused (bad_request) from the sizes
    alone, so a list of any size costs at most O(MAX_HOTWORD_TOTAL_CHARS) here (safe on an
    event loop or a shared worker)."""
    if hotwords is None:
        return []
    if isinstance(hotwords, str):
        hotwords = [hotwords]
    if len(hotwords) > MAX_HOTWORDS:
        raise S2SError(f"{len(hotwords)} hotword entries; at most {MAX_HOTWORDS}", ErrorCode.BAD_REQUEST)
    total = 0
    for hw in hotwords:
        if not isinstance(hw, str):
            raise S2SError(f"hotwords must be strings, got {type(hw).__name__}", ErrorCode.BAD_REQUEST)
        total += len(hw)
    if total > MAX_HOTWORD_TOTAL_CHARS:
        raise S2SError(f"hotwords of {total} characters in all; at most {MAX_HOTWORD_TOTAL_CHARS}",
                       ErrorCode.BAD_REQUEST)
    out: Dict[str, None] = {}  # insertion-ordered set: linear de-duplication
    for hw in hotwords:
        for word in hw.split():
            low = word.lower()
            if low.startswith(("http:", "https:", "ftp:")) or low.endswith(".txt") or "/" in word:
                raise S2SError(f"hotword {word!r} looks like a URL or file name", ErrorCode.BAD_REQUEST)
            if len(word) > MAX_HOTWORD_CHARS:
                raise S2SError(f"hotword {word[:40]!r} is longer than {MAX_HOTWORD_CHARS} characters",
                               ErrorCode.BAD_REQUEST)
            out[word] = None
    if len(out) > MAX_HOTWORDS:
        raise S2SError(f"{len(out)} hotwords; at most {MAX_HOTWORDS}", ErrorCode.BAD_REQUEST)
    return list(out)


def check_speed(speed: Any) -> float:
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not math.isfinite(speed) \
            or not MIN_SPEED <= speed <= MAX_SPEED:
        raise S2SError(f"speed must be a number from {MIN_SPEED} to {MAX_SPEED}, got {speed!r}",
                       code=ErrorCode.BAD_REQUEST)
    return float(speed)
