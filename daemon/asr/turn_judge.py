"""The turn judge: is the speech before a pause a finished turn? (issue 24)

At `turn.early_silence` inside an utterance (the speculative-turn pause, daemon/asr/vad.py) the
engine has decoded the utterance so far and sent it as `tentative`. On the session's next feed
the judge weighs three signals and answers one of three verdicts:

- Smart Turn v3.2's P(turn complete) from the audio itself (pipecat's end-of-turn model,
  bundled by daemon/models/smart_turn.py; its code is not used: the Whisper log-mel features
  are computed here). All sessions due in one worker round share one batched ONNX call
  (`TurnCheck` requests, answered by `PoolBase.run_requests` like the VAD blocks).
- The engine's own text signal at the pause (the `SentenceEnd` answer: Whisper's P(a sentence-end
  mark next | the words, the audio), daemon/asr/end_mark.py; FunASR's CT-Transformer label after
  the last word).
- The words: cheap signs of an unfinished Mandarin (or English) sentence, a trailing comma,
  conjunction, preposition, measure word, 的 ... (`unfinished_words`).

`decide()` is the combination, a pure function: `complete` -> the final at once (reason
`turn`); `unfinished` -> the utterance stays open past the VAD's end silence, up to
`turn.max_silence` of silence after the speech (speech again continues the same utterance);
`unsure` -> the VAD's end silence, as without the judge. The silence so far enters as the
ladder itself: complete at the early silence, unsure at the VAD's 0.8 s, unfinished at
max_silence. Thresholds were chosen from `s2s-bench turns` (BENCHMARKS.md).

When the model file is missing or fails to load, or a call fails, the judge is off for the
process: said once in the log and in describe (a Fallback `turn.judge smart-turn -> vad`), and
every session goes on with the VAD's silence (and `turn.sentence_end`'s text rule).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import numpy as np

from daemon.config import TurnConfig

if TYPE_CHECKING:
    from daemon.engines import ASRPool

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
WINDOW_SECONDS = 8  # the model's input: the last 8 s, zero-padded at the front
WINDOW = WINDOW_SECONDS * SAMPLE_RATE
# Audio taken from before the utterance's start (pipecat keeps 500 ms of pre-speech).
PRE_SPEECH = SAMPLE_RATE // 2

COMPLETE, UNFINISHED, UNSURE = "complete", "unfinished", "unsure"
VERDICTS = (COMPLETE, UNFINISHED, UNSURE)


# --- Whisper log-mel features (80 x 800 for 8 s), numpy only ---------------------------------

N_FFT = 400
HOP = 160
N_MELS = 80


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    lin = 3.0 * f / 200.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) * (27.0 / np.log(6.4)), lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((m - 15.0) * (np.log(6.4) / 27.0)), 200.0 * m / 3.0)


def mel_filters() -> np.ndarray:
    """(N_FFT/2+1, N_MELS) triangular filters over 0-8 kHz, area-normalised (Whisper's)."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(SAMPLE_RATE / 2)), N_MELS + 2))
    bins = np.linspace(0, SAMPLE_RATE // 2, N_FFT // 2 + 1)
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    rise = (bins[:, None] - lo[None, :]) / (mid - lo)[None, :]
    fall = (hi[None, :] - bins[:, None]) / (hi - mid)[None, :]
    tri = np.maximum(0.0, np.minimum(rise, fall))
    return tri * (2.0 / (hi - lo))[None, :]


_FILTERS: Optional[np.ndarray] = None
_HANN = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT))  # periodic Hann


def window(audio: np.ndarray) -> np.ndarray:
    """The last WINDOW samples of float audio, zero-padded at the front."""
    x = np.asarray(audio, dtype=np.float32).reshape(-1)[-WINDOW:]
    return np.concatenate([np.zeros(WINDOW - x.size, np.float32), x]) if x.size < WINDOW else x


