"""Make upstream MeloTTS (`melo`) import and load with no network at all.

melo reaches for the network in three places when it is imported:

* its text cleaner imports every language module, and several of them call
  ``AutoTokenizer.from_pretrained(<hub id>)`` at import; the Chinese path later loads
  ``AutoModelForMaskedLM`` for bert-base-multilingual-uncased on first use;
* ``g2p_en`` (English words inside Chinese text) looks for NLTK's cmudict and averaged
  perceptron tagger at import and calls ``nltk.download`` when they are missing;
* ``melo.download_utils`` imports ``cached_path`` at module level (only used when no
  local checkpoint is given).

`prepare_environment()` points Hugging Face at our own HF_HOME (with the hub switched
off) and NLTK at our own data directory *before* melo is imported, and installs the
one import shim melo needs here. `HUB_MODELS` lists every hub repository and file melo
touches, so that `s2s-models fetch` can download them on an online host and the tiny
builder (daemon/models/tiny_melo.py) can lay out the same tree for tests.

Nothing heavy is imported at module level.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple, Union

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


@dataclass(frozen=True)
class HubModel:
    """One Hugging Face repository melo loads, and why."""

    repo_id: str
    # Files to fetch. Weights only where melo really runs the model.
    files: Tuple[str, ...]
    # Which melo module needs it ("import" = at import time, "zh" = synthesis for language ZH).
    needed_by: str
    with_weights: bool = False


_TOKENIZER_FILES = ("config.json", "tokenizer_config.json", "vocab.txt")

# Every hub id melo's cleaner touches (see /work/shared/OFFLINE-NOTES.md). Language ZH
# (which melo runs as ZH_MIX_EN) takes its BERT features from bert-base-multilingual-uncased:
# the only one whose weights we need. The rest are tokenizers read at import.
HUB_MODELS: Tuple[HubModel, ...] = (
    HubModel("bert-base-multilingual-uncased", _TOKENIZER_FILES + ("tokenizer.json", "model.safetensors"),
             "melo.text.chinese_mix (import) + chinese_bert (ZH synthesis)", with_weights=True),
    HubModel("bert-base-uncased", _TOKENIZER_FILES + ("tokenizer.json",), "melo.text.english (import)"),
    HubModel("hfl/chinese-roberta-wwm-ext-large", _TOKENIZER_FILES + ("tokenizer.json", "special_tokens_map.json"),
             "melo.text.chinese_bert default id (not used for ZH_MIX_EN; kept so nothing surprises)"),
    HubModel("tohoku-nlp/bert-base-japanese-v3", _TOKENIZER_FILES, "melo.text.japanese (import; needs fugashi + unidic-lite)"),
    HubModel("kykim/bert-kor-base", _TOKENIZER_FILES, "melo.text.korean (import)"),
    HubModel("dbmdz/bert-base-french-europeana-cased", _TOKENIZER_FILES, "melo.text.french (import)"),
    HubModel("dccuchile/bert-base-spanish-wwm-uncased", _TOKENIZER_FILES, "melo.text.spanish (import)"),
)

# NLTK resources g2p_en needs: cmudict at import, the tagger for words missing from melo's
# own dictionary. nltk 3.10 loads the tagger from JSON files in a directory.
NLTK_RESOURCES: Tuple[str, ...] = (
    "corpora/cmudict.zip",
    "taggers/averaged_perceptron_tagger.zip",  # g2p_en only checks that it exists
    "taggers/averaged_perceptron_tagger_eng/",  # what nltk.pos_tag really loads
)


def required_resources() -> Dict[str, List[str]]:
    """What a models root must hold for melo: {"hf": [repo/file, ...], "nltk": [...]}.

    Used by `s2s-models fetch` (online host) and by the tiny builder.
    """
    return {
        "hf": [f"{m.repo_id}/{f}" for m in HUB_MODELS for f in m.files],
        "nltk": list(NLTK_RESOURCES),
    }


def hub_snapshot_dir(hf_home: PathLike, repo_id: str) -> Path:
    """The snapshot directory huggingface_hub resolves for repo_id at refs/main, or the
    expected parent when absent (for messages)."""
    repo_dir = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        return repo_dir / "snapshots" / ref.read_text().strip()
    return repo_dir / "snapshots"


def missing_resources(hf_home: PathLike, nltk_data: PathLike) -> List[str]:
    """Resources absent from the two directories, as readable lines (empty = complete)."""
    missing = []
    for m in HUB_MODELS:
        snap = hub_snapshot_dir(hf_home, m.repo_id)
        for f in ("config.json", "tokenizer_config.json"):
            if not (snap / f).is_file():
                missing.append(f"{hf_home}: {m.repo_id}/{f} ({m.needed_by})")
        if m.with_weights and not any((snap / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
            missing.append(f"{hf_home}: {m.repo_id} weights ({m.needed_by})")
    for r in NLTK_RESOURCES:
        if not (Path(nltk_data) / r.rstrip("/")).exists():
            missing.append(f"{nltk_data}: {r}")
    return missing


# --- import shims ---------------------------------------------------------------------


def _module_importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _cached_path_shim() -> types.ModuleType:
    """Stand-in for the `cached_path` package.

    Why: melo/download_utils.py does `from cached_path import cached_path` at module level,
    but only calls it when no local checkpoint is given (use_hf=False and ckpt_path=None),
    which our engine never does. The real package pins huggingface-hub<2 (we need 2.x for
    transformers 5) and pulls boto3 and google-cloud-storage, so it cannot be installed
    beside our stack. The shim refuses loudly if anything ever calls it.
    """
    mod = types.ModuleType("cached_path")

    def cached_path(url_or_filename, *args, **kwargs):  # noqa: ANN001 - mirrors the real API
        raise RuntimeError(
            f"cached_path({url_or_filename!r}) called: s2s never downloads; give melo a local "
            f"config_path and ckpt_path (this module is s2s's offline shim, daemon/tts/melo_offline.py)")

    mod.cached_path = cached_path  # type: ignore[attr-defined]
    mod.__s2s_shim__ = True  # type: ignore[attr-defined]
    return mod


# name -> factory; each is inserted only when the real module cannot be imported.
SHIMS = {"cached_path": _cached_path_shim}


def install_shims() -> List[str]:
    """Insert the shims whose real module is missing; return the names installed."""
    installed = []
    for name, factory in SHIMS.items():
        if name in sys.modules or _module_importable(name):
            continue
        sys.modules[name] = factory()
        installed.append(name)
        logger.info("melo: using s2s's import shim for %s (see daemon/tts/melo_offline.py)", name)
    return installed


# --- environment ----------------------------------------------------------------------


def prepare_environment(hf_home: PathLike, nltk_data: PathLike) -> Dict[str, str]:
    """Point HF and NLTK at local directories, hub off, shims in; call before importing melo.

    Environment variables are read by huggingface_hub/transformers when they are first
    imported, so if they were already imported (by another engine in this process) their
    cached constants are updated too. Returns the variables set.
    """
    hf_home = str(Path(hf_home).resolve())
    nltk_data = str(Path(nltk_data).resolve())
    env = {
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": str(Path(hf_home) / "hub"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        "NLTK_DATA": nltk_data,
    }
    os.environ.update(env)
    _patch_already_imported(hf_home, nltk_data)
    install_shims()
    return env


def _patch_already_imported(hf_home: str, nltk_data: str) -> None:
    """huggingface_hub and nltk read their settings at import; fix them up if already loaded."""
    hub_consts = sys.modules.get("huggingface_hub.constants")
    if hub_consts is not None:
        hub_consts.HF_HOME = hf_home  # type: ignore[attr-defined]
        hub_consts.HF_HUB_CACHE = str(Path(hf_home) / "hub")  # type: ignore[attr-defined]
        hub_consts.HUGGINGFACE_HUB_CACHE = hub_consts.HF_HUB_CACHE  # type: ignore[attr-defined]
        hub_consts.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]
    nltk_mod = sys.modules.get("nltk.data")
    if nltk_mod is not None and nltk_data not in nltk_mod.path:  # type: ignore[attr-defined]
        nltk_mod.path.insert(0, nltk_data)  # type: ignore[attr-defined]


def import_melo(hf_home: PathLike, nltk_data: PathLike) -> types.ModuleType:
    """prepare_environment(), then import and return melo.api (17 s the first time here)."""
    missing = missing_resources(hf_home, nltk_data)
    if missing:
        from daemon.errors import ModelMissingError

        raise ModelMissingError(
            "melo resources missing (run `s2s-models fetch` on an online host): " + "; ".join(missing[:5])
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    prepare_environment(hf_home, nltk_data)
    import melo.api

    return melo.api
