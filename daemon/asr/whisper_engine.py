"""Whisper engine (faster-whisper / CTranslate2): the rollback ASR, with the same VAD endpointing
as FunASR (daemon/asr/vad.py) and the same event format.

- Partials (`asr.whisper.partial_interval`, 0 = none): Whisper has no streaming decoder, so
  while the VAD says speech goes on, every interval of new speech the session asks for a cheap
  decode of the utterance so far (`PartialDecode`: greedy, a window of the speech + 3 s, at least
  10 s, instead of 30 s: ~5x less CPU, the same text on the fixtures). The pool answers those
  after every final of the round and only while the worker has room (its recent busy fraction
  under PARTIAL_MAX_LOAD and no other session's feed waiting); otherwise they are skipped.
- Language: "zh", "en", or "auto" (Whisper detects per utterance).
- Mandarin: Whisper writes traditional characters; finals in zh (given or detected) are folded
  to simplified with OpenCC's "t2s" (opencc-python-reimplemented).
- Hotwords: not supported; a session asking for them gets UnsupportedError. faster-whisper's
  `hotwords=` is only a decoder prompt, and on the fixtures it did not make Whisper base write
  浇水 for 浇水 (it still wrote 椒水) while it changed other characters: a prompt that does not
  do what the word "hotwords" promises is worse than a clear refusal.
- Device: CPU uses int8 (config `compute_type`); CUDA uses float16 (or float32 when asked).
  A CUDA error at load or inference reloads the model on the CPU once, logged and reported.
- Finals decode in an encoder window fitted to the utterance (at least 10 s,
  FINAL_MIN_WINDOW_SECONDS) instead of Whisper's 30 s: ~3x faster on the CPU, as accurate.
- Concurrency: utterances of several sessions that are due together (PoolBase.run_requests)
  are decoded in one batched beam search (`WhisperPool.decode_requests`), each as it would be
  alone: the same window, prompt, options and no-speech rule, so the same text.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Generator, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np

from daemon import devices
from daemon.engines import Capabilities, EngineInfo, FinalEvent, PartialEvent
from daemon.rules import LANGUAGES
from daemon.serving.workers import extend_budget
from daemon.config import WhisperModels
from daemon.asr.base import ASRSettings, Decode, PoolBase, SentenceEnd, Steps, StreamingEngine
from daemon.asr.end_mark import EndMarkScorer
from daemon.asr.load import LOAD_WINDOW_SECONDS
from daemon.asr.vad import SAMPLE_RATE, FsmnVAD, require_dir

logger = logging.getLogger(__name__)

CPU_COMPUTE_TYPES = ("int8", "float32", "default")
# How much longer than its budget a call that reloads the model on the CPU may run.
RELOAD_BUDGET_SECONDS = 120.0


# One decode pass per utterance: faster-whisper's default re-decodes at rising temperatures when a
# pass looks poor, which made 2.4 s of English heard as zh take 5-14 s and stall every session on
# the worker. With beam 5 a single pass was as accurate here (BENCHMARKS.md, "Whisper fallback").
DECODE_TEMPERATURE = 0.0
# Finals decode with Whisper's timestamp tokens (its training format, faster-whisper's default)
# and END_PAD_SECONDS of silence after the utterance (the VAD's end is tight on the last word):
# on the Mandarin fixtures, Whisper base's CER 8.5 % -> 4.2 %, the same as wyoming-faster-whisper
# on the same model (BENCHMARKS.md, "Whisper finals"). Partials stay without timestamps (greedy,
# short, cheap).
FINAL_TIMESTAMPS = True
END_PAD_SECONDS = 0.5
# faster-whisper's defaults for that pass (WhisperModel.transcribe), named because the batched
# pass (WhisperPool._decode_batch) calls CTranslate2 itself and must decode as the single one.
PATIENCE = 1.0
LENGTH_PENALTY = 1.0
MAX_INITIAL_TIMESTAMP = 1.0
# A window is silent (no text) when Whisper's no-speech probability is above this and the
# decode's average log-probability is not above LOG_PROB_THRESHOLD.
NO_SPEECH_THRESHOLD = 0.6
LOG_PROB_THRESHOLD = -1.0

# Partials (PartialDecode). Skipped while the worker was busier than this over the last
# LOAD_WINDOW_SECONDS (its own measure, `WhisperPool.recent_load`) or another session's feed waits.
PARTIAL_MAX_LOAD = 0.5
# A partial's encoder window: the speech so far plus PARTIAL_PAD_SECONDS, at least
# PARTIAL_MIN_WINDOW_SECONDS (shorter windows made Whisper base loop on 1-2 s of speech), rounded
# up to WINDOW_STEP_SECONDS so partials of similar length share one batched decode.
PARTIAL_PAD_SECONDS = 3.0
PARTIAL_MIN_WINDOW_SECONDS = 10.0
WINDOW_STEP_SECONDS = 5.0
# A final's (and a tentative's) encoder window: the end-padded utterance, at least
# FINAL_MIN_WINDOW_SECONDS, rounded up as a partial's; at most Whisper's 30 s. Whisper's own 30 s
# window was most of a short utterance's decode on the CPU (base, int8, 2 threads: the encoder
# alone 820 ms for 30 s, 80 ms for 10 s; a 3 s Mandarin utterance ~1.05 s -> ~0.3 s), and the
# text stayed as good: CER over 33 Mandarin clips (9 fixtures + 24 Kokoro sentences, streamed)
# 12.1 % -> 11.1 % with speculation's pause, 10.2 % -> 11.3 % at the VAD's end: a few characters
# either way (BENCHMARKS.md, "Whisper's encoder window").
FINAL_MIN_WINDOW_SECONDS = 10.0
# Its text is bounded by the speech's length, and greedy decoding may not repeat a 3-gram (the
# loop a truncated window can fall into).
PARTIAL_TOKENS_PER_SECOND = 12
PARTIAL_NO_REPEAT_NGRAM = 3
# A final's text is bounded by its speech too, more loosely (fast Mandarin is ~7 characters a
# second, a token or two each, plus timestamps): a window of near-silence the VAD let through made
# Whisper base loop to its 448-token limit (3 s of zeros: 223 characters of 对我对我..., ~2-4 s of
# the worker), which any client can send.
FINAL_TOKENS_PER_SECOND = 20

T = TypeVar("T")


@dataclass
class PartialDecode(Decode):
    """The utterance so far, for a partial: answered (text, language) after the round's finals
    with a cheap decode, or None when the worker has no room for it."""


@dataclass(frozen=True, kw_only=True)
class WhisperConfig(ASRSettings):
    model_dir: Path
    compute_type: str = WhisperModels.compute_type
    beam_size: int = WhisperModels.beam_size
    ncpu: int = 2
    partial_interval: float = 0.0  # seconds of new speech between partials; 0: none

    @classmethod
    def from_config(cls, cfg: Any) -> "WhisperConfig":
        w = cfg.asr.whisper
        return cls(model_dir=cfg.model_path(w.model), compute_type=w.compute_type, beam_size=w.beam_size,
                   partial_interval=w.partial_interval if cfg.asr.partials else 0.0,
                   **ASRSettings.of(cfg, "whisper", w.vad))

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


def _end_pad(audio: np.ndarray) -> np.ndarray:
    """The utterance with END_PAD_SECONDS of silence after it (see FINAL_TIMESTAMPS)."""
    return np.concatenate([audio, np.zeros(int(END_PAD_SECONDS * SAMPLE_RATE), dtype=np.float32)])


def _final_text(texts: Sequence[str], lang: str) -> str:
    """A window's text pieces -> the final's text: joined (without spaces in zh), folded to
    simplified in zh."""
    text = ("" if lang == "zh" else " ").join(t.strip() for t in texts).strip()
    return to_simplified(text) if lang == "zh" else text


class WhisperPool(PoolBase):
    name = "whisper"
    config: WhisperConfig

    def __init__(self, config: WhisperConfig):
        super().__init__(config)
        self.compute_type = ""
        self._model: Any = None
        self._end_marks: Optional[EndMarkScorer] = None  # the turn judge's text signal (lazily)
        self._load, self._load_at = 0.0, time.monotonic()
        self.partial_counts = {"decoded": 0, "skipped": 0}

    def load(self) -> None:
        c = self.config
        require_dir(c.model_dir, "whisper", marker="model.bin")
        require_dir(c.vad_dir, "fsmn-vad")
        t0 = time.monotonic()
        self.vad = FsmnVAD(c.vad_dir, ncpu=1)  # torch's threads, for small calls: one (devices.AUTO_THREADS)
        self.vad.load()
        devices.load_with_fallback(c.device, c.dtype, "asr.whisper", self._load_model,
                                   lambda src, dst, why: self._note_fallback(src, dst, why, "load"))
        self._loaded = True
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
        return self._guarded("recognition", self._transcribe, audio, language)

    def _guarded(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args); after a CUDA error reload Whisper on the CPU once and retry. Other failures
        are logged and raised as EngineError."""
        def to_cpu() -> None:
            extend_budget(RELOAD_BUDGET_SECONDS)  # a model reload is a legitimately long call
            self._load_model("cpu", "float32")

        return devices.run_with_fallback(lambda: fn(*args), self.name, what, self.device, "cpu", to_cpu,
                                         lambda why: self._note_fallback(self.device, "cpu", why, "recognition"))

    def _transcribe(self, audio: np.ndarray, language: str) -> Tuple[str, str]:
        segments, info = self._model.transcribe(
            _end_pad(audio), language=None if language == "auto" else language, beam_size=self.config.beam_size,
            patience=PATIENCE, length_penalty=LENGTH_PENALTY, max_initial_timestamp=MAX_INITIAL_TIMESTAMP,
            no_speech_threshold=NO_SPEECH_THRESHOLD, log_prob_threshold=LOG_PROB_THRESHOLD,
            vad_filter=False, condition_on_previous_text=False, without_timestamps=not FINAL_TIMESTAMPS,
            temperature=DECODE_TEMPERATURE)
        lang = info.language if language == "auto" else language
        return _final_text([s.text for s in segments], lang), lang

    def run_requests(self, reqs: Sequence[Any]) -> Iterator[Tuple[int, Any]]:
        """PoolBase's, with partials answered last (after every final of the round), and only
        while the worker has room; the time spent is the worker's measured load."""
        t0 = time.monotonic()
        try:
            partial = [i for i, r in enumerate(reqs) if isinstance(r, PartialDecode)]
            rest = [i for i, r in enumerate(reqs) if not isinstance(r, PartialDecode)]
            if rest:
                for j, answer in super().run_requests([reqs[i] for i in rest]):
                    yield rest[j], answer
            if partial:
                self._busy(time.monotonic() - t0)  # the round's finals count before partials are judged
                t0 = time.monotonic()
                yield from zip(partial, self._partial_requests([reqs[i] for i in partial]), strict=True)
        finally:
            self._busy(time.monotonic() - t0)

    def _busy(self, seconds: float) -> None:
        now = time.monotonic()
        # At most 1 (always busy): one long decode must not hold partials off for many windows.
        self._load = min(1.0, self._load * math.exp(-(now - self._load_at) / LOAD_WINDOW_SECONDS)
                         + seconds / LOAD_WINDOW_SECONDS)
        self._load_at = now

    @property
    def recent_load(self) -> float:
        """Busy fraction of the worker's model work, decayed over LOAD_WINDOW_SECONDS."""
        return self._load * math.exp(-(time.monotonic() - self._load_at) / LOAD_WINDOW_SECONDS)

    def _partial_requests(self, reqs: List[PartialDecode]) -> List[Any]:
        """(text, language) of each, or None: skipped (no room), or failed (logged; a partial
        is optional, the final decides)."""
        if self.recent_load > PARTIAL_MAX_LOAD or self.feeds_waiting() or not self._model.model.is_multilingual:
            self.partial_counts["skipped"] += len(reqs)
            return [None] * len(reqs)
        by_window: Dict[int, List[int]] = {}
        for i, r in enumerate(reqs):
            by_window.setdefault(self._partial_frames(r.audio.size), []).append(i)
        answers: List[Any] = [None] * len(reqs)
        t0 = time.monotonic()
        for frames, idx in sorted(by_window.items()):
            try:
                texts = self._guarded("partial recognition", self._decode_batch, [reqs[i] for i in idx], frames, True)
            except Exception:  # noqa: BLE001 - logged by _guarded
                continue
            for i, answer in zip(idx, texts, strict=True):
                answers[i] = answer
            self.partial_counts["decoded"] += len(idx)
        logger.debug("whisper: %d partial(s) in %.2f s", len(reqs), time.monotonic() - t0)
        return answers

    def _partial_frames(self, samples: int) -> int:
        """A partial's encoder window in mel frames (see PARTIAL_PAD_SECONDS)."""
        return self._window_frames(samples / SAMPLE_RATE + PARTIAL_PAD_SECONDS, PARTIAL_MIN_WINDOW_SECONDS)

    def _final_frames(self, samples: int) -> int:
        """A final's encoder window in mel frames (see FINAL_MIN_WINDOW_SECONDS)."""
        return self._window_frames(samples / SAMPLE_RATE + END_PAD_SECONDS, FINAL_MIN_WINDOW_SECONDS)

    def _window_frames(self, seconds: float, at_least: float) -> int:
        """An encoder window of `seconds`, at least `at_least`, rounded up to WINDOW_STEP_SECONDS
        (utterances of similar length share one batched decode), at most Whisper's 30 s."""
        fe = self._model.feature_extractor
        per_second = SAMPLE_RATE / fe.hop_length
        step = WINDOW_STEP_SECONDS * per_second
        want = max(seconds, at_least) * per_second
        return min(int(math.ceil(want / step) * step), fe.nb_max_frames)

    def decode_request(self, req: Decode) -> Tuple[str, str]:
        return self.transcribe(req.audio, req.language)

    def sentence_end_request(self, req: SentenceEnd) -> Any:
        """With the audio (the turn judge's question): P(a sentence-end mark follows the words)
        from the decoder itself (daemon/asr/end_mark.py), on the utterance end-padded in a
        final's encoder window (the thresholds were measured so); else the text's own mark."""
        language = req.language if req.language and req.language != "auto" else self.config.language
        if req.audio is None or not req.audio.size or not EndMarkScorer.supports_language(language):
            return super().sentence_end_request(req)
        return self._guarded("sentence end", self._end_mark, req.audio, req.text, language)

    def _end_mark(self, audio: np.ndarray, text: str, language: str) -> Optional[float]:
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.tokenizer import Tokenizer

        model = self._model
        if self._end_marks is None or self._end_marks.model is not model:  # (reloaded on the CPU)
            self._end_marks = EndMarkScorer(model, lambda lang: Tokenizer(model.hf_tokenizer, True,
                                                                          task="transcribe", language=lang))
        fe = model.feature_extractor
        padded = _end_pad(audio)[-fe.n_samples:]  # the last 30 s at most: what the sentence ends on
        mel = fe(padded)
        frames = self._final_frames(padded.size - int(END_PAD_SECONDS * SAMPLE_RATE))
        encoded = model.encode(pad_or_trim(mel[:, :mel.shape[-1] - 1], frames))
        return self._end_marks.score(encoded, [text], language)[0]

    def decode_requests(self, reqs: List[Decode]) -> List[Any]:
        """Utterances that fit one window by `_decode_batch`, those of one encoder window
        (`_final_frames`) in one batched pass; a longer one by `transcribe` (window by window).
        If a batch fails, each of it alone, so a failure stays its own."""
        fe = self._model.feature_extractor
        fits = [i for i, r in enumerate(reqs) if _end_pad(r.audio).size <= fe.n_samples] \
            if self._model.model.is_multilingual else []
        by_window: Dict[int, List[int]] = {}
        for i in fits:
            by_window.setdefault(self._final_frames(reqs[i].audio.size), []).append(i)
        answers: Dict[int, Any] = {}
        for i in fits:
            if reqs[i].audio.size == 0 and reqs[i].language != "auto":
                answers[i] = ("", reqs[i].language)  # no audio, no words (a short window may loop on silence)
        for frames, idx in sorted(by_window.items()):
            idx = [i for i in idx if i not in answers]
            if not idx:
                continue
            if len(idx) > 1:
                try:
                    texts = self._guarded(f"recognition of {len(idx)} utterances together", self._decode_batch,
                                          [reqs[i] for i in idx], frames)
                    answers.update(zip(idx, texts, strict=True))
                    continue
                except Exception:  # noqa: BLE001 - logged by _guarded; each alone below
                    pass
            for i in idx:
                answers[i] = self._decode_alone(reqs[i], frames)
        alone = [i for i in range(len(reqs)) if i not in answers]
        answers.update(zip(alone, super().decode_requests([reqs[i] for i in alone]), strict=True))
        return [answers[i] for i in range(len(reqs))]

    def _decode_alone(self, req: Decode, frames: int) -> Any:
        """One utterance by `_decode_batch`: (text, language), or the exception it raised."""
        try:
            return self._guarded("recognition", self._decode_batch, [req], frames)[0]
        except Exception as e:  # noqa: BLE001 - logged by _guarded; this utterance's own failure
            return e

    def _decode_batch(self, reqs: Sequence[Decode], frames: int = 0, partial: bool = False) -> List[Tuple[str, str]]:
        """(text, language) of each utterance (one window each), decoded as faster-whisper's
        sequential path (`_transcribe`) decodes its first window, but in an encoder window of
        `frames` mel frames (0: Whisper's 30 s; see FINAL_MIN_WINDOW_SECONDS) and all in one beam
        search (on CUDA one encode as well), each item as it would be alone; "auto" detects each
        language from the encoder output, as faster-whisper's BatchedInferencePipeline does.
        `partial`: partials, greedy and without timestamps (see PARTIAL_PAD_SECONDS)."""
        import ctranslate2
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        model = self._model
        fe = model.feature_extractor
        window = frames or fe.nb_max_frames
        content, mels = [], []
        timestamps = FINAL_TIMESTAMPS and not partial
        for r in reqs:
            mel = fe(r.audio if partial else _end_pad(r.audio))
            n = mel.shape[-1] - 1  # faster-whisper's content frames: the last one is padding
            if n > window:
                raise ValueError(f"{r.audio.size / SAMPLE_RATE:.1f} s is more than its window")
            content.append(n)
            mels.append(pad_or_trim(mel[:, :n], window))
        if self.device.startswith("cuda"):
            encoded = model.encode(np.stack(mels))
        else:
            # One window at a time: on the CPU a stacked batch of 4 took ~15% longer than its
            # windows one by one (base, int8, 2 threads); the outputs are the same either way.
            stacked = np.concatenate([np.asarray(model.encode(m)) for m in mels])
            encoded = ctranslate2.StorageView.from_array(stacked)
        langs = [r.language for r in reqs]
        if "auto" in langs:
            detected = model.model.detect_language(encoded)  # per item: [(token, probability)], best first
            langs = [d[0][0][2:-2] if lang == "auto" else lang for lang, d in zip(langs, detected, strict=True)]
        tokenizers = {lang: Tokenizer(model.hf_tokenizer, True, task="transcribe", language=lang)
                      for lang in set(langs)}
        tokenizer = tokenizers[langs[0]]
        max_length, beam, no_repeat = model.max_length, self.config.beam_size, 0
        longest = max(r.audio.size for r in reqs) / SAMPLE_RATE
        max_length = min(max_length, int(10 + FINAL_TOKENS_PER_SECOND * longest))
        if partial:
            max_length = min(max_length, int(10 + PARTIAL_TOKENS_PER_SECOND * longest))
            beam, no_repeat = 1, PARTIAL_NO_REPEAT_NGRAM
        # DECODE_TEMPERATURE 0 is a beam search: faster-whisper passes no sampling options then.
        results = model.model.generate(
            encoded, [model.get_prompt(tokenizers[lang], [], without_timestamps=not timestamps) for lang in langs],
            beam_size=beam, patience=PATIENCE, length_penalty=LENGTH_PENALTY,
            repetition_penalty=1.0, no_repeat_ngram_size=no_repeat, max_length=max_length,
            return_scores=True, return_no_speech_prob=True, suppress_blank=True,
            suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
            max_initial_timestamp_index=int(round(MAX_INITIAL_TIMESTAMP / model.time_precision)))
        out = []
        for n, lang, res in zip(content, langs, results, strict=True):
            tokens = res.sequences_ids[0]
            avg_logprob = res.scores[0] * len(tokens) ** LENGTH_PENALTY / (len(tokens) + 1)
            silent = res.no_speech_prob > NO_SPEECH_THRESHOLD and not avg_logprob > LOG_PROB_THRESHOLD
            out.append((_final_text([] if n == 0 or silent else [tokenizer.decode(tokens)], lang), lang))
        return out

    def capabilities(self) -> Capabilities:
        return Capabilities(partials=self.config.partial_interval > 0, hotwords=False, punctuation=True,
                            languages=LANGUAGES)

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
            models={"whisper": str(c.model_dir), "vad": str(c.vad_dir)}, fallbacks=tuple(self.fallbacks),
            details={"compute_type": self.compute_type, "partials_decoded": self.partial_counts["decoded"],
                     "partials_skipped": self.partial_counts["skipped"]})