def features(audios: Sequence[np.ndarray]) -> np.ndarray:
    """(B, 80, 800) float32 log-mel features for B clips (each windowed to the last 8 s): the
    waveform normalised to zero mean and unit variance, a centred 400-point STFT every 160
    samples, power through the mel filters, log10, floored 8 below the clip's peak, (x + 4) / 4."""
    global _FILTERS
    if _FILTERS is None:
        _FILTERS = mel_filters().astype(np.float32)
    x = np.stack([window(a) for a in audios]).astype(np.float32)
    x = (x - x.mean(axis=1, keepdims=True)) / np.sqrt(x.var(axis=1, keepdims=True) + 1e-7)
    pad = N_FFT // 2
    x = np.pad(x, ((0, 0), (pad, pad)), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT, axis=1)[:, ::HOP][:, :-1]  # (B, 800, 400)
    spec = np.fft.rfft(frames * _HANN.astype(np.float32), axis=-1)
    power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)  # (B, 800, 201)
    mel = np.log10(np.maximum(power @ _FILTERS, 1e-10))  # (B, 800, 80)
    mel = np.maximum(mel, mel.max(axis=(1, 2), keepdims=True) - 8.0)
    return np.ascontiguousarray(((mel + 4.0) / 4.0).transpose(0, 2, 1), dtype=np.float32)


# --- the model ------------------------------------------------------------------------------


