"""Pick, construct and load the ASR pool and TTS engine, falling back to the bundled models.

The decision (`choose_engine`) is a pure function of which engines have their weights on
disk, so it is tested without loading anything. `build_asr` / `build_tts` apply it, import
the chosen engine module (heavy imports happen here, at daemon start, never at import time of
this module) and load it; a load that fails for want of weights or of the engine's Python
package takes the fallback too, unless strict.

Test-only hook: when $S2S_TEST_ENGINES names a module (``tests.fake_engines``) or a Python
file (``tests/fake_engines.py``: some installed packages ship a top-level ``tests``), that
module's ``build_asr(cfg)`` / ``build_tts(cfg)`` supply the engines instead. Nothing but this
factory reads the variable; production configs never set it.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Tuple

from daemon.config import Config
from daemon.engines import Fallback
from daemon.errors import EngineError, ModelMissingError, S2SError

logger = logging.getLogger(__name__)

TEST_ENGINES_ENV = "S2S_TEST_ENGINES"

# engine name -> (module, class, settings class built with `.from_config(cfg)`)
ASR_CLASSES = {"funasr": ("daemon.asr.funasr_engine", "FunASRPool", "FunASRConfig"),
               "whisper": ("daemon.asr.whisper_engine", "WhisperPool", "WhisperConfig")}
TTS_CLASSES = {"melo": ("daemon.tts.melo_engine", "MeloTTSEngine", "MeloConfig"),
               "kokoro": ("daemon.tts.kokoro_engine", "KokoroEngine", "KokoroConfig"),
               "piper": ("daemon.tts.piper_engine", "PiperEngine", "PiperConfig"),
               # Kokoro for Chinese and mixed text, Piper for English-only text, chosen per request.
               "kokoro+piper": ("daemon.tts.kokoro_engine", "RoutedTTS", "")}
# When a two-engine fallback cannot be built, the half that still can speaks.
DEGRADED = {"kokoro+piper": "piper"}


class StartupError(S2SError):
    """The daemon cannot start (strict mode, or no usable engine); str() is one clear line."""


@dataclass(frozen=True)
class Choice:
    engine: str
    # The engine fallback taken, if any.
    fallbacks: Tuple[Fallback, ...] = ()


def choose_engine(kind: str, selected: str, fallback: str, missing: Mapping[str, str], strict: bool) -> Choice:
    """Pure decision: `missing` maps engine name -> why it is unusable (absent = usable).

    Raises StartupError when the selected engine is unusable and strict is set, or when the
    fallback ("none" = no fallback) is unusable too.
    """
    if selected not in missing:
        return Choice(selected)
    why = missing[selected]
    if strict:
        raise StartupError(f"{kind} engine {selected} unavailable ({why}) and strict mode forbids a fallback")
    if fallback in ("", "none") or fallback == selected:
        raise StartupError(f"{kind} engine {selected} unavailable ({why}) and no fallback engine is configured")
    if fallback in missing:
        raise StartupError(f"{kind} engine {selected} unavailable ({why}); fallback {fallback} unavailable too "
                           f"({missing[fallback]})")
    return Choice(fallback, (Fallback(f"{kind}.engine", selected, fallback, why, "startup"),))


def asr_model_paths(cfg: Config, engine: str) -> List[Tuple[str, str]]:
    if engine == "funasr":
        return [("asr.funasr.paraformer", cfg.asr.funasr.paraformer), ("asr.funasr.vad", cfg.asr.funasr.vad)]
    return [("asr.whisper.model", cfg.asr.whisper.model), ("asr.whisper.vad", cfg.asr.whisper.vad)]


def tts_model_paths(cfg: Config, engine: str) -> List[Tuple[str, str]]:
    if engine == "melo":
        m = cfg.tts.melo
        return [("tts.melo.model", m.model), ("tts.melo.hf_home", m.hf_home), ("tts.melo.nltk_data", m.nltk_data)]
    paths = []
    if engine.startswith("kokoro"):
        paths.append(("tts.kokoro.model", cfg.tts.kokoro.model))
    if engine.endswith("piper"):
        paths.append(("tts.piper.voice", cfg.tts.piper.voice))
    return paths


def missing_models(cfg: Config, kind: str) -> Dict[str, str]:
    """engine name -> first absent model path, for every engine of this kind (cheap: stat only)."""
    engines = ASR_CLASSES if kind == "asr" else TTS_CLASSES
    paths = asr_model_paths if kind == "asr" else tts_model_paths
    out: Dict[str, str] = {}
    for name in engines:
        for key, rel in paths(cfg, name):
            if not rel or not cfg.model_path(rel).exists():
                out[name] = f"{key} absent at {cfg.model_path(rel) if rel else '(empty)'}"
                break
    return out


# The only place test engines may come from: this checkout's tests/ directory (not installed by a
# package, and excluded from the production copy by scripts/install-speech-p100.sh).
TESTS_DIR = Path(__file__).resolve().parents[2] / "tests"


def test_engines_module(env: Mapping[str, str]) -> str:
    """The fake-engine module named by $S2S_TEST_ENGINES ("" when unset).

    Refused (StartupError) unless it is a file inside this checkout's tests/ directory: the hook
    must not run an arbitrary Python file named in a production process's environment."""
    name = env.get(TEST_ENGINES_ENV, "")
    if not name:
        return ""
    rel = name if name.endswith(".py") else name.replace(".", "/") + ".py"
    path = Path(rel) if Path(rel).is_absolute() else Path.cwd() / rel
    try:
        path = path.resolve(strict=True)
    except OSError:
        path = Path(rel)
    if TESTS_DIR not in path.parents or not path.is_file():
        raise StartupError(f"{TEST_ENGINES_ENV}={name!r}: test engines may only come from {TESTS_DIR}; "
                           f"unset {TEST_ENGINES_ENV} (it is a test hook, never used in production)")
    return str(path)


