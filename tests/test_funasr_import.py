"""funasr's models without all of funasr (daemon/asr/funasr_import.py): fsmn-vad (the bundled
Whisper's endpointing) and the FunASR engine load their own funasr modules, not every model
family funasr ships (7 s of each start here); whatever asks funasr for more afterwards
(funasr's own code) gets all of it; a config naming a class those modules lack still loads,
saying so.

Each case runs in a fresh interpreter: what is imported is the thing measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VAD_THEN_FUNASR = """
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
import numpy as np
from daemon.asr.vad import FsmnVAD
v = FsmnVAD(Path(sys.argv[1]) / "fsmn-vad", ncpu=1)
v.load()
seg = v.segmenter()
x = np.zeros(16000, np.float32)
x[4000:12000] = 0.3 * np.sin(np.arange(8000) * 0.2)
seg.push(x); seg.flush()
vad = {"heavy": [m for m in ("funasr.models.paraformer.model", "funasr.models.llm_asr.model", "transformers")
                 if m in sys.modules], "families": len(sys.modules["funasr.register"].tables.model_classes)}
from daemon.asr.funasr_engine import FunASRPool
from helpers.funasr_tiny import make_config
from daemon.audio import read_wav
pool = FunASRPool(make_config(Path(sys.argv[1])))
pool.load()
# The real Paraformer-large's config also names its training's SpecAugLFR (the tiny one has none).
import logging, shutil, tempfile, yaml
from daemon.asr import funasr_import
warned = []
class Warned(logging.Handler):
    def emit(self, record):
        warned.append(record.getMessage())
logging.getLogger("daemon.asr.funasr_import").addHandler(Warned())
real = Path(tempfile.mkdtemp()) / "paraformer"
shutil.copytree(Path(sys.argv[1]) / "tiny" / "paraformer", real)
cfg = yaml.safe_load((real / "config.yaml").read_text())
cfg.update(specaug="SpecAugLFR", specaug_conf=dict(
    apply_time_warp=False, apply_freq_mask=True, freq_mask_width_range=[0, 30], lfr_rate=6, num_freq_mask=1,
    apply_time_mask=True, time_mask_width_range=[0, 12], num_time_mask=1))
(real / "config.yaml").write_text(yaml.safe_dump(cfg))
funasr_import.build(funasr_import.PARAFORMER_MODULES, model=str(real), device="cpu", disable_update=True,
                    disable_pbar=True, disable_log=True)
light = sorted(m for m in ("transformers", "funasr.models.llm_asr.model") if m in sys.modules) + warned
from funasr import AutoModel  # funasr's own question, asked after
import funasr
x, _ = read_wav("tests/fixtures/zh/01.wav")
text = pool.decode(x.astype(np.float32))
print(json.dumps({"vad": vad, "light": light, "version": funasr.__version__,
                  "paraformer": "funasr.models.paraformer.model" in sys.modules,
                  "same": AutoModel is sys.modules["funasr.auto.auto_model"].AutoModel, "text": text}))
"""

MISSING_MODULE = """
import json, sys, logging
logging.basicConfig(level=logging.WARNING)
import daemon.asr.funasr_import as fi
from daemon.asr.vad import FsmnVAD
fi.VAD_MODULES = ("funasr.frontends.wav_frontend",)  # the encoder's module left out
v = FsmnVAD(sys.argv[1], ncpu=1)
v.load()
print(json.dumps({"loaded": v.loaded}))
"""


def _run(code: str, arg: Path) -> tuple:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    r = subprocess.run([sys.executable, "-c", code, str(arg)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_fsmn_vad_then_the_funasr_engine_load_their_own_modules_and_funasr_answers_the_rest(models_dir):
    out, _ = _run(VAD_THEN_FUNASR, models_dir)
    assert out["vad"]["heavy"] == [], out  # fsmn-vad alone: not Paraformer, not funasr's LLM families
    assert out["vad"]["families"] <= 3, out  # FsmnVADStreaming and its kin, not funasr's ~50 model classes
    # the tiny Paraformer, streaming and punctuation, and a config with the real one's SpecAugLFR:
    # their own modules only, no retry
    assert out["light"] == [], out
    assert out["paraformer"] and out["same"] and out["version"].count(".") >= 1, out
    assert isinstance(out["text"], str)


def test_a_class_its_modules_lack_loads_with_all_of_funasr_and_says_so(models_dir):
    out, err = _run(MISSING_MODULE, models_dir / "fsmn-vad")
    assert out["loaded"], out
    assert "importing all of funasr" in err, err[-3000:]