class SmartTurn:
    """The Smart Turn v3.2 ONNX model: P(turn complete) for a batch of clips."""

    def __init__(self, path: Path, threads: int = 1):
        self.path = Path(path)
        self.threads = threads
        self._session: Any = None

    def load(self) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, self.threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(self.path), sess_options=so, providers=["CPUExecutionProvider"])
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != [N_MELS, WINDOW // HOP]:
            raise RuntimeError(f"{self.path.name}: input {[(i.name, i.shape) for i in inputs]} is not "
                               f"(batch, {N_MELS}, {WINDOW // HOP})")
        self._input = inputs[0].name

    def predict(self, audios: Sequence[np.ndarray]) -> np.ndarray:
        """P(complete) per clip (the model's output is already a probability)."""
        if not audios:
            return np.zeros(0, np.float32)
        out = self._session.run(None, {self._input: features(audios)})[0]
        return np.clip(np.asarray(out, dtype=np.float32).reshape(len(audios)), 0.0, 1.0)


# --- the words ------------------------------------------------------------------------------

# A Mandarin sentence does not end on these (the speaker paused for thought): conjunctions,
# prepositions and coverbs, structural particles, a number or demonstrative waiting for its
# noun, hesitation fillers. Longest first where one is the tail of another.
_ZH_TAILS = (
    "因为", "所以", "但是", "可是", "而且", "并且", "或者", "还是", "如果", "虽然", "然后", "以及", "还有", "不过",
    "要是", "只要", "除了", "为了", "关于", "对于", "就是", "那个", "这个", "哪个", "一些", "一下子", "比如说", "比如",
    "和", "跟", "与", "及", "或", "但", "而", "在", "从", "对", "把", "被", "给", "向", "往", "比", "离", "让", "用",
    "的", "地", "得", "之", "这", "那", "哪", "嗯", "呃", "额", "啊那", "一个", "几个", "每个", "这种", "那种",
)
_NUMERALS = "零一二两三四五六七八九十百千万几每这那哪"
_MEASURE = "个本张只条件位种些块辆台杯次把首部段句家所间双套份"
# English: a sentence does not end on these either.
_EN_TAILS = {"and", "or", "but", "so", "because", "the", "a", "an", "to", "of", "with", "for", "in", "on", "at",
             "if", "that", "my", "your", "is", "are", "um", "uh", "like", "then"}
_OPEN_MARKS = "，,、；;：:—-…"
_CLOSE_MARKS = "。？！.?!"


def unfinished_words(text: str) -> bool:
    """True when the text so far ends like a sentence that goes on: a trailing comma-like mark,
    or (ignoring a final 。, which FunASR always writes) a conjunction, preposition, particle,
    numeral + measure word, demonstrative or filler."""
    t = text.strip()
    if not t:
        return False
    if t[-1] in _OPEN_MARKS:
        return True
    t = t.rstrip(_CLOSE_MARKS + " \"'”’）)")
    if not t:
        return False
    low = t.lower()
    words = low.replace(",", " ").split()
    if words and words[-1].isascii() and words[-1].isalpha():
        return words[-1] in _EN_TAILS
    if any(t.endswith(w) for w in _ZH_TAILS):
        return True
    return len(t) >= 2 and t[-1] in _MEASURE and t[-2] in _NUMERALS


def text_says_end(text: str) -> bool:
    """The text's own last mark ends a sentence (what Whisper's finals carry)."""
    return text.rstrip()[-1:] in tuple(_CLOSE_MARKS)


# --- the combination ------------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """The rule's thresholds (turn.judge_complete / judge_with_text / judge_unfinished /
    judge_text_end / judge_text_unfinished: their defaults and validation live in daemon/config.py)."""

    # P(complete) at or above which the audio alone calls the turn complete.
    complete: float
    # ... or this, when the engine's text also says the sentence ended.
    with_text: float
    # P(complete) under which the turn is unfinished (held up to max_silence) even without words.
    unfinished: float
    # An engine's P(the sentence ends here) (Whisper's, daemon/asr/end_mark.py): at or above it the
    # text says the sentence ended; under `text_unfinished` it says the sentence goes on.
    text_end: float = TurnConfig.judge_text_end
    text_unfinished: float = TurnConfig.judge_text_unfinished


# The engine's text signal at a pause: a yes/no (a mark, FunASR's punctuation label), a probability
# (Whisper's P(end mark)), or None (none).
TextSignal = Union[bool, float, None]


def text_signal(answer: Any) -> TextSignal:
    """A `SentenceEnd` answer as a signal (an engine's failure is no signal)."""
    if isinstance(answer, bool) or answer is None:
        return answer
    return float(answer) if isinstance(answer, (int, float)) else None


def sentence_ended(answer: Any, text_end: Optional[float] = None) -> bool:
    """turn.sentence_end's rule on a text that ends in a mark, as the engine confirms it (FunASR:
    its punctuation label; Whisper: its P(end mark) >= `text_end`, turn.judge_text_end (None: its
    default), which keeps a 。 Whisper writes at a comma pause from ending the utterance there)."""
    signal = text_signal(answer)
    if isinstance(signal, float):
        return signal >= (TurnConfig.judge_text_end if text_end is None else text_end)
    return bool(signal)


def decide(p_complete: Optional[float], text_end: TextSignal, text: str, th: Thresholds) -> str:
    """The verdict at a pause. `p_complete` None: no audio signal (the model is off); `text_end`
    None: the engine has no text signal; a float: the engine's P(the sentence ends here), read
    against th.text_end / th.text_unfinished. Words that go on win (a sentence does not end on
    和); then the audio, with a lower bar when the text says the sentence ended; a probability
    that says the sentence goes on holds the turn."""
    if unfinished_words(text):
        return UNFINISHED
    goes_on = False
    if isinstance(text_end, float):
        goes_on = text_end < th.text_unfinished
        text_end = text_end >= th.text_end
    if p_complete is None:
        return COMPLETE if text_end else UNFINISHED if goes_on else UNSURE
    if p_complete >= th.complete or (text_end and p_complete >= th.with_text):
        return COMPLETE
    if goes_on or (p_complete < th.unfinished and not text_end):  # (audio alone: off at the shipped 0)
        return UNFINISHED
    return UNSURE


# --- the step request and the judge a pool holds ---------------------------------------------


@dataclass
class TurnCheck:
    """Smart Turn on one session's audio (the last 8 s up to now); the answer is P(complete)."""

    audio: np.ndarray


@dataclass
class JudgeSettings:
    model: Optional[Path]
    max_silence: float
    thresholds: Thresholds
    threads: int = 1


class TurnJudge:
    """The process's judge, held by the ASR pool (`pool.judge`); used on the ASR worker only.
    `usable` is False once the model is missing or has failed: the VAD decides from then on."""

    def __init__(self, settings: JudgeSettings):
        self.settings = settings
        self.model: Optional[SmartTurn] = None
        self.failed: Optional[str] = None  # why the judge is off (said once)
        self.counts: Dict[str, int] = {"turn_judge_" + v: 0 for v in VERDICTS}
        self.counts.update(turn_judge_calls=0, turn_judge_batches=0, turn_judge_failed=0)
        self.seconds = 0.0  # worker time spent in the model, features included
        self._lock = threading.Lock()
        self._on_fail: List[Any] = []

    @property
    def usable(self) -> bool:
        return self.model is not None and self.failed is None

    def load(self) -> bool:
        """Load the model; False (and the reason said) when it cannot be."""
        path = self.settings.model
        if path is None or not Path(path).is_file():
            from daemon.models.smart_turn import missing_reason

            why = missing_reason(Path(path)) if path is not None else None
            self.fail(f"Smart Turn model {path} is missing" + (f" ({why})" if why else " (install it with "
                                                                                       "s2s-models bundled)"))
            return False
        try:
            m = SmartTurn(Path(path), self.settings.threads)
            m.load()
            m.predict([np.zeros(SAMPLE_RATE, np.float32)])  # a warm-up call, also a check
        except Exception as e:  # noqa: BLE001 - any failure: the VAD decides
            self.fail(f"Smart Turn model {path} failed to load: {type(e).__name__}: {e}"[:300])
            return False
        self.model = m
        logger.info("turn judge: Smart Turn v3.2 loaded from %s (max silence %.1f s)", path,
                    self.settings.max_silence)
        return True

    def fail(self, why: str) -> None:
        with self._lock:
            if self.failed is not None:
                return
            self.failed = why
        logger.error("turn judge off: %s; the VAD's end silence decides every turn", why)
        for cb in self._on_fail:
            cb(why)

    def on_fail(self, cb: Any) -> None:
        """cb(reason) once when the judge goes off (now, if it already is)."""
        self._on_fail.append(cb)
        if self.failed is not None:
            cb(self.failed)

    def run_requests(self, reqs: Sequence[TurnCheck]) -> List[Any]:
        """One batched model call for every session due: P(complete) each, or None for all when
        the judge is off or the call failed (then it is off for good, said once)."""
        if not self.usable or self.model is None:
            return [None] * len(reqs)
        t0 = time.perf_counter()
        try:
            p = self.model.predict([r.audio for r in reqs])
        except Exception as e:  # noqa: BLE001
            self.counts["turn_judge_failed"] += len(reqs)
            self.fail(f"Smart Turn call failed: {type(e).__name__}: {e}"[:300])
            return [None] * len(reqs)
        finally:
            self.seconds += time.perf_counter() - t0
        self.counts["turn_judge_calls"] += len(reqs)
        self.counts["turn_judge_batches"] += 1
        return [float(v) for v in p]

    def count(self, verdict: str) -> None:
        self.counts["turn_judge_" + verdict] += 1

    def describe(self) -> Dict[str, Any]:
        s = self.settings
        return {"on": self.usable, "model": str(s.model) if s.model else None, "off_reason": self.failed,
                "max_silence": s.max_silence,
                "thresholds": {"complete": s.thresholds.complete, "with_text": s.thresholds.with_text,
                               "unfinished": s.thresholds.unfinished, "text_end": s.thresholds.text_end,
                               "text_unfinished": s.thresholds.text_unfinished},
                "model_seconds": round(self.seconds, 3)}


def settings_from(cfg: Any) -> JudgeSettings:
    t = cfg.turn
    return JudgeSettings(model=cfg.model_path(t.smart_turn) if t.smart_turn else None, max_silence=t.max_silence,
                         thresholds=Thresholds(t.judge_complete, t.judge_with_text, t.judge_unfinished,
                                               t.judge_text_end, t.judge_text_unfinished))


def attach(pool: "ASRPool", cfg: Any) -> Optional[TurnJudge]:
    """Give an ASR pool its turn judge (turn.judge). A judge that cannot load, or fails later, is
    listed once among the pool's fallbacks (describe) as `turn.judge smart-turn -> vad`."""
    if not cfg.turn.judge:
        pool.judge = None
        return None
    from daemon.engines import Fallback

    judge = TurnJudge(settings_from(cfg))
    judge.on_fail(lambda why: pool.fallbacks.append(
        Fallback("turn.judge", "smart-turn", "vad", why, "startup" if judge.model is None else "recognition")))
    judge.load()
    pool.judge = judge
    return judge


def describe(pool: "ASRPool") -> Dict[str, Any]:
    """describe's `turn_judge` entry and its counters (zeros when off)."""
    judge = pool.judge
    if judge is None:
        return {"on": False, "off_reason": "turn.judge is false"}
    return judge.describe()


def counters(pool: "ASRPool") -> Dict[str, int]:
    judge = pool.judge
    base = {"turn_judge_" + k: 0 for k in VERDICTS + ("calls", "batches", "failed")}
    return dict(base, **judge.counts) if judge is not None else base
