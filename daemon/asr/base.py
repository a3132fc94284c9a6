"""What the ASR engines share, built on the VAD (daemon/asr/vad.py):

- `StreamingEngine` (the `ASRSession` of daemon/engines.py) turns `VADSegmenter` events into the
  ASR events of daemon/engines.py (speech_start / partial / tentative / resume / final); FunASR
  and Whisper engines subclass it and only supply the decoding.
- `ASRSettings`: what every ASR engine is built with from the config (the base of FunASRConfig
  and WhisperConfig, which add their models).
- `PoolBase` (the `ASRPool`) holds the models and the single-thread device worker both pools use,
  and answers the sessions' model requests (`run_requests`); it keeps no sessions (the daemon's
  serving core does, daemon/asr/sessions.py).
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Generator, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from daemon import devices
from daemon.audio import to_float32
from daemon.config import ASRConfig, Config, LimitsConfig, TurnConfig
from daemon.engines import (ASREvent, Capabilities, Fallback, FinalEvent, ResumeEvent, SpeechStartEvent, Steps,
                            TentativeEvent)
from daemon.errors import AudioError, ErrorCode, S2SError, UnsupportedError
from daemon.rules import check_language, clean_hotwords
from daemon.asr.steps import run_steps
from daemon.asr.turn_judge import (PRE_SPEECH, WINDOW, TextSignal, TurnCheck, TurnJudge, decide, sentence_ended,
                                   text_says_end, text_signal, unfinished_words)
from daemon.asr.vad import SAMPLE_RATE, VADBlock, VADEvent

logger = logging.getLogger(__name__)


# --- the requests an engine's steps yield (answered by PoolBase.run_requests) ----------

@dataclass
class Decode:
    """Decode one utterance (or the utterance so far); the answer is the engine's decode result."""

    audio: np.ndarray
    hotwords: Tuple[str, ...] = ()
    language: str = "zh"


@dataclass
class SentenceEnd:
    """Does this text (the utterance so far, at a pause) end a sentence? A bool, or with `audio`
    a probability where the engine weighs the words against it (Whisper: asr/end_mark.py)."""

    text: str
    audio: Optional[np.ndarray] = None
    language: str = ""


# What ends a sentence in a final's text (Whisper writes its own punctuation).
SENTENCE_END_MARKS = "。？！.?!"


@dataclass
class StreamChunk:
    """One chunk through a streaming decoder with the session's cache; the answer is the text it adds."""

    audio: np.ndarray
    cache: Dict[str, Any]


# Utterances decoded in one batch at most, and how much longer than the shortest in its batch an
# utterance may be (padding is wasted work; a long one must not hold short ones).
MAX_DECODE_BATCH = 16
MAX_DECODE_STRETCH = 2.0


