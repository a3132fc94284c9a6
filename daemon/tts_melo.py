"""MeloTTS (Chinese with English words mixed in) as a TTSEngine: offline, sentence streaming,
PCM16 mono at `tts.sample_rate` (24 kHz).

The real `melo` package does the work: `melo.api.TTS` loads config.json + checkpoint.pth,
`melo.utils.get_text_for_tts_infer` runs its text frontend (normaliser, g2p, BERT features)
and `SynthesizerTrn.infer` the model. We do not call `TTS.tts_to_file`, because it prints,
re-splits the text and empties the CUDA cache on every call; instead each sentence goes
through the same two calls on our single device worker. Before melo is imported,
daemon.melo_offline points it at local HF/NLTK directories with the hub switched off.

`SentenceTTS` is the shared machinery (validation, splitting, one worker thread, streaming,
CUDA->fallback_device retry, silence trim, resampling); PiperEngine uses it too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from daemon import audio, devices, textsplit
from daemon.engines import Capabilities, EngineInfo, Fallback
from daemon.rules import LANGUAGES, check_speed
from daemon.errors import EngineError, ErrorCode, ModelMissingError, S2SError, TextError, UnsupportedError

logger = logging.getLogger(__name__)

# Silence kept at each end of a sentence's audio.
MAX_EDGE_SILENCE_S = 0.1
# Anything below this fraction of the peak (-40 dB) counts as silence when trimming.
SILENCE_REL = 0.01


def trim_silence(x: np.ndarray, sr: int, keep_s: float = MAX_EDGE_SILENCE_S) -> np.ndarray:
    """Cut leading/trailing silence down to at most keep_s seconds each side."""
    if x.size == 0:
        return x
    mag = np.abs(x)
    peak = float(mag.max())
    if peak <= 1e-4:
        return x[: int(keep_s * sr)]  # all silence: a short gap, not seconds of nothing
    loud = np.flatnonzero(mag > peak * SILENCE_REL)
    keep = int(keep_s * sr)
    start = max(0, int(loud[0]) - keep)
    end = min(x.size, int(loud[-1]) + 1 + keep)
    return x[start:end]


def _normalise_language(language: Optional[str]) -> str:
    lang = (language or "zh").strip().lower().replace("_", "-").split("-")[0]
    if lang not in LANGUAGES:
        raise UnsupportedError(f"language {language!r} is not supported (use zh, en or auto)")
    return lang


class SentenceTTS:
    """Shared engine machinery. Subclasses implement `_load_model(device)` and
    `_synth_float(sentence, language, speed) -> (float32 audio, sample_rate)`, and may
    override `_prepare(text, language)` and `_speakable(text)`."""

    name = "base"

    def __init__(self, sample_rate: int, speed: float, max_text_chars: int, max_sentence_chars: int,
                 device: str, fallback_device: str):
        self.sample_rate = int(sample_rate)
        self.speed = float(speed)
        self.max_text_chars = int(max_text_chars)
        self.max_sentence_chars = int(max_sentence_chars)
        self.requested_device = device
        self.fallback_device = fallback_device
        self.device = "cpu"
        self.fallbacks: List[Fallback] = []
        self.loaded = False
        self.load_seconds = 0.0
        self.sentences_synthesized = 0
        self._worker_ident: Optional[int] = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"tts-{self.name}", initializer=self._mark_worker)
        self._load_lock = threading.Lock()

    # --- worker -----------------------------------------------------------------

    def _mark_worker(self) -> None:
        self._worker_ident = threading.get_ident()

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run fn on this engine's single device worker thread."""
        return self._executor.submit(fn, *args, **kwargs)

    def _on_worker(self, fn: Any, *args: Any) -> Any:
        # Already on the worker (a caller used submit(engine.synthesize, ...)): run inline,
        # waiting on our own single thread would deadlock.
        if threading.get_ident() == self._worker_ident:
            return fn(*args)
        return self.submit(fn, *args).result()

    # --- lifecycle ----------------------------------------------------------------

    def load(self) -> None:
        """Load the model on the configured device (on the worker thread); a CUDA failure
        moves to fallback_device once. Idempotent."""
        with self._load_lock:
            if not self.loaded:
                self._on_worker(self._load)

    def _load(self) -> None:
        t0 = time.monotonic()
        choice = devices.resolve(self.requested_device, "float32", what=f"tts.{self.name}")
        if choice.fallback_reason:
            self._record_fallback(self.requested_device, choice.device, choice.fallback_reason, "load")
        try:
            self._load_model(choice.device)
            self.device = choice.device
        except (ModelMissingError, S2SError):
            raise
        except Exception as e:
            if not choice.is_cuda or self.fallback_device == choice.device:
                raise EngineError(f"{self.name}: load on {choice.device} failed: {e}") from e
            logger.warning("tts.%s: load on %s failed (%s); falling back to %s",
                           self.name, choice.device, e, self.fallback_device)
            self._record_fallback(choice.device, self.fallback_device, str(e), "load")
            self._load_model(self.fallback_device)
            self.device = self.fallback_device
        self.loaded = True
        self.load_seconds = time.monotonic() - t0
        logger.info("tts.%s: loaded on %s in %.1f s", self.name, self.device, self.load_seconds)

    def _record_fallback(self, src: str, dst: str, reason: str, when: str) -> None:
        self.fallbacks.append(Fallback("tts.device", src, dst, reason, when))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    # --- text ------------------------------------------------------------------------

    def _speakable(self, text: str) -> bool:
        return textsplit.is_speakable(text)

    def _prepare(self, text: str, language: str) -> str:
        return text

    def sentences(self, text: str, language: str = "zh") -> List[str]:
        """Validate text and split it into the sentences that will be synthesised.

        Raises TextError (bad_text) for non-text, empty, unspeakable or too long input.
        Sentences with nothing speakable are skipped when others remain.
        """
        if not isinstance(text, str):
            raise TextError(f"text must be a string, got {type(text).__name__}")
        if len(text) > self.max_text_chars:
            raise TextError(f"text is {len(text)} characters; the limit is {self.max_text_chars} "
                            f"(limits.max_text_chars)", limit=self.max_text_chars)
        if not text.strip():
            raise TextError("text is empty")
        pieces = textsplit.split_sentences(text, self.max_sentence_chars)
        out = [s for s in pieces if self._speakable(self._prepare(s, language))]
        if not out:
            raise TextError(f"nothing speakable in the text ({text[:40]!r}): only punctuation, "
                            f"symbols or characters this voice cannot pronounce")
        if len(out) < len(pieces):
            logger.info("tts.%s: skipped %d unspeakable sentence(s)", self.name, len(pieces) - len(out))
        return out

    def _check_speed(self, speed: Optional[float]) -> float:
        return check_speed(self.speed if speed is None else speed)

    # --- synthesis -------------------------------------------------------------------

    def synthesize_stream(self, text: str, language: str = "zh",
                          speed: Optional[float] = None) -> Iterator[Tuple[int, str, bytes]]:
        """Yield (index, sentence, PCM16 bytes) per sentence; each sentence is synthesised
        only when the consumer asks for it, so the first chunk is ready after one sentence."""
        if not self.loaded:
            raise S2SError(f"tts.{self.name} is not loaded", code=ErrorCode.UNAVAILABLE)
        lang = _normalise_language(language)
        spd = self._check_speed(speed)
        for i, sentence in enumerate(self.sentences(text, lang)):
            yield i, sentence, self._on_worker(self._synth_pcm, sentence, lang, spd)

    def synthesize(self, text: str, language: str = "zh", speed: Optional[float] = None) -> bytes:
        """The whole text as one PCM16 buffer (the concatenation of the stream's chunks)."""
        return b"".join(chunk for _, _, chunk in self.synthesize_stream(text, language, speed))

    async def synthesize_async(self, text: str, language: str = "zh", speed: Optional[float] = None) -> bytes:
        return await asyncio.wrap_future(self.submit(self.synthesize, text, language, speed))

    def _synth_pcm(self, sentence: str, language: str, speed: float) -> bytes:
        """On the worker: one sentence -> trimmed, resampled, peak-safe PCM16."""
        try:
            x, sr = self._synth_float(sentence, language, speed)
        except (S2SError, MemoryError):
            raise
        except Exception as e:
            if not (self.device.startswith("cuda") and devices.is_cuda_error(e)) or self.device == self.fallback_device:
                logger.exception("tts.%s: synthesis failed for %r", self.name, sentence[:40])
                raise EngineError(f"{self.name}: synthesis failed: {e}") from e
            logger.warning("tts.%s: CUDA error on %s (%s); moving to %s", self.name, self.device, e,
                           self.fallback_device)
            self._record_fallback(self.device, self.fallback_device, str(e), "synthesis")
            self._move_to(self.fallback_device)
            self.device = self.fallback_device
            x, sr = self._synth_float(sentence, language, speed)
        x = np.nan_to_num(np.asarray(x, dtype=np.float32).reshape(-1))
        x = trim_silence(x, sr)
        x = audio.resample(x, sr, self.sample_rate)
        self.sentences_synthesized += 1
        return audio.float_to_pcm16(x)

    # --- subclass hooks ----------------------------------------------------------------

    def _load_model(self, device: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _synth_float(self, sentence: str, language: str, speed: float) -> Tuple[np.ndarray, int]:  # pragma: no cover
        raise NotImplementedError

    def _move_to(self, device: str) -> None:
        self._load_model(device)

    def languages(self) -> Tuple[str, ...]:
        return ("zh", "en", "auto")

    def _info(self, models: Dict[str, str], **details: Any) -> EngineInfo:
        return EngineInfo(
            kind="tts", engine=self.name, device=self.device, requested_device=self.requested_device,
            dtype="float32", sample_rate=self.sample_rate,
            capabilities=Capabilities(streaming=True, languages=self.languages()), loaded=self.loaded,
            models=models, fallbacks=tuple(self.fallbacks),
            details={"fallback_device": self.fallback_device, "speed": self.speed,
                     "max_text_chars": self.max_text_chars, "load_seconds": round(self.load_seconds, 3),
                     "sentences_synthesized": self.sentences_synthesized, **details})


@dataclass(frozen=True)
class MeloConfig:
    model_dir: Path
    hf_home: Path
    nltk_data: Path
    device: str = "cpu"
    fallback_device: str = "cpu"
    language: str = "ZH"
    speed: float = 1.0
    sample_rate: int = 24000
    max_text_chars: int = 2000
    max_sentence_chars: int = textsplit.DEFAULT_MAX_CHARS
    # melo's own defaults (TTS.tts_to_file).
    sdp_ratio: float = 0.2
    noise_scale: float = 0.6
    noise_scale_w: float = 0.8

    @classmethod
    def from_config(cls, cfg: Any) -> "MeloConfig":
        """From daemon.config.Config: tts.* and limits.max_text_chars, paths via cfg.model_path."""
        t = cfg.tts
        return cls(
            model_dir=cfg.model_path(t.melo.model), hf_home=cfg.model_path(t.melo.hf_home),
            nltk_data=cfg.model_path(t.melo.nltk_data), device=t.device, fallback_device=t.fallback_device,
            language=t.language, speed=t.speed, sample_rate=t.sample_rate,
            max_text_chars=cfg.limits.max_text_chars)


class MeloTTSEngine(SentenceTTS):
    """MeloTTS through the real `melo` code, offline. Synthesis is deterministic per
    sentence (the model's noise is drawn from a generator seeded by the sentence text)."""

    name = "melo"

    def __init__(self, config: Any):
        if not isinstance(config, MeloConfig):
            config = MeloConfig.from_config(config)
        self.config = config
        super().__init__(config.sample_rate, config.speed, config.max_text_chars, config.max_sentence_chars,
                         config.device, config.fallback_device)
        self._tts: Any = None
        self._utils: Any = None
        self._speaker_id = 0
        self.model_sample_rate = 0
        self.shims: List[str] = []

    # --- load ---------------------------------------------------------------------------

    def _check_files(self) -> None:
        d = Path(self.config.model_dir)
        missing = [str(d / f) for f in ("config.json", "checkpoint.pth") if not (d / f).is_file()]
        if missing:
            raise ModelMissingError(f"MeloTTS model missing: {', '.join(missing)} (s2s-models fetch)")

    def _load_model(self, device: str) -> None:
        self._check_files()
        from daemon import melo_offline

        api = melo_offline.import_melo(self.config.hf_home, self.config.nltk_data)
        self.shims = sorted(n for n in melo_offline.SHIMS if getattr(sys.modules.get(n), "__s2s_shim__", False))
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

    def _synth_float(self, sentence: str, language: str, speed: float) -> Tuple[np.ndarray, int]:
        return self._infer(self._prepare(sentence, language), speed, self.device), self.model_sample_rate

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