def _import_test_module(name: str) -> Any:
    if name.endswith(".py"):
        import importlib.util
        import sys

        spec = importlib.util.spec_from_file_location("s2s_test_engines", name)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {name}")
        mod = sys.modules.get("s2s_test_engines")
        if mod is None:
            mod = importlib.util.module_from_spec(spec)
            sys.modules["s2s_test_engines"] = mod
            spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(name)


def _construct(mod: Any, cls_name: str, settings_name: str, cfg: Config) -> Any:
    """Engine(Settings.from_config(cfg)), Engine.from_config(cfg) or Engine(cfg), whichever exists."""
    cls = getattr(mod, cls_name)
    settings = getattr(mod, settings_name, None) if settings_name else None
    if settings is not None and callable(getattr(settings, "from_config", None)):
        return cls(settings.from_config(cfg))
    factory = getattr(cls, "from_config", None)
    return factory(cfg) if callable(factory) else cls(cfg)


def _real_builder(table: Mapping[str, Tuple[str, str, str]]) -> Callable[[str, Config], Any]:
    def build(name: str, cfg: Config) -> Any:
        mod_name, cls_name, settings_name = table[name]
        return _construct(importlib.import_module(mod_name), cls_name, settings_name, cfg)
    return build


def _build(kind: str, cfg: Config, strict: bool, selected: str, fallback: str,
           table: Mapping[str, Tuple[str, str, str]]) -> Tuple[Any, List[Fallback]]:
    test_mod = test_engines_module(os.environ)
    if test_mod:
        logger.warning("%s=%s: using TEST engines for %s (never set this in production)", TEST_ENGINES_ENV,
                       test_mod, kind)
        engine = getattr(_import_test_module(test_mod), f"build_{kind}")(cfg)
        engine.load()
        return engine, []
    missing = missing_models(cfg, kind)
    builder = _real_builder(table)
    fallbacks: List[Fallback] = []
    for _attempt in range(3):
        if not strict and selected in missing and fallback in missing and fallback in DEGRADED:
            logger.warning("%s fallback %s unavailable (%s); using %s", kind, fallback, missing[fallback],
                           DEGRADED[fallback])
            fallback = DEGRADED[fallback]
        choice = choose_engine(kind, selected, fallback, missing, strict)
        fallbacks += list(choice.fallbacks)
        for f in choice.fallbacks:
            logger.warning("fallback taken: %s", f.line())
        try:
            engine = builder(choice.engine, cfg)
            engine.load()
            return engine, fallbacks
        except (ImportError, ModelMissingError, EngineError, OSError) as e:
            # A broken package or incomplete weights count as "unavailable": try the fallback once.
            logger.error("%s engine %s failed to load: %s", kind, choice.engine, e, exc_info=logger.isEnabledFor(logging.DEBUG))
            missing = dict(missing)
            missing[choice.engine] = f"load failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            selected = choice.engine
    raise StartupError(f"{kind}: no usable engine ({'; '.join(f'{k}: {v}' for k, v in missing.items())})")


def build_asr(cfg: Config, strict: bool = False) -> Tuple[Any, List[Fallback]]:
    """Construct and load the ASR pool; returns (pool, fallbacks taken). Raises StartupError."""
    pool, fallbacks = _build("asr", cfg, strict, cfg.asr.engine, cfg.asr.fallback_engine, ASR_CLASSES)
    from daemon.asr.turn_judge import attach

    attach(pool, cfg)  # the turn judge (turn.judge); its fallback, if any, is the pool's own
    if cfg.asr.hotwords and not pool.info().capabilities.hotwords:
        logger.warning("asr.hotwords is set but %s cannot use hotwords: sessions open without them", pool.name)
    return pool, fallbacks


def build_tts(cfg: Config, strict: bool = False) -> Tuple[Any, List[Fallback]]:
    """Construct and load the TTS engine; returns (engine, fallbacks taken). Raises StartupError."""
    return _build("tts", cfg, strict, cfg.tts.engine, cfg.tts.fallback_engine, TTS_CLASSES)
