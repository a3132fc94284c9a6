"""funasr's AutoModel without funasr's import-everything.

`import funasr` runs `import_submodules`: every model family funasr ships (speaker clustering
with sklearn, LLM ASR with transformers, ...) is imported so that each registers its classes.
That is 7 s of a daemon's start on this machine, where fsmn-vad (the endpointing of every engine,
the bundled Whisper's included) needs one family of them and the FunASR engine a few.

`build(modules, **kwargs)` (and `auto_model(modules)`, which it calls) puts funasr's package in
`sys.modules` with its `__init__` deferred, imports AutoModel and the named modules (which
register the classes a model's config names) and builds the model. Whatever asks the package
for anything else (`from funasr import AutoModel`, as funasr's own code and the benchmarks do)
gets it: the first such question runs funasr's own `__init__` in that same module object, as a
plain `import funasr` would have. A model whose config names a class none of the modules
registers is built again with all of funasr, and the log says so once.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pkgutil
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

logger = logging.getLogger(__name__)

# The funasr modules whose classes the models we load name in their config.yaml (a package: all
# its submodules). fsmn-vad:
VAD_MODULES = ("funasr.models.fsmn_vad_streaming", "funasr.frontends.wav_frontend")
# Paraformer offline (plain, SeACo, BiCif), streaming, and CT-Transformer punctuation; the real
# models' configs also name their training's SpecAugLFR (built, never run at inference) and may
# name a feature normalisation:
PARAFORMER_MODULES = ("funasr.models.paraformer", "funasr.models.sanm", "funasr.models.scama",
                      "funasr.models.bicif_paraformer", "funasr.models.seaco_paraformer",
                      "funasr.models.paraformer_streaming", "funasr.models.ct_transformer",
                      "funasr.models.specaug", "funasr.models.normalize",
                      "funasr.tokenizer.char_tokenizer", "funasr.frontends.wav_frontend")
_lock = threading.RLock()


def auto_model(modules: Iterable[str]) -> Any:
    """funasr.auto.auto_model.AutoModel, with `modules` (dotted funasr module or package names; a
    package with all its submodules) imported beside it."""
    with _lock:
        if "funasr" not in sys.modules:
            _deferred_package()
        from funasr.auto.auto_model import AutoModel

        for name in modules:
            _import_tree(name)
    return AutoModel


def _import_tree(name: str) -> None:
    mod = importlib.import_module(name)
    for info in pkgutil.iter_modules(getattr(mod, "__path__", None) or []):
        _import_tree(f"{name}.{info.name}")


def build(modules: Iterable[str], **kwargs: Any) -> Any:
    """AutoModel(**kwargs) with `modules` imported beside it. Should that fail (a class the model's
    config names is in none of them), once more with all of funasr, saying so: the second error,
    if there is one, is the model's own."""
    whole = _completed()  # (funasr's own error message, for a class it lacks, completes the import)
    try:
        return auto_model(modules)(**kwargs)
    except Exception as e:  # noqa: BLE001 - retried once with every funasr family registered
        if whole:
            raise
        logger.warning("funasr: %s did not build from %s (%s: %s); importing all of funasr",
                       kwargs.get("model"), ", ".join(modules), type(e).__name__, e)
        return complete().AutoModel(**kwargs)


def _completed() -> bool:
    mod = sys.modules.get("funasr")
    return mod is not None and "import_submodules" in mod.__dict__


def complete() -> ModuleType:
    """funasr imported in full (every family registered), whether or not auto_model came first."""
    with _lock:
        import funasr

        getattr(funasr, "__all__", None)  # a deferred package completes on its first question
        return funasr


def _deferred_package() -> None:
    spec = importlib.util.find_spec("funasr")
    if spec is None or spec.loader is None or spec.origin is None:
        raise ImportError("funasr is not installed")
    mod = importlib.util.module_from_spec(spec)
    mod.__dict__["__version__"] = (Path(spec.origin).parent / "version.txt").read_text(encoding="utf-8").strip()
    state = {"running": False}

    def __getattr__(name: str) -> Any:
        # PEP 562: asked only for what the module does not have yet. funasr's __init__ defines its
        # own __getattr__ (its lazy AutoModel export), which replaces this one once it has run.
        with _lock:
            if state["running"] or mod.__dict__.get("__getattr__") is not __getattr__:
                raise AttributeError(f"module 'funasr' has no attribute {name!r}")
            state["running"] = True
            try:
                spec.loader.exec_module(mod)  # type: ignore[union-attr]
            finally:
                state["running"] = False
        return getattr(mod, name)

    mod.__dict__["__getattr__"] = __getattr__
    sys.modules["funasr"] = mod
