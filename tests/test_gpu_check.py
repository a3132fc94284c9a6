"""scripts/gpu-check.sh, dry-run on the CPU (tiny models, two streams): the same script a GPU loan
runs, so it cannot rot between loans. Every figure comes out measured or named as not measured with
a reason; the wheel list, the stand-ins and (where built) the wheelhouse are checked too."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.tools.bench_gpu import fixed_keys
from daemon.tools.bench_gpu_report import missing_figures, pinned_versions, wheel_list

ROOT = Path(__file__).resolve().parent.parent
DRY_RUN_LIMIT_S = 120


def test_dry_run_on_cpu_reports_every_figure(models_dir, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    t0 = time.monotonic()
    r = subprocess.run([str(ROOT / "scripts" / "gpu-check.sh"), "--device", "cpu", "--size", "tiny", "--models",
                        str(models_dir), "--streams", "1,2", "--quick", "--out", str(out), "--deadline", "100"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=DRY_RUN_LIMIT_S + 30)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert took < DRY_RUN_LIMIT_S, f"the dry run took {took:.0f} s"
    report = json.loads((out / "gpu-check.json").read_text(encoding="utf-8"))
    md = (out / "gpu-check.md").read_text(encoding="utf-8")
    assert report["errors"] == [] and report["device"] == "cpu" and report["streams"] == [1, 2]
    figs = {f["key"]: f for f in report["figures"]}
    assert missing_figures(report["figures"], fixed_keys([1, 2])) == []
    for f in figs.values():
        assert f["value"] is not None or f["not_measured"].strip(), f
        assert f["label"] in md and f["transfers_to_p100"]
    # Measured on the CPU: the daemon path works end to end.
    for key in ("asr_device", "tts_device", "tts_per_sentence", "paraformer_rtf", "final_latency_1",
                "final_latency_2", "e2e_first_audio"):
        assert figs[key]["value"] is not None, figs[key]
    assert figs["asr_device"]["value"] == "funasr on cpu float32"
    # Not measurable here, and saying why.
    assert "cpu" in figs["vram_loaded"]["not_measured"] and figs["whisper_1_vs_4"]["value"] is None
    tests = report["gpu_tests"]
    assert tests["ran"] and tests["counts"] == {"skipped": len(tests["tests"])} and len(tests["tests"]) >= 8
    assert all("CUDA" in t["detail"] for t in tests["tests"])
    env_ = report["environment"]
    assert env_["dtype_on_p100"] == "float16" and env_["not_carried"]
    assert (out / "gpu-check.log").is_file() and "measuring" in (out / "gpu-check.log").read_text()


def test_wheel_list_resolves_to_pins_and_names_what_it_leaves_out():
    """Every carried package has a version build-wheelhouse.sh can pin (the requirements, else the
    venv's), every stand-in exists and is inert, and Whisper's absence has its reason."""
    import importlib.metadata as md

    lst = wheel_list()
    pins = pinned_versions()
    for name, why in lst["carry"]:
        assert why, name
        if name.lower() not in pins:
            md.version(name)  # raises when build-wheelhouse.sh could not pin it
    for name, why in lst["stub"]:
        assert (ROOT / "tests" / "gpu_stubs" / name / "__init__.py").is_file() and why
    omit = dict(lst["omit"])
    assert "ctranslate2" in omit and re.search(r"\d+(\.\d+)? MB", omit["ctranslate2"])


def test_stand_ins_let_melo_speak_chinese(models_dir):
    """With the stand-ins shadowing the real MeCab/fugashi/unidic-lite/babel (as on the GPU machine,
    where they are absent), melo still imports and the tiny model speaks Chinese with English words."""
    code = """
import sys
from pathlib import Path
import MeCab, babel, fugashi, unidic_lite
assert all(getattr(m, "__s2s_stub__", False) for m in (MeCab, babel, fugashi, unidic_lite))
from daemon.tts.melo_engine import MeloConfig, MeloTTSEngine
t = Path(sys.argv[1]) / "tiny"
e = MeloTTSEngine(MeloConfig(model_dir=t / "melo-zh", hf_home=t / "hf", nltk_data=t / "nltk_data"))
e.load()
pcm = e.synthesize("你好，打开WiFi。今天天气很好。")
assert len(pcm) > 4800, len(pcm)
from daemon.tools.bench_gpu_report import stubs_in_use
print(sorted(s["module"] for s in stubs_in_use()))
"""
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'tests' / 'gpu_stubs'}:{ROOT}")
    r = subprocess.run([sys.executable, "-c", code, str(models_dir)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "['MeCab', 'babel', 'fugashi', 'unidic_lite']" in r.stdout


def test_wheelhouse_fits_where_built():
    info = ROOT / ".wheelhouse" / "wheelhouse.json"
    if not info.is_file():
        pytest.skip("no .wheelhouse/ here: scripts/build-wheelhouse.sh builds it (online)")
    data = json.loads(info.read_text())
    assert data["total_bytes"] <= 60 * 2 ** 20
    carried = {n.lower() for n, _ in wheel_list()["carry"]}
    assert {w["name"].lower() for w in data["wheels"]} == carried
