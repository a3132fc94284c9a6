"""FAKE engines for daemon tests that are about the daemon (protocol, routing, lifecycle),
not about speech recognition or synthesis. Selected only through the test-only factory hook
``S2S_TEST_ENGINES=tests.fake_engines``.

FakeASRPool: deterministic energy endpointing on 100 ms blocks. A block whose RMS exceeds
0.01 is speech; 0.5 s of silence after speech ends the utterance. It keeps the daemon's engine
contract (daemon/engines.py) the way the real pools do: a session's feed is steps that ask the
pool a model request (`Loudness`: which blocks are speech), answered for every session of a batch
at once by `run_requests`, so the daemon runs its production feed path (daemon/asr/batch.py).
Events are daemon.engines' ASR events; a final's text is ``"utt<N> bytes=<PCM16 bytes of the utterance>"``
so a test can check each client got the finals of its own audio.

Test knobs travel in-band as hotwords (the fake accepts any hotword):
  ``fake:delay=0.2``  sleep that many seconds in every feed (slow engine)
  ``fake:rtf=0.5``    sleep 0.5 s per second of audio in every feed (an engine whose cost
                      is proportional to audio, so 1/rtf real-time streams fill the worker)
  ``fake:hang``       the next feed blocks the worker until shutdown (hung engine: the
                      watchdog heartbeat stops completing)
  ``fake:open_error`` open() raises a RuntimeError (an engine bug, not an S2SError)
  ``fake:die``        the next feed shuts the worker's executor down (a dead engine worker)
The pool keeps no session cap of its own (the daemon admits); `open` takes the reloadable
per-session values (`partial_interval`: one partial per that many seconds of speech,
`max_utterance_seconds`) as the real pools do. ``S2S_FAKE_LOAD_SECONDS`` makes load() take
that long (default 0.2 s).
With ``S2S_FAKE_FEED_LOG=PATH`` in the daemon's environment every feed appends
``"<session_id> <samples>"`` to PATH, so a test can see how the daemon chunks audio.
FakeTTSEngine: one sentence per ``.``/``。``/``!``/``?``; each sentence is a 440 Hz tone of
0.05 s per character at 24 kHz, with 0.02 s of (sleep) work per sentence; text containing
``[slow]`` takes 0.3 s per sentence and ``[hang]`` blocks the worker until shutdown.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from daemon.audio import to_float32
from daemon.config import Config
from daemon.asr.steps import run_steps
from daemon.asr.turn_judge import TurnJudge
from daemon.engines import (ASREvent, Capabilities, EngineInfo, Fallback, FinalEvent, PartialEvent, SpeechStartEvent,
                            Steps)
from daemon.errors import TextError
from daemon.rules import LANGUAGES

BLOCK = 1600  # 100 ms at 16 kHz
THRESHOLD = 0.01
END_SILENCE_BLOCKS = 5
PARTIAL_EVERY_BLOCKS = 5


@dataclass
class Loudness:
    """The FAKE model request: which of these 100 ms blocks are speech? Answered by
    `FakeASRPool.run_requests`, every session's blocks of a batch in one numpy call, as the real
    pools answer VAD blocks (daemon/asr/base.py)."""

    blocks: np.ndarray  # (n, BLOCK) float32


class FakeASRSession:
    """The daemon's `ASRSession` contract (daemon/engines.py), feeding through `feed_steps` as
    the real engines do, so the daemon runs its production path (daemon/asr/batch.py)."""

    def __init__(self, session_id: str, pool: "FakeASRPool", partials: bool = True,
                 partial_interval: float = PARTIAL_EVERY_BLOCKS * 0.1):
        self.session_id = session_id
        self.partial_blocks = max(1, int(round(partial_interval * 10)))
        self.pool = pool
        self.partials = partials
        self.language = "zh"
        self.hotwords: Tuple[str, ...] = ()
        self.early_silence = 0.0
        self.sentence_end = False
        self.delay = 0.0
        self.rtf = 0.0
        self.hang = False
        self.die = False
        self.reset()

    def reset(self) -> None:
        self._buf = np.zeros(0, dtype=np.float32)
        self._t = 0  # samples consumed
        self._in_speech = False
        self._utt = 0
        self._utt_start = 0
        self._utt_samples = 0
        self._silence = 0
        self._since_partial = 0

    def set_early_silence(self, seconds: float) -> None:
        self.early_silence = seconds  # kept, not acted on: the fake reports no tentatives

    def set_sentence_end(self, on: bool, text_end: Optional[float] = None) -> None:
        self.sentence_end = on

    def set_hotwords(self, hotwords: Sequence[str]) -> None:
        self.hotwords = tuple(hotwords)
        for h in self.hotwords:
            if h.startswith("fake:delay="):
                self.delay = float(h.split("=", 1)[1])
            elif h.startswith("fake:rtf="):
                self.rtf = float(h.split("=", 1)[1])
            elif h == "fake:hang":
                self.hang = True
            elif h == "fake:die":
                self.die = True
            elif h == "fake:open_error":
                raise RuntimeError("fake engine bug while opening")

    def _final(self, reason: str) -> FinalEvent:
        ev = FinalEvent(type="final", text=f"utt{self._utt} bytes={self._utt_samples * 2}" if self._utt_samples else "",
                        start=self._utt_start / 16000, end=self._t / 16000, utterance=self._utt, reason=reason)
        if self._in_speech:
            self._utt += 1
        self._in_speech = False
        self._utt_samples = 0
        self._silence = 0
        return ev

    def feed_steps(self, pcm: Any) -> Steps:
        if self.hang:
            self.pool.stop_event.wait()
        if self.die and self.pool._ex is not None:
            self.pool._ex.shutdown(wait=False, cancel_futures=True)
        if self.delay:
            time.sleep(self.delay)
        x = to_float32(pcm)
        if self.rtf:
            time.sleep(self.rtf * len(x) / 16000)
        log = os.environ.get("S2S_FAKE_FEED_LOG")
        if log:
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"{self.session_id} {len(x)}\n")
        self._buf = np.concatenate([self._buf, x])
        n = len(self._buf) // BLOCK
        if not n:
            return []
        blocks, self._buf = self._buf[:n * BLOCK].reshape(n, BLOCK), self._buf[n * BLOCK:]
        speech = yield Loudness(blocks)
        out: List[ASREvent] = []
        for loud in speech:
            if loud and not self._in_speech:
                self._in_speech = True
                self._utt_start = self._t
                self._since_partial = 0
                out.append(SpeechStartEvent(type="speech_start", start=self._t / 16000, utterance=self._utt))
            self._t += BLOCK
            if self._in_speech:
                self._utt_samples += BLOCK
                self._silence = 0 if loud else self._silence + 1
                self._since_partial += 1
                if self.partials and loud and self._since_partial >= self.partial_blocks:
                    self._since_partial = 0
                    out.append(PartialEvent(type="partial", text=f"utt{self._utt} bytes~{self._utt_samples * 2}",
                                            start=self._utt_start / 16000, end=self._t / 16000, utterance=self._utt))
                if self._silence >= END_SILENCE_BLOCKS:
                    out.append(self._final("vad"))
        return out

    def feed(self, pcm: Any) -> List[ASREvent]:
        """feed_steps driven alone (in-process tests compute what the daemon should say)."""
        return run_steps(self.feed_steps(pcm), lambda reqs: [a for _, a in sorted(self.pool.run_requests(reqs))])

    def finalize_events(self) -> List[ASREvent]:
        if len(self._buf):
            # Count the tail as part of the utterance when speech is ongoing.
            if self._in_speech:
                self._utt_samples += len(self._buf)
            self._t += len(self._buf)
            self._buf = np.zeros(0, dtype=np.float32)
        return [self._final("finalize")]

    def finalize_steps(self) -> Any:
        """finalize_events as steps (it asks the pool nothing)."""
        return self.finalize_events()
        yield  # a generator: the daemon drives it as a feed's steps


class FakeASRPool:
    """The daemon's `ASRPool` contract (daemon/engines.py); keeps no sessions, as the real pools."""

    name = "fake"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.fallbacks: List[Fallback] = []
        self.judge: Optional[TurnJudge] = None
        self.feeds_waiting: Callable[[], int] = lambda: 0
        self.cost_curve: Optional[Tuple[float, float]] = None
        self.decode_cost_curve: Optional[Tuple[float, float]] = None
        self.stop_event = threading.Event()
        self._ex: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self.loaded = False
        self.request_rounds = 0  # run_requests calls, each answering every waiting session at once

    def load(self) -> None:
        self._ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fake-asr")
        # something for EXTEND_TIMEOUT/READY ordering to be about
        time.sleep(float(os.environ.get("S2S_FAKE_LOAD_SECONDS", "0.2")))
        self.loaded = True

    def open(self, session_id: str, language: Optional[str] = None, hotwords: Optional[Sequence[str]] = None,
             partials: bool = True, *, partial_interval: Optional[float] = None,
             max_utterance_seconds: Optional[float] = None) -> FakeASRSession:
        s = FakeASRSession(session_id, self, partials,
                           PARTIAL_EVERY_BLOCKS * 0.1 if partial_interval is None else partial_interval)
        if language:
            s.language = language
        if hotwords:
            s.set_hotwords(hotwords)
        return s

    def run_requests(self, reqs: Sequence[Any]) -> Iterator[Tuple[int, Any]]:
        """Every session's `Loudness` blocks in one RMS computation; anything else is a TypeError
        for the session that asked."""
        self.request_rounds += 1
        mine = [i for i, r in enumerate(reqs) if isinstance(r, Loudness)]
        for i, r in enumerate(reqs):
            if not isinstance(r, Loudness):
                yield i, TypeError(f"fake: unknown request {type(r).__name__}")
        if not mine:
            return
        blocks = np.concatenate([reqs[i].blocks for i in mine])
        loud = (np.sqrt(np.mean(blocks * blocks, axis=1)) > THRESHOLD).tolist()
        at = 0
        for i in mine:
            n = len(reqs[i].blocks)
            yield i, loud[at:at + n]
            at += n

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        assert self._ex is not None, "load() first"
        return self._ex.submit(fn, *args, **kwargs)

    def offloads(self, req: Any) -> bool:
        return False  # every request is answered in the worker's batch

    def submit_decode(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        return self.submit(fn, *args, **kwargs)

    def gather_wait(self, pending: int) -> float:
        return 0.0  # every feed starts the worker at once

    def info(self) -> EngineInfo:
        return EngineInfo(kind="asr", engine="fake", device="cpu", requested_device="cpu", dtype="float32",
                          sample_rate=16000, loaded=True, fake=True,
                          capabilities=Capabilities(partials=True, hotwords=True, punctuation=True,
                                                    languages=LANGUAGES),
                          details={"request_rounds": self.request_rounds})

    def shutdown(self) -> None:
        self.stop_event.set()
        if self._ex:
            self._ex.shutdown(wait=False, cancel_futures=True)


class FakeTTSEngine:
    name = "fake"
    sample_rate = 24000

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stop_event = threading.Event()
        self._ex: Optional[concurrent.futures.ThreadPoolExecutor] = None

    def load(self) -> None:
        self._ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fake-tts")

    @staticmethod
    def sentences(text: str) -> List[str]:
        return [s.strip() for s in re.split(r"(?<=[.。!?！？])", text) if s.strip()]

    def _tone(self, sentence: str, speed: float) -> bytes:
        n = int(self.sample_rate * 0.05 * len(sentence) / speed)
        t = np.arange(n, dtype=np.float32) / self.sample_rate
        return (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2").tobytes()

    def synthesize_stream(self, text: str, language: str = "zh",
                          speed: Optional[float] = None) -> Iterator[Tuple[int, str, bytes]]:
        if not text.strip():
            raise TextError("empty text")
        for i, s in enumerate(self.sentences(text)):
            if "[hang]" in text:
                self.stop_event.wait()
            time.sleep(0.3 if "[slow]" in text else 0.02)
            yield i, s, self._tone(s, speed or 1.0)

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        assert self._ex is not None, "load() first"
        return self._ex.submit(fn, *args, **kwargs)

    def info(self) -> EngineInfo:
        return EngineInfo(kind="tts", engine="fake", device="cpu", requested_device="cpu", dtype="float32",
                          sample_rate=self.sample_rate, loaded=True, fake=True,
                          capabilities=Capabilities(streaming=True, languages=LANGUAGES))

    def shutdown(self) -> None:
        self.stop_event.set()
        if self._ex:
            self._ex.shutdown(wait=False, cancel_futures=True)


def build_asr(cfg: Config) -> FakeASRPool:
    return FakeASRPool(cfg)


def build_tts(cfg: Config) -> FakeTTSEngine:
    return FakeTTSEngine(cfg)
