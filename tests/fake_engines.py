"""FAKE engines for daemon tests that are about the daemon (protocol, routing, lifecycle),
not about speech recognition or synthesis. Selected only through the test-only factory hook
``S2S_TEST_ENGINES=tests.fake_engines``.

FakeASRPool: deterministic energy endpointing on 100 ms blocks. A block whose RMS exceeds
0.01 is speech; 0.5 s of silence after speech ends the utterance. Events follow the
daemon.engines format; a final's text is ``"utt<N> bytes=<PCM16 bytes of the utterance>"``
so a test can check each client got the finals of its own audio.

Test knobs travel in-band as hotwords (the fake accepts any hotword):
  ``fake:delay=0.2``  sleep that many seconds in every feed() (slow engine)
  ``fake:rtf=0.5``    sleep 0.5 s per second of audio in every feed() (an engine whose cost
                      is proportional to audio, so 1/rtf real-time streams fill the worker)
  ``fake:hang``       the next feed() blocks the worker until shutdown (hung engine: the
                      watchdog heartbeat stops completing)
  ``fake:open_error`` open() raises a RuntimeError (an engine bug, not an S2SError)
  ``fake:die``        the next feed() shuts the worker's executor down (a dead engine worker)
The pool keeps no session cap of its own (the daemon admits); `open` takes the reloadable
per-session values (`partial_interval`: one partial per that many seconds of speech,
`max_utterance_seconds`) as the real pools do. ``S2S_FAKE_LOAD_SECONDS`` makes load() take
that long (default 0.2 s).
With ``S2S_FAKE_FEED_LOG=PATH`` in the daemon's environment every feed() appends
``"<session_id> <samples>"`` to PATH, so a test can see how the daemon chunks audio.
FakeTTSEngine: one sentence per ``.``/``。``/``!``/``?``; each sentence is a 440 Hz tone of
0.05 s per character at 24 kHz, with 0.02 s of (sleep) work per sentence; text containing
``[slow]`` takes 0.3 s per sentence and ``[hang]`` blocks the worker until shutdown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from daemon.audio import to_float32
from daemon.config import Config
from daemon.engines import Capabilities, EngineInfo
from daemon.errors import TextError

BLOCK = 1600  # 100 ms at 16 kHz
THRESHOLD = 0.01
END_SILENCE_BLOCKS = 5
PARTIAL_EVERY_BLOCKS = 5


class FakeASRSession:
    def __init__(self, session_id: str, pool: "FakeASRPool", partials: bool = True,
                 partial_interval: float = PARTIAL_EVERY_BLOCKS * 0.1):
        self.session_id = session_id
        self.partial_blocks = max(1, int(round(partial_interval * 10)))
        self.pool = pool
        self.partials = partials
        self.language = "zh"
        self.hotwords: Tuple[str, ...] = ()
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
        self._pending: List[Dict[str, Any]] = []

    def set_language(self, lang: str) -> None:
        self.language = lang

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

    def _final(self, reason: str) -> Dict[str, Any]:
        ev = {"type": "final", "text": f"utt{self._utt} bytes={self._utt_samples * 2}" if self._utt_samples else "",
              "start": self._utt_start / 16000, "end": self._t / 16000, "utterance": self._utt, "reason": reason}
        if self._in_speech:
            self._utt += 1
        self._in_speech = False
        self._utt_samples = 0
        self._silence = 0
        return ev

    def feed(self, pcm: Any) -> List[Dict[str, Any]]:
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
        out: List[Dict[str, Any]] = []
        while len(self._buf) >= BLOCK:
            block, self._buf = self._buf[:BLOCK], self._buf[BLOCK:]
            loud = float(np.sqrt(np.mean(block * block))) > THRESHOLD
            if loud and not self._in_speech:
                self._in_speech = True
                self._utt_start = self._t
                self._since_partial = 0
                out.append({"type": "speech_start", "start": self._t / 16000, "utterance": self._utt})
            self._t += BLOCK
            if self._in_speech:
                self._utt_samples += BLOCK
                self._silence = 0 if loud else self._silence + 1
                self._since_partial += 1
                if self.partials and loud and self._since_partial >= self.partial_blocks:
                    self._since_partial = 0
                    out.append({"type": "partial", "text": f"utt{self._utt} bytes~{self._utt_samples * 2}",
                                "start": self._utt_start / 16000, "end": self._t / 16000, "utterance": self._utt})
                if self._silence >= END_SILENCE_BLOCKS:
                    out.append(self._final("vad"))
        return out

    def feed_audio(self, pcm: Any) -> Optional[Dict[str, Any]]:
        self._pending += self.feed(pcm)
        return self._pending.pop(0) if self._pending else None

    def finalize_events(self) -> List[Dict[str, Any]]:
        if len(self._buf):
            # Count the tail as part of the utterance when speech is ongoing.
            if self._in_speech:
                self._utt_samples += len(self._buf)
            self._t += len(self._buf)
            self._buf = np.zeros(0, dtype=np.float32)
        return [self._final("finalize")]

    def finalize(self) -> Dict[str, Any]:
        return self.finalize_events()[-1]


class FakeASRPool:
    name = "fake"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.sessions: Dict[str, FakeASRSession] = {}
        self.stop_event = threading.Event()
        self._ex: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self.loaded = False

    def load(self) -> None:
        self._ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fake-asr")
        # something for EXTEND_TIMEOUT/READY ordering to be about
        time.sleep(float(os.environ.get("S2S_FAKE_LOAD_SECONDS", "0.2")))
        self.loaded = True

    def open(self, session_id: str, language: Optional[str] = None, hotwords: Optional[Sequence[str]] = None,
             partials: bool = True, partial_interval: Optional[float] = None,
             max_utterance_seconds: Optional[float] = None) -> FakeASRSession:
        s = FakeASRSession(session_id, self, partials,
                           PARTIAL_EVERY_BLOCKS * 0.1 if partial_interval is None else partial_interval)
        if language:
            s.set_language(language)
        if hotwords:
            s.set_hotwords(hotwords)
        self.sessions[session_id] = s
        return s

    def get(self, session_id: str) -> Optional[FakeASRSession]:
        return self.sessions.get(session_id)

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def gc_idle(self, now: Optional[float] = None) -> List[str]:
        return []

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        assert self._ex is not None, "load() first"
        return self._ex.submit(fn, *args, **kwargs)

    def info(self) -> EngineInfo:
        return EngineInfo(kind="asr", engine="fake", device="cpu", requested_device="cpu", dtype="float32",
                          sample_rate=16000, loaded=True, fake=True, sessions=len(self.sessions),
                          capabilities=Capabilities(partials=True, hotwords=True, punctuation=True,
                                                    languages=("zh", "en", "auto")))

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

    def synthesize(self, text: str, language: str = "zh", speed: Optional[float] = None) -> bytes:
        return b"".join(p for _i, _s, p in self.synthesize_stream(text, language, speed))

    async def synthesize_async(self, text: str, language: str = "zh", speed: Optional[float] = None) -> bytes:
        return await asyncio.wrap_future(self.submit(self.synthesize, text, language, speed))

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        assert self._ex is not None, "load() first"
        return self._ex.submit(fn, *args, **kwargs)

    def info(self) -> EngineInfo:
        return EngineInfo(kind="tts", engine="fake", device="cpu", requested_device="cpu", dtype="float32",
                          sample_rate=self.sample_rate, loaded=True, fake=True,
                          capabilities=Capabilities(streaming=True, languages=("zh", "en", "auto")))

    def shutdown(self) -> None:
        self.stop_event.set()
        if self._ex:
            self._ex.shutdown(wait=False, cancel_futures=True)


def build_asr(cfg: Config) -> FakeASRPool:
    return FakeASRPool(cfg)


def build_tts(cfg: Config) -> FakeTTSEngine:
    return FakeTTSEngine(cfg)
