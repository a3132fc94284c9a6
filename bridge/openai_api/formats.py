"""What the OpenAI audio API returns, apart from the serving: transcripts in each
`response_format`, and speech encoded in each audio format as it is synthesized.

Encoding (PyAV, the FFmpeg binding faster-whisper already installs) writes each container to a
sink that is not seekable, so the muxer streams: what it has written after a chunk can be sent
at once. WAV streams with the sizes left at their maximum (0xFFFFFFFF), as streaming servers do;
readers take the data to the end of the stream. FLAC is the exception (`WHOLE`): its header
holds the sample count, written when the stream ends, and readers such as libsndfile refuse a
FLAC stream without it; it is sent once synthesis is done.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any, Dict, List, Optional

import numpy as np

from bridge.speech import TranscriptResult

TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
# response_format -> (FFmpeg muxer, codec, Content-Type); wav and pcm are written here.
AUDIO_FORMATS: Dict[str, Optional[tuple]] = {
    "mp3": ("mp3", "libmp3lame", "audio/mpeg"),
    "opus": ("ogg", "libopus", "audio/ogg"),
    "aac": ("adts", "aac", "audio/aac"),
    "flac": ("flac", "flac", "audio/flac"),
    "wav": None,
    "pcm": None,
}
# Formats sent whole, after the last chunk (see the module docstring).
WHOLE = ("flac",)
# Whisper's language names (OpenAI's verbose_json says "chinese", not "zh").
LANGUAGE_NAMES = {"zh": "chinese", "en": "english"}


# --- transcripts ------------------------------------------------------------------------------


def _clock(t: float, sep: str) -> str:
    ms = int(round(max(0.0, t) * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def segments(r: TranscriptResult) -> List[Dict[str, Any]]:
    """The finals as OpenAI's verbose_json segments (no token-level fields: zeros)."""
    return [{"id": i, "seek": 0, "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text, "tokens": [],
             "temperature": 0.0, "avg_logprob": 0.0, "compression_ratio": 0.0, "no_speech_prob": 0.0}
            for i, s in enumerate(r.segments)]


def transcript_body(r: TranscriptResult, fmt: str, language: Optional[str]) -> tuple:
    """(body, content type) for a response_format (one of TRANSCRIPT_FORMATS)."""
    usage = {"type": "duration", "seconds": round(r.duration, 3)}
    if fmt == "json":
        return json.dumps({"text": r.text, "usage": usage}, ensure_ascii=False), "application/json"
    if fmt == "verbose_json":
        return json.dumps({"task": "transcribe", "language": LANGUAGE_NAMES.get(language or "", language or "unknown"),
                           "duration": round(r.duration, 3), "text": r.text, "segments": segments(r),
                           "usage": usage}, ensure_ascii=False), "application/json"
    if fmt == "srt":
        return "".join(f"{i + 1}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text}\n\n"
                       for i, s in enumerate(r.segments)), "text/plain; charset=utf-8"
    if fmt == "vtt":
        return "WEBVTT\n\n" + "".join(f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text}\n\n"
                                      for s in r.segments), "text/vtt; charset=utf-8"
    return r.text + "\n", "text/plain; charset=utf-8"


# --- audio ------------------------------------------------------------------------------------


def content_type(fmt: str) -> str:
    spec = AUDIO_FORMATS[fmt]
    return spec[2] if spec else ("audio/wav" if fmt == "wav" else "audio/pcm")


def wav_header(rate: int, size: int = 0xFFFFFFFF) -> bytes:
    """A PCM16 mono WAV header; the default sizes say "to the end of the stream"."""
    data = min(size, 0xFFFFFFFF - 36)
    return (b"RIFF" + struct.pack("<I", data + 36) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", data))


class _Sink:
    """Where a muxer writes; no seek(), so it streams."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, b: Any) -> int:
        self.buf += bytes(b)
        return len(b)

    def take(self) -> bytes:
        out, self.buf = bytes(self.buf), bytearray()
        return out


class Encoder:
    """PCM16 mono at `rate` -> `fmt` bytes, chunk by chunk (blocking: run off the event loop)."""

    def __init__(self, fmt: str, rate: int):
        self.fmt = fmt
        self.rate = rate
        self.started = False
        self._container: Any = None
        self._stream: Any = None
        self._sink = _Sink()
        self._whole = io.BytesIO() if fmt in WHOLE else None
        spec = AUDIO_FORMATS[fmt]
        if spec is not None:
            import av

            muxer, codec, _ = spec
            self._container = av.open(self._whole if self._whole is not None else self._sink, mode="w", format=muxer)
            self._stream = self._container.add_stream(codec, rate=rate)
            self._stream.layout = "mono"

    def encode(self, pcm: bytes) -> bytes:
        head = b""
        if not self.started:
            self.started = True
            head = wav_header(self.rate) if self.fmt == "wav" else b""
        if self._container is None:
            return head + pcm
        import av

        x = np.frombuffer(pcm[:len(pcm) - len(pcm) % 2], dtype="<i2").reshape(1, -1)
        if x.size:
            frame = av.AudioFrame.from_ndarray(x, format="s16", layout="mono")
            frame.sample_rate = self.rate
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        """The rest (encoder delay, container trailer); the encoder is closed afterwards."""
        head = self.encode(b"") if not self.started else b""
        if self._container is None:
            return head
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._container = None
        return head + (self._whole.getvalue() if self._whole is not None else self._sink.take())

    def close(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # a muxer that never got a packet may complain on close
                pass
            self._container = None
