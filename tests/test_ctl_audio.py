"""`s2s-ctl transcribe` reads any common audio format and says what is wrong with a file it
cannot read (issue 23 item 11: a directory or a non-WAV file printed a Python traceback).

Real files: MP3, Ogg Opus, M4A (AAC) and FLAC encoded with PyAV from a fixture WAV (the Ogg
one at 48 kHz stereo, the M4A one at 44.1 kHz, so they are resampled and downmixed); a directory, a text file, truncated files,
an empty file. Bad ones exit 2 with one line on stderr naming the file; good ones are
transcribed by a real daemon (Whisper base, the bundled model) into the fixture's sentence.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest

from daemon.audio import read_wav
from daemon.errors import AudioError
from daemon_harness import ROOT, DaemonProcess

FIXTURE = "zh/01.wav"  # 提醒我晚上八点给阳台的花浇水。


def encode(wav: Path, out: Path, codec: str, rate: int, layout: str = "mono") -> Path:
    """The fixture encoded by PyAV (FFmpeg) into `out` (container from its suffix)."""
    import av

    x, sr = read_wav(str(wav))
    assert sr == 16000
    if rate != sr:
        from daemon.audio import resample

        x = resample(x, sr, rate)
    channels = 2 if layout == "stereo" else 1
    pcm = np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16)  # the WAV's own samples at 16 kHz
    packed = np.repeat(pcm, channels)  # s16, channels interleaved
    with av.open(str(out), "w") as c:
        s = c.add_stream(codec, rate=rate, layout=layout)
        step = 1024 * channels
        for off in range(0, len(packed), step):
            frame = av.AudioFrame.from_ndarray(packed[off:off + step].reshape(1, -1), format="s16", layout=layout)
            frame.sample_rate = rate
            for p in s.encode(frame):  # PyAV converts to the codec's own sample format and frame size
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, fixtures_dir):
    d = tmp_path_factory.mktemp("ctl-audio")
    wav = fixtures_dir / FIXTURE
    good = {
        "wav": wav,
        "mp3": encode(wav, d / "speech.mp3", "mp3", 16000),
        "ogg": encode(wav, d / "speech.ogg", "libopus", 48000, "stereo"),
        "m4a": encode(wav, d / "speech.m4a", "aac", 44100),
        "flac": encode(wav, d / "speech.flac", "flac", 16000),
    }
    (d / "notes.txt").write_text("this is not audio\n" * 20)
    (d / "empty.wav").write_bytes(b"")
    (d / "cut.wav").write_bytes(wav.read_bytes()[:30])         # the WAV header cut short
    (d / "cut.mp3").write_bytes(good["mp3"].read_bytes()[:100])  # an MP3 cut to 100 bytes
    (d / "folder.wav").mkdir()
    bad = {"directory": d / "folder.wav", "text": d / "notes.txt", "empty": d / "empty.wav",
           "truncated wav": d / "cut.wav", "truncated mp3": d / "cut.mp3", "missing": d / "nowhere.flac"}
    return good, bad


def test_read_audio_decodes_every_format_to_16k_mono(files):
    from daemon.audio import read_audio

    good, _ = files
    ref = read_audio(str(good["wav"]), 16000)
    for kind in ("mp3", "ogg", "m4a", "flac"):
        x = read_audio(str(good[kind]), 16000)
        assert x.dtype == np.float32 and x.ndim == 1
        assert abs(len(x) - len(ref)) < 0.1 * 16000, (kind, len(x), len(ref))  # codec padding at most
        # the same speech: the loudness envelope (100 ms RMS) follows the original's
        n = min(len(x), len(ref)) // 1600 * 1600
        shift = int(np.argmax(np.correlate(x[:16000], ref[:8000], "valid"))) if kind != "flac" else 0
        a = np.sqrt((x[shift:shift + n - 1600].reshape(-1, 1600) ** 2).mean(axis=1))
        b = np.sqrt((ref[:n - 1600].reshape(-1, 1600) ** 2).mean(axis=1))
        assert np.corrcoef(a, b)[0, 1] > 0.95, kind
    assert np.array_equal(read_audio(str(good["flac"]), 16000), ref)  # lossless: the same samples


def test_read_audio_names_the_file_and_the_problem(files):
    from daemon.audio import read_audio

    _, bad = files
    want = {"directory": "is a directory", "text": "not a readable audio file", "empty": "",
            "truncated wav": "", "truncated mp3": "", "missing": "no such file"}
    for kind, path in bad.items():
        with pytest.raises(AudioError) as e:
            read_audio(str(path), 16000)
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and want[kind] in msg and "\n" not in msg, (kind, msg)


def ctl(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.tools.ctl", "--asr", d.asr, "--tts", d.tts, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory, models_dir):
    p = DaemonProcess(tmp_path_factory.mktemp("ctl-audio-d"), {
        "models_root": str(models_dir),
        "asr": {"engine": "whisper", "device": "cpu", "fallback_engine": "none",
                "whisper": {"model": "whisper-base", "vad": "fsmn-vad"}},
        "tts": {"engine": "piper", "device": "cpu", "fallback_engine": "none",
                "piper": {"voice": "piper/en_US-joe-medium.onnx"}},
    }, fake=False, watchdog_usec=10_000_000)
    p.wait_ready(300)
    yield p
    p.stop()


def finals(out: str) -> List[str]:
    return [line.split(None, 3)[3] for line in out.splitlines() if line.startswith("final")]


def test_ctl_transcribes_mp3_ogg_m4a_flac_and_refuses_bad_files_in_one_line(whisper, files, manifest):
    from daemon.tools.metrics import cer

    good, bad = files
    text = next(m["text"] for m in manifest if m["path"] == FIXTURE)
    got = {}
    for kind, path in good.items():
        r = ctl(whisper, "transcribe", str(path), "--lang", "zh")
        assert r.returncode == 0 and "Traceback" not in r.stderr, (kind, r.stdout, r.stderr)
        got[kind] = "".join(finals(r.stdout))
        assert cer(text, got[kind]) < 0.35, (kind, got[kind], text)
    assert got["flac"] == got["wav"], got  # lossless: the same transcript
    for kind, path in bad.items():
        r = ctl(whisper, "transcribe", str(path), "--lang", "zh")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (kind, r.returncode, r.stderr)
        assert lines[0].startswith(f"s2s-ctl: transcribe: {path}: ") and "Traceback" not in r.stderr, lines
        assert r.stdout == ""
