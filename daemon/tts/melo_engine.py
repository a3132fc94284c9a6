"""MeloTTS (Chinese with English words mixed in) as a TTSEngine: offline, sentence streaming,
PCM16 mono at `tts.sample_rate` (24 kHz).

The real `melo` package does the work: `melo.api.TTS` loads config.json + checkpoint.pth,
`melo.utils.get_text_for_tts_infer` runs its text frontend (normaliser, g2p, BERT features)
and `SynthesizerTrn.infer` the model. We do not call `TTS.tts_to_file`, because it prints,
re-splits the text and empties the CUDA cache on every call; instead each sentence goes
through the same two calls on our single device worker. Before melo is imported,
daemon.tts.melo_offline points it at local HF/NLTK directories with the hub switched off.

The shared machinery (`SentenceTTS`) is in daemon/tts/base.py.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Tuple

import numpy as np

from daemon.tts import textsplit
from daemon.config import Config, TTSConfig
from daemon.engines import EngineInfo
from daemon.errors import ModelMissingError, TextError

from daemon.tts.base import SentenceTTS, TTSSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class MeloConfig(TTSSettings):
    model_dir: Path
    hf_home: Path
    nltk_data: Path
    language: str = TTSConfig.language
    # melo's own defaults (TTS.tts_to_file).
    sdp_ratio: float = 0.2
    noise_scale: float = 0.6
    noise_scale_w: float = 0.8

    @classmethod
    def from_config(cls, cfg: Config) -> "MeloConfig":
        """From daemon.config.Config: tts.melo.* (paths via cfg.model_path), tts.language and the shared settings."""
        m = cfg.tts.melo
        return cls(model_dir=cfg.model_path(m.model), hf_home=cfg.model_path(m.hf_home),
                   nltk_data=cfg.model_path(m.nltk_data), language=cfg.tts.language, **TTSSettings.of(cfg))


class MeloTTSEngine(SentenceTTS):
    """MeloTTS through the real `melo` code, offline. Synthesis is deterministic per
    sentence (the model's noise is drawn from a generator seeded by the sentence text)."""

    name = "melo"
    # Characters of normalised text per second at speed 1 (Mandarin speaks 4-6 syllables a
    # second); the default `_calls` cuts at commas, spaces or between CJK characters.
    UNITS_PER_SECOND = 4.0
    MAX_CALL_UNITS = 100

    Settings = MeloConfig
    config: MeloConfig
    # Set by load (SentenceTTS.__init__ takes the config).
    _tts: Any = None
    _utils: Any = None
    _speaker_id = 0
    model_sample_rate = 0
    shims: Tuple[str, ...] = ()  # melo_offline's stand-ins for modules melo imports

    # --- load ---------------------------------------------------------------------------

    def _check_files(self) -> None:
        d = Path(self.config.model_dir)
        missing = [str(d / f) for f in ("config.json", "checkpoint.pth") if not (d / f).is_file()]
        if missing:
            raise ModelMissingError(f"MeloTTS model missing: {', '.join(missing)} (s2s-models fetch)")

    def _load_model(self, device: str) -> None:
        self._check_files()
        from daemon.tts import melo_offline

        api = melo_offline.import_melo(self.config.hf_home, self.config.nltk_data)
        self.shims = tuple(sorted(n for n in melo_offline.SHIMS if getattr(sys.modules.get(n), "__s2s_shim__", False)))
        import melo.utils

        self._utils = melo.utils
        d = Path(self.config.model_dir)
        tts = api.TTS(language=self.config.language, device=device, config_path=str(d / "config.json"),
                      ckpt_path=str(d / "checkpoint.pth"))
        spk2id = dict(tts.hps.data.spk2id)
        self._speaker_id = int(spk2id.get(self.config.language, next(iter(spk2id.values()))))
        self.model_sample_rate = int(tts.hps.data.sampling_rate)
        self._tts = tts
        self._warm(device)

    def _warm(self, device: str) -> None:
        """Run one short sentence: loads jieba's dictionary, the g2p_en tagger and melo's BERT
        model (kept in module-level dicts that melo fills lazily) now, not on the first request."""
        t0 = time.monotonic()
        self._infer("你好，world。", 1.0, device)
        logger.info("tts.melo: warmed up on %s in %.1f s", device, time.monotonic() - t0)

    def _move_to(self, device: str) -> None:
        self._tts.model.to(device)
        self._tts.device = device
        import melo.text.chinese_bert as cb

        for key, model in list(cb.models.items()):
            cb.models[key] = model.to(device)

    # --- synthesis -----------------------------------------------------------------------

    def _speakable(self, text: str) -> bool:
        return textsplit.melo_speakable(text)

    def _prepare(self, text: str, language: str) -> str:
        text = textsplit.normalize_text(text, "en" if language == "en" else "zh")
        # melo reads "WiFi" better as "Wi Fi" (what TTS.tts_to_file does for ZH_MIX_EN).
        return re.sub(r"([a-z])([A-Z])", r"\1 \2", text)

    def _synth_float(self, call: str, language: str, speed: float) -> Tuple[np.ndarray, int]:
        # `call` is normalised text already (SentenceTTS._calls), within the call budget.
        return self._infer(call, speed, self.device), self.model_sample_rate

    def _infer(self, text: str, speed: float, device: str) -> np.ndarray:
        import torch

        tts = self._tts
        try:
            bert, ja_bert, phones, tones, lang_ids = self._utils.get_text_for_tts_infer(
                text, tts.language, tts.hps, device, tts.symbol_to_id)
        except (AssertionError, KeyError, IndexError, ValueError) as e:
            # melo's g2p asserts on characters it has no pinyin for.
            raise TextError(f"cannot pronounce {text[:40]!r}: {type(e).__name__} in melo's text frontend") from e
        seed = zlib.crc32(text.encode("utf-8"))
        fork_devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
        with torch.no_grad(), torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            out = tts.model.infer(
                phones.to(device).unsqueeze(0), torch.LongTensor([phones.size(0)]).to(device),
                torch.LongTensor([self._speaker_id]).to(device), tones.to(device).unsqueeze(0),
                lang_ids.to(device).unsqueeze(0), bert.to(device).unsqueeze(0), ja_bert.to(device).unsqueeze(0),
                sdp_ratio=self.config.sdp_ratio, noise_scale=self.config.noise_scale,
                noise_scale_w=self.config.noise_scale_w, length_scale=1.0 / speed)
        return out[0][0, 0].detach().float().cpu().numpy()

    def info(self) -> EngineInfo:
        return self._info({"melo": str(self.config.model_dir), "hf_home": str(self.config.hf_home),
                           "nltk_data": str(self.config.nltk_data)},
                          language=self.config.language, model_sample_rate=self.model_sample_rate,
                          speaker_id=self._speaker_id, shims=", ".join(self.shims) if self.shims else None)
