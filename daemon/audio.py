"""PCM helpers shared by engines, daemon and bridge: validation, conversion, resampling."""

from __future__ import annotations

from typing import Union

import numpy as np

from daemon.errors import AudioError

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
    """float audio -> PCM16 LE bytes; NaN becomes 0 and the peak is kept below full scale."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > 0.999:
        x = x * (0.999 / peak)
    return (x * 32767.0).astype("<i2").tobytes()


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


def write_wav(path: str, pcm16: bytes, sample_rate: int) -> None:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm16)