class WhisperEngine(StreamingEngine):
    """One Whisper session; `final` events carry `language` as well."""

    supports_partials = True
    pool: WhisperPool

    def __init__(self, pool: Union[WhisperPool, WhisperConfig], session_id: str = "default",
                 language: Optional[str] = None, hotwords: Optional[Sequence[str]] = None,
                 partials: Optional[bool] = None, max_utterance_seconds: Optional[float] = None):
        if isinstance(pool, WhisperConfig):
            standalone = WhisperPool(pool)
            standalone.load()
            pool = standalone
        c = pool.config
        self._interval = int(round(c.partial_interval * SAMPLE_RATE))
        self._partial_at = 0  # the sample up to which the last partial decoded
        super().__init__(pool, session_id, language or c.language,
                         hotwords or (),  # the daemon decides a session's hotwords (asr/sessions.py)
                         (True if partials is None else partials) and self._interval > 0,
                         c.max_utterance_seconds if max_utterance_seconds is None else max_utterance_seconds)
        self.last_language = ""

    def _decode_steps(self, audio: np.ndarray) -> Generator[Any, Any, str]:
        text, self.last_language = yield Decode(audio, (), self.language)
        return str(text)

    def _final_extras(self, final: FinalEvent) -> None:
        final["language"] = self.last_language or self.language

    def _partial_reset(self) -> None:
        self._partial_at = 0

    def _partial_steps(self) -> Steps:
        """Every interval of new speech, the utterance so far as a partial (when the pool has
        room: a skipped one is asked for again at the next feed)."""
        start = self._seg.utterance_start
        end = self._seg.total - self._seg.trailing_silence()  # speech so far: a pause adds nothing to say
        if start is None or end - max(self._partial_at, start) < self._interval:
            return []
        answer = yield PartialDecode(self._seg.audio(start, end), (), self.language)
        if answer is None:
            return []
        self._partial_at = end
        text = str(answer[0])
        if not text.strip():
            return []
        return [PartialEvent(type="partial", text=text, start=self._t(start), end=self._t(end), utterance=self._utt)]
