import numpy as np
import pytest

from daemon.audio import TTS_PEAK, below_full_scale, float_to_pcm16, read_wav, resample, to_float32, write_wav
from daemon.errors import AudioError, ErrorCode


def test_pcm16_bytes_roundtrip():
    x = (np.sin(np.linspace(0, 100, 1600)) * 0.5).astype(np.float32)
    y = to_float32(float_to_pcm16(x))
    assert y.dtype == np.float32 and np.max(np.abs(x - y)) < 1e-3


@pytest.mark.parametrize("bad,msg", [
    (b"\x00\x01\x02", "even number of bytes"),
    (np.array([0.1, np.nan], dtype=np.float32), "NaN"),
    (np.array([0.1, np.inf]), "NaN or infinite"),
    (np.zeros((2, 10), dtype=np.float32), "mono"),
    (np.zeros(4, dtype=np.int32), "dtype"),
    ("text", "bytes or a numpy array"),
])
def test_bad_audio(bad, msg):
    with pytest.raises(AudioError, match=msg) as ei:
        to_float32(bad)
    assert ei.value.code == ErrorCode.BAD_AUDIO


def test_empty_and_int16():
    assert to_float32(b"").size == 0
    assert to_float32(np.array([16384], dtype=np.int16))[0] == 0.5


def test_float_to_pcm16_is_peak_safe():
    pcm = np.frombuffer(float_to_pcm16(np.array([2.0, -3.0, np.nan, 0.5], dtype=np.float32)), dtype="<i2")
    assert pcm.max() <= 32767 and pcm.min() >= -32768 and pcm[2] == 0
    assert pcm[1] == -32767 and abs(int(pcm[0]) - 32767 * 2 // 3) <= 1  # scaled as a whole, not clipped


def test_pcm16_read_as_float_and_written_back_is_the_same_bytes(fixtures_dir):
    """s2s-ctl transcribe and the benches read a PCM16 WAV as float and send it as PCM16: the
    bytes must be the file's. Scaling by 32767 (and by 0.999 at a full-scale peak) changed every
    sample slightly, and Whisper base heard zh/09's 打开Google地图 as 打开丢狗地图 from the
    altered audio while the file's own bytes give Google."""
    ours = np.array([-32768, -32767, -1, 0, 1, 12345, 32767], dtype="<i2")
    assert float_to_pcm16(to_float32(ours.tobytes())) == ours.tobytes()
    x, _ = read_wav(fixtures_dir / "zh" / "09.wav")
    raw = (fixtures_dir / "zh" / "09.wav").read_bytes()
    assert float_to_pcm16(x) in raw


def test_synthesised_speech_stays_below_full_scale():
    x = np.array([0.2, -1.0, 0.9995], dtype=np.float32)
    y = below_full_scale(x)
    assert np.max(np.abs(y)) == pytest.approx(TTS_PEAK) and y[0] == pytest.approx(0.2 * TTS_PEAK)
    pcm = np.frombuffer(float_to_pcm16(y), dtype="<i2")
    assert np.abs(pcm.astype(np.int32)).max() < 32767
    quiet = np.array([0.5, -0.25], dtype=np.float32)
    assert below_full_scale(quiet) is quiet


def test_resample_is_band_limited():
    sr = 44100
    t = np.arange(sr) / sr
    x = (0.5 * np.sin(2 * np.pi * 1000 * t) + 0.3 * np.sin(2 * np.pi * 15000 * t)).astype(np.float32)
    y = resample(x, sr, 24000)
    assert abs(len(y) - 24000) <= 1
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    freqs = np.fft.rfftfreq(len(y), 1 / 24000)
    # the 15 kHz tone is above the new Nyquist (12 kHz): it must be removed, not aliased to 9 kHz
    alias = spec[(freqs > 8900) & (freqs < 9100)].max()
    tone = spec[(freqs > 990) & (freqs < 1010)].max()
    assert alias < tone * 1e-3


def test_wav_roundtrip(tmp_path, fixtures_dir):
    x, sr = read_wav(fixtures_dir / "zh" / "01.wav")
    assert sr == 16000 and 3.0 < len(x) / sr < 3.5
    write_wav(tmp_path / "o.wav", float_to_pcm16(x), sr)
    y, sr2 = read_wav(tmp_path / "o.wav")
    assert sr2 == 16000 and len(y) == len(x)
