"""funasr's AutoModel without funasr's import-everything.

`import funasr` runs `import_submodules`: every model family funasr ships (speaker clustering
with sklearn, LLM ASR with transformers, ...) is imported so that each registers its classes.
That is 7 s of a daemon's start on this machine, and fsmn-vad (the endpointing of every engine,
the bundled Whisper's included) needs one family of them.

`auto_model(modules)` puts funasr's package in `sys.modules` with its `__init__` deferred,
imports AutoModel and the named modules (which register the classes a model's config names)
and returns AutoModel. Whatever asks the package for anything else (`from funasr import
AutoModel`, as the FunASR engine and funasr's own code do) gets it: the first such question
runs funasr's own `__init__` in that same module object, as a plain `import funasr` would have.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

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
