"""PCM helpers shared by engines, daemon and bridge: validation, conversion, resampling, and
reading audio files of any common format (`read_audio`: PCM16 WAV with the stdlib, the rest
with PyAV, installed with faster-whisper)."""

from __future__ import annotations

import logging
from typing import Any, Iterator, Optional, Union

import numpy as np

from daemon.errors import AudioError

logger = logging.getLogger(__name__)

PCMInput = Union[bytes, bytearray, memoryview, np.ndarray]


def to_float32(pcm: PCMInput) -> np.ndarray:
    """PCM16 little-endian bytes, an int16 array or a float array in [-1, 1] -> float32 mono.

    Raises AudioError (code bad_audio) for odd-length byte buffers, non-finite floats,
    multi-dimensional arrays and unsupported dtypes. Empty input gives an empty array.
    """
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        buf = bytes(pcm)
        if len(buf) % 2:
            raise AudioError(f"PCM16 audio must have an even number of bytes, got {len(buf)}")
        return np.frombuffer(buf, dtype="<i2").astype(np.float32) / 32768.0
    if not isinstance(pcm, np.ndarray):
        raise AudioError(f"audio must be bytes or a numpy array, got {type(pcm).__name__}")
    if pcm.ndim != 1:
        if pcm.ndim == 2 and 1 in pcm.shape:
            pcm = pcm.reshape(-1)
        else:
            raise AudioError(f"audio must be mono (1-D), got shape {pcm.shape}")
    if pcm.dtype == np.int16:
        return pcm.astype(np.float32) / 32768.0
    if pcm.dtype.kind == "f":
        x = pcm.astype(np.float32, copy=False)
        if x.size and not np.isfinite(x).all():
            raise AudioError("audio contains NaN or infinite samples")
        return x
    raise AudioError(f"unsupported audio dtype {pcm.dtype} (use int16 PCM or float32)")


def float_to_pcm16(x: np.ndarray) -> bytes:
    """float audio -> PCM16 LE bytes, the exact inverse of `to_float32` (x 32768, rounded), so
    PCM16 read as float and written back is the same bytes. NaN becomes 0; audio that would clip
    (a peak above full scale, as a synthesiser may produce) is scaled down as a whole instead."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > 1.0:
        x = x * (32767.0 / 32768.0 / peak)
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype("<i2").tobytes()


# Synthesised speech peaks at most here: resampling and a listener's own gain then never clip it.
TTS_PEAK = 0.999


def below_full_scale(x: np.ndarray, peak: float = TTS_PEAK) -> np.ndarray:
    """x scaled down as a whole when its peak is above `peak` (synthesised speech: never clipped)."""
    top = float(np.max(np.abs(x))) if x.size else 0.0
    return x * np.float32(peak / top) if top > peak and np.isfinite(top) else x


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling (soxr, high quality)."""
    if sr_in == sr_out or x.size == 0:
        return np.asarray(x, dtype=np.float32)
    import soxr

    return soxr.resample(np.asarray(x, dtype=np.float32), sr_in, sr_out, quality="HQ").astype(np.float32)


def read_wav(path: str) -> "tuple[np.ndarray, int]":
    """Read a WAV file as float32 mono and its sample rate (stdlib wave for PCM16)."""
    import wave

    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise AudioError(f"{path}: only PCM16 WAV is supported (sample width {w.getsampwidth()})")
        frames = w.readframes(w.getnframes())
        sr, ch = w.getframerate(), w.getnchannels()
    x = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    if ch > 1:
        x = x.reshape(-1, ch).mean(axis=1)
    return x, sr


def read_audio(path: str, rate: int) -> np.ndarray:
    """Any common audio file (WAV, MP3, OGG, FLAC, Opus, M4A, ...) as float32 mono at `rate`.

    Raises AudioError whose message names the file and the problem in one line: a directory, a
    missing or unreadable file, a file that is not audio or is damaged, no audio in it."""
    import wave
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    if not p.exists():
        raise AudioError(f"{path}: no such file")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        raise AudioError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        x, sr = read_wav(path)
    except (wave.Error, EOFError, AudioError, ValueError):
        x, sr = _decode(path, rate), rate  # not PCM16 WAV: let FFmpeg read it
    if x.size == 0:
        raise AudioError(f"{path}: no audio in the file")
    return resample(x, sr, rate)