def decode_groups(lengths: Sequence[int]) -> List[List[int]]:
    """Indices of decode requests in batches: shortest first, each batch at most
    MAX_DECODE_BATCH long and no member over MAX_DECODE_STRETCH x its shortest."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: List[List[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g is not None and len(g) < MAX_DECODE_BATCH and lengths[i] <= MAX_DECODE_STRETCH * max(lengths[g[0]], 1):
            g.append(i)
        else:
            groups.append([i])
    return groups


# --- shared engine behaviour ----------------------------------------------------------


def join_cjk(text: str) -> str:
    """funasr separates CJK characters with spaces; keep spaces only between Latin words."""
    words = text.split()
    out = ""
    for w in words:
        if out and (_is_cjk(out[-1]) or _is_cjk(w[0])):
            out += w
        elif out:
            out += " " + w
        else:
            out = w
    return out


def _is_cjk(ch: str) -> bool:
    return "\u3000" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef"


class StreamingEngine:
    """One session: VAD endpointing -> speech_start / partial / final events, plus
    tentative / resume for a session that asked for them (`set_early_silence`).

    Subclasses implement `_decode(audio) -> str` and optionally the partial hooks. All methods
    are synchronous and meant to run on the pool's worker (pool.submit).
    """

    supports_partials = False

    def __init__(self, pool: "PoolBase", session_id: str, language: str, hotwords: Sequence[str],
                 partials: bool, max_utterance_seconds: float):
        self.pool = pool
        self.session_id = session_id
        self.language = check_language(language)
        self.hotwords: List[str] = []
        self.partials = bool(partials) and self.supports_partials
        self._seg = pool.vad.segmenter(max_utterance_seconds, session_id)
        self._queue: Deque[ASREvent] = deque()
        self._utt = 0
        self._tentative: Optional[Tuple[int, str]] = None  # (utterance, text) of the open pause
        self.sentence_end, self._text_end = False, TurnConfig.judge_text_end  # a pause after a whole sentence ends it
        # The paused utterance the turn judge has yet to weigh: (utterance, text, text signal).
        self._judge_due: Optional[Tuple[int, str, TextSignal]] = None
        if hotwords:
            self.set_hotwords(hotwords)

    # -- the ASRSession protocol (daemon/engines.py) --------------------------------------

    def feed_steps(self, pcm: Any) -> Steps:
        """`feed` as steps: yields each model request (`VADBlock`, `StreamChunk`, `Decode`) and
        takes back its answer, so the daemon runs many sessions' requests in one batch
        (daemon/asr/batch.py, daemon/asr/steps.py). The session's logic is the same code either way."""
        x = to_float32(pcm)
        if x.size == 0:
            return []
        events: List[ASREvent] = []
        judge_now = self._judge_due is not None  # a pause of an earlier feed: its tentative is out
        for ev in (yield from self._seg.push_steps(x)):
            events += yield from self._on_vad(ev)
        if judge_now and self._judge_due is not None:
            events += yield from self._judge_turn()
        if self.partials and self._seg.in_speech:
            events += yield from self._partial_steps()
        return events

    def finalize_events(self) -> List[ASREvent]:
        return run_steps(self.finalize_steps(), self.pool.run_list)

    def finalize_steps(self) -> Steps:
        events = list(self._queue)
        self._queue.clear()
        for ev in self._seg.flush():
            events += yield from self._on_vad(ev)
        if not events or events[-1]["type"] != "final":
            t = self._t(self._seg.total)
            events.append(FinalEvent(type="final", text="", start=t, end=t, utterance=self._utt, reason="finalize"))
        return events

    def reset(self) -> None:
        self._seg.reset()
        self._queue.clear()
        self._utt = 0
        self._tentative = None
        self._judge_due = None
        self._partial_reset()

    # -- beyond the daemon's contract: standalone use (scripts, tests) -------------------

    def feed(self, pcm: Any) -> List[ASREvent]:
        """feed_steps driven alone: this session's events for `pcm`."""
        return run_steps(self.feed_steps(pcm), self.pool.run_list)

    def feed_audio(self, pcm: Any) -> Optional[ASREvent]:
        """Seed interface: like feed(), returning one event or None (extra events queue
        up and are returned by the next calls; nothing is dropped)."""
        self._queue.extend(self.feed(pcm))
        return self._queue.popleft() if self._queue else None

    def finalize(self) -> ASREvent:
        """finalize_events()' last event: the final (its text may be empty)."""
        return self.finalize_events()[-1]

    def set_language(self, lang: str) -> None:
        self.language = check_language(lang)

    def set_early_silence(self, seconds: float) -> None:
        """Decode the utterance so far after this much silence inside it (`tentative`); 0: never."""
        self._seg.early_silence_ms = max(int(round(float(seconds) * 1000)), 0)

    def set_sentence_end(self, on: bool, text_end: Optional[float] = None) -> None:
        """Endpointing that knows sentences: at a pause (see set_early_silence) after a whole
        sentence (the engine's P(end) >= `text_end`: turn.judge_text_end), the final comes at once
        (reason `sentence`), not after the VAD's end silence; speech that goes on is the next utterance."""
        self.sentence_end, self._text_end = bool(on), TurnConfig.judge_text_end if text_end is None else text_end

    @property
    def early_silence(self) -> float:
        return self._seg.early_silence_ms / 1000.0

    def set_hotwords(self, hotwords: Sequence[str]) -> None:
        words = clean_hotwords(hotwords)
        if words and not self.pool.capabilities().hotwords:
            raise UnsupportedError(f"{self.pool.name}: the loaded model ({self.pool.model_label()}) cannot use "
                                   f"hotwords; use asr.engine funasr with a SeACo-Paraformer model in "
                                   f"asr.funasr.paraformer", model=self.pool.model_label())
        self.hotwords = words

    @property
    def buffered_samples(self) -> int:
        """Audio this session holds (bounded by max utterance + a few seconds)."""
        return self._seg.buffered_samples

    # -- internals --------------------------------------------------------------------

    @staticmethod
    def _t(sample: int) -> float:
        return round(sample / SAMPLE_RATE, 3)

    def _on_vad(self, ev: VADEvent) -> Steps:
        if ev.kind == "start":
            self._partial_reset()
            self._tentative = None
            return [SpeechStartEvent(type="speech_start", start=self._t(ev.start), utterance=self._utt)]
        if ev.kind == "pause":
            return (yield from self._on_pause(ev))
        if ev.kind == "resume":
            if self._tentative is None:
                return []
            self._tentative = None
            logger.debug("asr %s: resume %d at %.2f", self.session_id, self._utt, self._t(ev.end))
            return [ResumeEvent(type="resume", start=self._t(ev.end), utterance=self._utt)]
        audio = ev.audio if ev.audio is not None else np.zeros(0, dtype=np.float32)
        tentative, self._tentative = self._tentative, None
        if ev.after_pause and tentative is not None and tentative[0] == self._utt:
            text = tentative[1]  # only silence since the tentative: the same speech, decoded once
        else:
            text = (yield from self._decode_steps(audio)) if audio.size else ""
        return [self._final(ev, text)]

    def _final(self, ev: VADEvent, text: str) -> FinalEvent:
        self._partial_reset()
        final = FinalEvent(type="final", text=text, start=self._t(ev.start), end=self._t(ev.end), utterance=self._utt,
                           reason=ev.reason)
        self._final_extras(final)
        logger.debug("asr %s: final %d %.2f-%.2f (%s) %r", self.session_id, self._utt, final["start"],
                     final["end"], ev.reason, text)
        self._utt += 1
        return final

    def _on_pause(self, ev: VADEvent) -> Steps:
        audio = ev.audio if ev.audio is not None else np.zeros(0, dtype=np.float32)
        text = (yield from self._decode_steps(audio)) if audio.size else ""
        if not text.strip():
            return []  # nothing to speculate on; the final decides
        judge = self.pool.judge
        if self.sentence_end and judge is not None and judge.usable and unfinished_words(text):
            # Words that go on: held now, before the VAD's end can come (a slow decode may take
            # the rest of its 0.8 s), and no model call.
            judge.count("unfinished")
            self._seg.hold(judge.settings.max_silence)
        elif self.sentence_end and judge is not None and judge.usable:
            # The turn judge weighs it on the next feed: the tentative goes out first, so a
            # speculative reply starts while the judge runs.
            self._judge_due = (self._utt, text, text_signal((yield SentenceEnd(text, audio, self.language))))
        elif self.sentence_end and text_says_end(text) and sentence_ended((yield SentenceEnd(text, audio, self.language)),
                                                                          self._text_end):
            self._tentative = None
            return [self._final(self._seg.close_at_pause(), text)]
        self._tentative = (self._utt, text)
        logger.debug("asr %s: tentative %d %.2f-%.2f %r", self.session_id, self._utt, self._t(ev.start),
                     self._t(ev.end), text)
        return [TentativeEvent(type="tentative", text=text, start=self._t(ev.start), end=self._t(ev.end),
                               utterance=self._utt)]

    def _judge_turn(self) -> Steps:
        """The turn judge's verdict on the paused utterance (daemon/asr/turn_judge.py): complete ->
        the final now (reason `turn`); unfinished -> the VAD's end waits up to turn.max_silence;
        unsure, or the judge failed -> the VAD's end silence (with the text rule of sentence_end)."""
        (utt, text, text_end), self._judge_due = self._judge_due or (0, "", None), None
        judge = self.pool.judge
        start = self._seg.utterance_start
        if judge is None or utt != self._utt or not self._seg.paused or start is None:
            return []  # speech went on, or the VAD already ended it
        now = self._seg.total
        p = yield TurnCheck(self._seg.audio(max(start - PRE_SPEECH, now - WINDOW), now))
        p = p if isinstance(p, float) else None
        verdict = decide(p, text_end, text, judge.settings.thresholds)
        judge.count(verdict)
        logger.debug("asr %s: turn %d judged %s (p %s, text end %s) %r", self.session_id, utt, verdict, p,
                     text_end, text)
        if verdict == "complete":
            self._tentative = None
            return [self._final(self._seg.close_at_pause("turn" if p is not None else "sentence"), text)]
        if verdict == "unfinished" and judge.usable:
            self._seg.hold(judge.settings.max_silence)
        return []

    def _decode_steps(self, audio: np.ndarray) -> Generator[Any, Any, str]:
        """The utterance's text: one `Decode` request (engines may read more from the answer)."""
        return str((yield Decode(audio, tuple(self.hotwords), self.language)))

    def _final_extras(self, final: FinalEvent) -> None:
        """Engine-specific fields of a final (Whisper: the language it heard)."""

    def _partial_reset(self) -> None:
        pass

    def _partial_steps(self) -> Steps:
        return []
        yield  # a generator with nothing to ask


