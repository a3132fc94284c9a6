"""Piper (piper-tts 1.8, ONNX) as a TTSEngine: the rollback voice, same interface as MeloTTS.

The bundled voice is English (en_US-joe-medium, 22.05 kHz), resampled to `tts.sample_rate`.
Piper's espeak-ng frontend reads numbers itself, so no normalisation happens here; a sentence
is cut into calls by its espeak phonemes (`_calls`: 777777 is 70 of them). Sentence splitting,
streaming, the worker thread and CUDA fallback come from tts_base.SentenceTTS. The ONNX session
hands its arena's memory back after each run (a long call's would be kept otherwise).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np

from daemon.config import Config
from daemon.engines import EngineInfo
from daemon.errors import ModelMissingError
from daemon.rules import SPOKEN_LANGUAGES
from daemon.tts.base import SentenceTTS, TTSSettings, pack

logger = logging.getLogger(__name__)

# CJK ideographs, kana, hangul and full-width forms: an espeak-based non-CJK voice reads each as
# "Chinese letter" (seconds of noise per character), so such voices drop them instead.
_CJK = re.compile(r"[\u1100-\u11ff\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]+")


@dataclass(frozen=True, kw_only=True)
class PiperConfig(TTSSettings):
    voice: Path

    @classmethod
    def from_config(cls, cfg: Config) -> "PiperConfig":
        """From daemon.config.Config: tts.piper.voice (via cfg.model_path) and the shared settings."""
        return cls(voice=cfg.model_path(cfg.tts.piper.voice), **TTSSettings.of(cfg))


class _ShrinkingSession:
    """An onnxruntime session whose CPU arena gives back what a run took beyond its start."""

    def __init__(self, session: Any):
        import onnxruntime

        self._session = session
        self._options = onnxruntime.RunOptions()
        self._options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, output_names: Any, feeds: Any, run_options: Optional[Any] = None) -> Any:
        return self._session.run(output_names, feeds, run_options or self._options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class PiperEngine(SentenceTTS):
    name = "piper"
    # espeak phonemes (stress marks and word spaces included) per second at speed 1: 17.7-20.3
    # measured on en_US-joe-medium.
    UNITS_PER_SECOND = 15.0
    MAX_CALL_UNITS = 400

    Settings = PiperConfig
    config: PiperConfig
    # Set by load (SentenceTTS.__init__ takes the config).
    _voice: Any = None
    voice_language = ""
    model_sample_rate = 0
    _base_length_scale = 1.0

    def _load_model(self, device: str) -> None:
        onnx = Path(self.config.voice)
        meta = onnx.with_name(onnx.name + ".json")
        missing = [str(p) for p in (onnx, meta) if not p.is_file()]
        if missing:
            raise ModelMissingError(f"Piper voice missing: {', '.join(missing)} (s2s-models bundled)")
        import onnxruntime
        from piper import PiperVoice

        use_cuda = device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        if device.startswith("cuda") and not use_cuda:
            raise RuntimeError("CUDA requested but onnxruntime has no CUDAExecutionProvider")
        # download_dir: only non-English frontends download anything; keep it off the cwd.
        self._voice = PiperVoice.load(onnx, config_path=meta, use_cuda=use_cuda, download_dir=onnx.parent)
        if not use_cuda:
            self._voice.session = _ShrinkingSession(self._voice.session)
        self.model_sample_rate = int(self._voice.config.sample_rate)
        meta_json = json.loads(meta.read_text(encoding="utf-8"))
        self._base_length_scale = float(meta_json.get("inference", {}).get("length_scale", 1.0))
        self.voice_language = str(meta_json.get("language", {}).get("code", ""))
        self._synth_float("Ready.", "en", 1.0)  # warm the ONNX session

    def languages(self) -> Tuple[str, ...]:
        """The voice's own language (en for en_US-joe): what it can really speak, so clients (the
        page) know before the first refusal that Chinese will not be spoken."""
        lang = self.voice_language.split("_")[0]
        return (lang,) if lang in SPOKEN_LANGUAGES else ("en",)

    def _prepare(self, text: str, language: str) -> str:
        """Drop CJK characters unless the voice speaks a CJK language: the English fallback voice
        speaks the Latin words of a Chinese reply, and a Chinese-only sentence is reported as
        unspeakable (bad_text) instead of being read out as "Chinese letter" noise."""
        if self.voice_language.split("_")[0] in ("zh", "ja", "ko"):
            return text
        return re.sub(r"\s+", " ", _CJK.sub(" ", text)).strip()

    def _phonemes(self, text: str) -> int:
        return sum(len(p) for p in self._voice.phonemize(text))

    def _calls(self, sentence: str, language: str, speed: float) -> List[str]:
        """The prepared sentence, cut at words into calls of at most `call_budget(speed)` espeak
        phonemes (a word over it alone is halved)."""
        text = self._prepare(sentence, language)
        budget = self.call_budget(speed)
        if self._phonemes(text) <= budget:
            return [text]
        return pack(text.split(), self._phonemes, budget)

    def _synth_float(self, call: str, language: str, speed: float) -> Tuple[np.ndarray, int]:
        from piper import SynthesisConfig

        sentence = call
        syn = SynthesisConfig(length_scale=self._base_length_scale / speed)
        parts = [c.audio_float_array for c in self._voice.synthesize(sentence, syn_config=syn)]
        x = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        return x.astype(np.float32), self.model_sample_rate

    def info(self) -> EngineInfo:
        return self._info({"voice": str(self.config.voice)}, voice_language=self.voice_language,
                          model_sample_rate=self.model_sample_rate)