def _decode(path: str, rate: int) -> np.ndarray:
    """PyAV (FFmpeg): the first audio stream, resampled to float mono at `rate`."""
    try:
        import av
    except ImportError:
        raise AudioError(f"{path}: not a PCM16 WAV file, and PyAV (pip install av) is not installed to read "
                         f"other formats") from None
    chunks: "list[np.ndarray]" = []
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise AudioError(f"{path}: no audio stream in the file ({container.format.name})")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except av.error.FFmpegError as e:
        done = sum(len(c) for c in chunks) / rate
        where = f" after {done:.1f} s" if chunks else ""
        why = getattr(e, "strerror", None) or str(e)
        raise AudioError(f"{path}: not a readable audio file{where} ({why})") from None
    x = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, dtype=np.float32)
    if x.size and not np.isfinite(x).all():
        raise AudioError(f"{path}: the decoded audio has NaN or infinite samples")
    return x


def write_wav(path: str, pcm16: bytes, sample_rate: int) -> None:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm16)


# Container formats an uploaded file may be in, told by its first bytes. Naming the demuxer
# ourselves keeps FFmpeg's probe away from playlist formats (HLS, concat) that open other URLs.
_MAGIC = (
    (b"RIFF", 0, "wav"), (b"RF64", 0, "wav"), (b"fLaC", 0, "flac"), (b"OggS", 0, "ogg"),
    (b"ID3", 0, "mp3"), (b"\x1a\x45\xdf\xa3", 0, "matroska"), (b"ftyp", 4, "mp4"),
    (b"FORM", 0, "aiff"), (b"#!AMR", 0, "amr"), (b"caff", 0, "caf"),
)
AUDIO_FILE_FORMATS = "WAV, FLAC, MP3, Ogg (Opus, Vorbis), M4A/MP4, WebM/Matroska, AIFF, AAC, AMR, CAF"


def audio_file_format(head: bytes) -> Optional[str]:
    """The FFmpeg demuxer for a file starting with `head`, or None when it is none we read."""
    for magic, at, fmt in _MAGIC:
        if head[at:at + len(magic)] == magic:
            return fmt
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "aac" if head[1] & 0x06 == 0 else "mp3"  # ADTS (layer 0) or an MPEG audio frame
    return None


def iter_audio_file(data: bytes, sample_rate: int = 16000, block_seconds: float = 1.0) -> Iterator[bytes]:
    """Decode an audio file held in memory (any of AUDIO_FILE_FORMATS) with PyAV (FFmpeg) to
    PCM16 mono at `sample_rate`, in blocks of about `block_seconds`, as it decodes.

    AudioError (bad_audio) when the bytes are not such a file or hold no audio stream; a file
    cut short yields what could be decoded (an error after some audio only ends it). Blocking:
    run it off the event loop."""
    import io

    import av

    fmt = audio_file_format(data[:16])
    if fmt is None:
        raise AudioError(f"not an audio file this server reads ({AUDIO_FILE_FORMATS})")
    block = max(1, int(sample_rate * block_seconds)) * 2
    buf = bytearray()
    produced = False
    try:
        with av.open(io.BytesIO(data), mode="r", format=fmt) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise AudioError(f"the {fmt} file holds no audio stream")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
            frames: Iterator[Any] = container.decode(stream)
            while True:
                try:
                    frame = next(frames, None)
                except av.FFmpegError:
                    if not produced and not buf:
                        raise
                    logger.info("audio file: decoding stopped early (a truncated or damaged %s file)", fmt)
                    frame = None
                for out in resampler.resample(frame):
                    buf += out.to_ndarray().tobytes()
                while len(buf) >= block:
                    produced = True
                    yield bytes(buf[:block])
                    del buf[:block]
                if frame is None:
                    break
    except av.FFmpegError as e:
        raise AudioError(f"cannot decode the {fmt} file: {e.strerror or type(e).__name__}") from None
    if buf:
        yield bytes(buf)