# --- shared pool behaviour ------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ASRSettings:
    """What every ASR engine is built with, from the config at load (`of`): the VAD, the device and
    its threads, and a session's defaults when the caller gives none (the daemon always gives its
    live values: language, max_utterance_seconds, hotwords)."""

    vad_dir: Path
    device: str = "cpu"
    dtype: str = ASRConfig.dtype
    language: str = ASRConfig.language
    max_utterance_seconds: float = LimitsConfig.max_utterance_seconds
    ncpu: int = 1

    @staticmethod
    def of(cfg: Config, engine: str, vad: str) -> Dict[str, Any]:
        """These settings' values for `engine` (its devices.AUTO_THREADS entry) with VAD model `vad`."""
        a = cfg.asr
        return {"vad_dir": cfg.model_path(vad), "device": a.device, "dtype": a.dtype, "language": a.language,
                "max_utterance_seconds": cfg.limits.max_utterance_seconds,
                "ncpu": devices.cpu_threads(a.ncpu, engine)}


class PoolBase:
    """The models and the single-thread device worker; sessions are the daemon's.

    Reloadable values reach a session per call: `open(..., partial_interval=,
    max_utterance_seconds=)`; None means the pool's configured default."""

    name = "asr"
    engine_class: Callable[..., StreamingEngine]

    def __init__(self, config: ASRSettings) -> None:
        # No session cap or table here: the daemon admits (limits.max_sessions) and keeps the sessions.
        self.config = config
        self.device, self.dtype = "cpu", "float32"  # where the models are (after load: config's, or the fallback)
        self.vad: Any = None
        self.judge: Optional[TurnJudge] = None  # set by daemon/asr/turn_judge.py:attach (turn.judge)
        self.fallbacks: List[Fallback] = []
        # Feeds of other sessions waiting for the worker (set by daemon/asr/batch.FeedBatcher).
        self.feeds_waiting: Callable[[], int] = lambda: 0
        self.cost_curve: Optional[Tuple[float, float]] = None  # FunASR measures it at load, and
        self.decode_cost_curve: Optional[Tuple[float, float]] = None  # its decode thread's
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"asr-{self.name}")
        # Offline decodes on a second thread (`offloads`, `submit_decode`): a pool whose decodes
        # are long (a full-size Paraformer on the CPU) sets this; torch releases the GIL in its ops.
        self.offload_decodes = False
        self._decode_executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._loaded = False

    # subclasses: load(), capabilities(), model_label(), _new_engine(), info()

    def _note_fallback(self, src: str, dst: str, reason: str, when: str) -> None:
        f = Fallback("asr.device", src, dst, reason, when)
        logger.error("%s: %s", self.name, f.line())
        self.fallbacks.append(f)

    def capabilities(self) -> Capabilities:  # pragma: no cover - overridden
        return Capabilities()

    def model_label(self) -> str:  # pragma: no cover - overridden
        return self.name

    def _new_engine(self, session_id: str, language: Optional[str], hotwords: Optional[Sequence[str]],
                    partials: bool, partial_interval: Optional[float],
                    max_utterance_seconds: Optional[float]) -> StreamingEngine:  # pragma: no cover - overridden
        raise NotImplementedError

    def open(self, session_id: str, language: Optional[str] = None, hotwords: Optional[Sequence[str]] = None,
             partials: bool = True, sample_rate: int = SAMPLE_RATE, *, partial_interval: Optional[float] = None,
             max_utterance_seconds: Optional[float] = None) -> StreamingEngine:
        """A new session's engine. Construction is cheap (no model work); a bad language or
        hotword raises here."""
        if sample_rate != SAMPLE_RATE:
            raise AudioError(f"sample rate {sample_rate} Hz is not supported; send 16000 Hz mono PCM16",
                             sample_rate=sample_rate)
        if not self._loaded:
            raise S2SError(f"{self.name}: models are not loaded", ErrorCode.UNAVAILABLE)
        engine = self._new_engine(session_id, language, hotwords, partials, partial_interval, max_utterance_seconds)
        logger.info("asr %s: opened (%s, language %s, hotwords %d, partials %s)", session_id, self.name,
                    engine.language, len(engine.hotwords), engine.partials)
        return engine

    # -- answering the steps' requests (on the worker) ----------------------------------

    def run_requests(self, reqs: Sequence[Any]) -> Iterator[Tuple[int, Any]]:
        """Answer many sessions' requests, batched by kind: (index, answer or the exception
        that request raised), yielded as each batch finishes, so a session whose last
        request is answered can go on while longer decodes still run."""
        by_kind: Dict[type, List[int]] = {}
        for i, r in enumerate(reqs):
            by_kind.setdefault(type(r), []).append(i)
        vad = by_kind.pop(VADBlock, [])
        if vad:
            yield from zip(vad, self.vad.run_requests([reqs[i] for i in vad]), strict=True)
        chunks = by_kind.pop(StreamChunk, [])
        if chunks:
            yield from zip(chunks, self.stream_requests([reqs[i] for i in chunks]), strict=True)
        for i in by_kind.pop(SentenceEnd, []):
            yield i, _answer(self.sentence_end_request, reqs[i])
        turns = by_kind.pop(TurnCheck, [])
        if turns:
            answers = self.judge.run_requests([reqs[i] for i in turns]) if self.judge else [None] * len(turns)
            yield from zip(turns, answers, strict=True)
        dec = by_kind.pop(Decode, [])
        keyed: Dict[Tuple[Tuple[str, ...], str], List[int]] = {}
        for i in dec:
            keyed.setdefault((reqs[i].hotwords, reqs[i].language), []).append(i)
        batches = [[idx[j] for j in g] for idx in keyed.values()
                   for g in decode_groups([reqs[i].audio.size for i in idx])]
        for batch in sorted(batches, key=lambda b: reqs[b[0]].audio.size):
            yield from zip(batch, self.decode_requests([reqs[i] for i in batch]), strict=True)
        for kind, idx in by_kind.items():
            for i in idx:
                yield i, TypeError(f"{self.name}: unknown request {kind.__name__}")

    def run_list(self, reqs: Sequence[Any]) -> List[Any]:
        """run_requests' answers in request order (one session driven alone: run_steps)."""
        out: List[Any] = [None] * len(reqs)
        for i, answer in self.run_requests(reqs):
            out[i] = answer
        return out

    def decode_requests(self, reqs: List["Decode"]) -> List[Any]:
        """Decodes with the same hotwords and language, of similar length: engines that can
        batch them override this; here one by one."""
        return [_answer(self.decode_request, r) for r in reqs]

    def stream_requests(self, reqs: List["StreamChunk"]) -> List[Any]:
        """Streaming chunks of many sessions: engines that can batch them override this."""
        return [_answer(self.stream_request, r) for r in reqs]

    def decode_request(self, req: "Decode") -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def stream_request(self, req: "StreamChunk") -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def sentence_end_request(self, req: "SentenceEnd") -> bool:
        """By the text's own last mark (engines whose punctuation always closes a final, FunASR's
        CT-Transformer, override this with what the model predicted before that)."""
        return req.text.rstrip()[-1:] in tuple(SENTENCE_END_MARKS)

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        return self._executor.submit(fn, *args, **kwargs)

    def offloads(self, req: Any) -> bool:
        """Is `req` answered on the decode thread (`submit_decode`), not in the worker's batch?"""
        return self.offload_decodes and isinstance(req, Decode)

    def gather_wait(self, pending: int) -> float:
        return 0.0  # the next worker call starts at once (a full-size FunASR pool gathers chunks)

    def submit_decode(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run fn on the pool's decode thread (started at first use)."""
        if self._decode_executor is None:
            self._decode_executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"asr-{self.name}-decode")
        return self._decode_executor.submit(fn, *args, **kwargs)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._decode_executor is not None:
            self._decode_executor.shutdown(wait=True, cancel_futures=True)


def _answer(fn: Callable[[Any], Any], req: Any) -> Any:
    """fn(req), or the exception it raised (it belongs to the session that asked)."""
    try:
        return fn(req)
    except Exception as e:  # noqa: BLE001
        return e
