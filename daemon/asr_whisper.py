"""Whisper engine (faster-whisper / CTranslate2): the rollback ASR, with the same VAD endpointing
as FunASR (daemon/vad.py) and the same event format.

- Finals only: Whisper has no streaming decoder, so no partials.
- Language: "zh", "en", or "auto" (Whisper detects per utterance).
- Mandarin: Whisper writes traditional characters; finals in zh (given or detected) are folded
  to simplified with OpenCC's "t2s" (opencc-python-reimplemented).
- Hotwords: not supported; a session asking for them gets UnsupportedError. faster-whisper's
  `hotwords=` is only a decoder prompt, and on the fixtures it did not make Whisper base write
  浇水 for 浇水 (it still wrote 椒水) while it changed other characters: a prompt that does not
  do what the word "hotwords" promises is worse than a clear refusal.
- Device: CPU uses int8 (config `compute_type`); CUDA uses float16 (or float32 when asked).
  A CUDA error at load or inference reloads the model on the CPU once, logged and reported.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Generator, List, Optional, Sequence, Tuple, Union

import numpy as np

from daemon import devices
from daemon.engines import Capabilities, EngineInfo, Fallback
from daemon.errors import EngineError, S2SError
from daemon.workers import extend_budget
from daemon.asr_base import Decode, PoolBase, StreamingEngine
from daemon.vad import SAMPLE_RATE, FsmnVAD, require_dir

logger = logging.getLogger(__name__)

CPU_COMPUTE_TYPES = ("int8", "float32", "default")
# How much longer than its budget a call that reloads the model on the CPU may run.
RELOAD_BUDGET_SECONDS = 120.0


# One decode pass per utterance: faster-whisper's default re-decodes at rising temperatures when a
# pass looks poor, which made 2.4 s of English heard as zh take 5-14 s and stall every session on
# the worker. With beam 5 a single pass was as accurate here (BENCHMARKS.md, "Whisper fallback").
DECODE_TEMPERATURE = 0.0


@dataclass(frozen=True)
class WhisperConfig:
    model_dir: Path
    vad_dir: Path
    device: str = "cpu"
    dtype: str = "auto"
    compute_type: str = "int8"
    beam_size: int = 5
    language: str = "zh"
    hotwords: Tuple[str, ...] = ()
    max_utterance_seconds: float = 30.0
    idle_timeout: float = 60.0
    ncpu: int = 2

    @classmethod
    def from_config(cls, cfg: Any) -> "WhisperConfig":
        w = cfg.asr.whisper
        return cls(model_dir=cfg.model_path(w.model), vad_dir=cfg.model_path(w.vad), device=cfg.asr.device,
                   dtype=cfg.asr.dtype, compute_type=w.compute_type, beam_size=w.beam_size,
                   language=cfg.asr.language, hotwords=tuple(cfg.asr.hotwords),
                   max_utterance_seconds=cfg.limits.max_utterance_seconds,
                   idle_timeout=cfg.limits.idle_timeout, ncpu=cfg.asr.ncpu)

    def missing(self) -> List[str]:
        out = [] if (Path(self.model_dir) / "model.bin").is_file() else [str(self.model_dir)]
        if not (Path(self.vad_dir) / "config.yaml").is_file():
            out.append(str(self.vad_dir))
        return out


_T2S: Any = None


def to_simplified(text: str) -> str:
    """Traditional -> simplified Chinese (OpenCC t2s); other text passes unchanged."""
    global _T2S
    if _T2S is None:
        import opencc

        _T2S = opencc.OpenCC("t2s")
    return _T2S.convert(text)


class WhisperPool(PoolBase):
    name = "whisper"

    def __init__(self, config: WhisperConfig):
        super().__init__(config.idle_timeout)
        self.config = config
        self.device = "cpu"
        self.dtype = "float32"
        self.compute_type = ""
        self._model: Any = None

    def load(self) -> None:
        c = self.config
        require_dir(c.model_dir, "whisper", marker="model.bin")
        require_dir(c.vad_dir, "fsmn-vad")
        t0 = time.monotonic()
        self.vad = FsmnVAD(c.vad_dir, ncpu=c.ncpu)
        self.vad.load()
        choice = devices.resolve(c.device, c.dtype, what="asr.whisper")
        if choice.fallback_reason:
            self.fallbacks.append(Fallback("asr.device", c.device, choice.device, choice.fallback_reason, "load"))
        try:
            self._load_model(choice.device, choice.dtype)
        except Exception as e:
            if not (choice.is_cuda and devices.is_cuda_error(e)):
                raise
            self._note_fallback(choice.device, "cpu", f"CUDA error loading Whisper: {e}", "load")
            self._load_model("cpu", "float32")
        self._loaded = True
        if self.config.hotwords and not self.capabilities().hotwords:
            logger.warning("%s: asr.hotwords is set but %s cannot use hotwords; the defaults are not applied",
                           self.name, self.model_label())
        logger.info("whisper: loaded %s on %s (%s) in %.1f s", c.model_dir, self.device, self.compute_type,
                    time.monotonic() - t0)

    def _load_model(self, device: str, dtype: str) -> None:
        from faster_whisper import WhisperModel

        c = self.config
        if device.startswith("cuda"):
            index = int(device.split(":", 1)[1]) if ":" in device else 0
            compute = "float16" if dtype == "float16" else "float32"
            model = WhisperModel(str(c.model_dir), device="cuda", device_index=index, compute_type=compute,
                                 local_files_only=True)
        else:
            compute = c.compute_type if c.compute_type in CPU_COMPUTE_TYPES else "int8"
            model = WhisperModel(str(c.model_dir), device="cpu", compute_type=compute, cpu_threads=c.ncpu,
                                 local_files_only=True)
        self._model, self.device, self.dtype, self.compute_type = model, device, dtype, compute

    def transcribe(self, audio: np.ndarray, language: str) -> Tuple[str, str]:
        """One utterance -> (text, language). Run on the worker."""
        try:
            return self._transcribe(audio, language)
        except S2SError:
            raise
        except Exception as e:
            if self.device.startswith("cuda") and devices.is_cuda_error(e):
                self._note_fallback(self.device, "cpu", f"CUDA error during recognition: {e}", "recognition")
                extend_budget(RELOAD_BUDGET_SECONDS)  # a model reload is a legitimately long call
                self._load_model("cpu", "float32")
                try:
                    return self._transcribe(audio, language)
                except Exception as e2:
                    raise EngineError(f"recognition failed: {e2}") from e2
            logger.exception("whisper: recognition failed")
            raise EngineError(f"recognition failed: {e}") from e

    def _transcribe(self, audio: np.ndarray, language: str) -> Tuple[str, str]:
        segments, info = self._model.transcribe(
            audio, language=None if language == "auto" else language, beam_size=self.config.beam_size,
            vad_filter=False, condition_on_previous_text=False, without_timestamps=True,
            temperature=DECODE_TEMPERATURE)
        lang = info.language if language == "auto" else language
        sep = "" if lang == "zh" else " "
        text = sep.join(s.text.strip() for s in segments).strip()
        if lang == "zh":
            text = to_simplified(text)
        return text, lang

    def decode_request(self, req: Decode) -> Tuple[str, str]:
        return self.transcribe(req.audio, req.language)

    def capabilities(self) -> Capabilities:
        return Capabilities(partials=False, hotwords=False, punctuation=True, languages=("zh", "en", "auto"))

    def model_label(self) -> str:
        return Path(self.config.model_dir).name

    def _new_engine(self, session_id: str, language: Optional[str], hotwords: Optional[Sequence[str]],
                    partials: bool, partial_interval: Optional[float] = None,
                    max_utterance_seconds: Optional[float] = None) -> "WhisperEngine":
        return WhisperEngine(self, session_id, language=language, hotwords=hotwords, partials=partials,
                             max_utterance_seconds=max_utterance_seconds)

    def info(self) -> EngineInfo:
        c = self.config
        return EngineInfo(
            kind="asr", engine=self.name, device=self.device, requested_device=c.device, dtype=self.dtype,
            sample_rate=SAMPLE_RATE, capabilities=self.capabilities(), loaded=self._loaded,
            models={"whisper": str(c.model_dir), "vad": str(c.vad_dir)}, sessions=self.session_count,
            fallbacks=tuple(self.fallbacks),
            details={"compute_type": self.compute_type})


class WhisperEngine(StreamingEngine):
    """One Whisper session; `final` events carry `language` as well."""

    supports_partials = False
    pool: WhisperPool

    def __init__(self, pool: Union[WhisperPool, WhisperConfig], session_id: str = "default",
                 language: Optional[str] = None, hotwords: Optional[Sequence[str]] = None,
                 partials: Optional[bool] = None, max_utterance_seconds: Optional[float] = None):
        if isinstance(pool, WhisperConfig):
            standalone = WhisperPool(pool)
            standalone.load()
            pool = standalone
        c = pool.config
        super().__init__(pool, session_id, language or c.language,
                         _default_hotwords(pool) if hotwords is None else hotwords, False,
                         c.max_utterance_seconds if max_utterance_seconds is None else max_utterance_seconds)
        self.last_language = ""

    def _decode_steps(self, audio: np.ndarray) -> Generator[Any, Any, str]:
        text, self.last_language = yield Decode(audio, (), self.language)
        return str(text)

    def _final_extras(self, final: Dict[str, Any]) -> None:
        final["language"] = self.last_language or self.language


def _default_hotwords(pool: WhisperPool) -> List[str]:
    """Config-wide hotwords apply only where the model can use them (the pool logged a
    warning at load otherwise); hotwords a session asks for are never dropped silently."""
    return list(pool.config.hotwords) if pool.capabilities().hotwords else []
