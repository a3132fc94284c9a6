"""A streamed-text TTS request's text (daemon/tts/jobs.py serves the request): `TextFeed` cuts
the chunks into sentences as they arrive (`textsplit.SentenceBuffer`, the one splitter), holding
all but the first while the request holds; `_chain` runs on the TTS worker and speaks them in
order through the engine, one `next` per engine call, however many sentences."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable, Deque, Iterator, List, Optional, Tuple

from daemon.tts import textsplit
from daemon.engines import TTSEngine
from daemon.errors import TextError

logger = logging.getLogger(__name__)

Item = Tuple[int, str, bytes]  # (sentence index, sentence, PCM16)


class TextFeed:
    """A streamed request's text: cut into sentences as chunks arrive, handed to its `_chain`
    (on the worker) through `ready`; all but the first wait in `held` while the request holds.
    Its counts bound what the client chooses (see `TTSJobs._chunk`)."""

    def __init__(self, first_clause: bool, hold: bool, clock: Callable[[], float] = time.monotonic):
        self.buf = textsplit.SentenceBuffer(first_clause_cjk=textsplit.FIRST_CLAUSE_MIN_CJK if first_clause else 0)
        self.ready: Deque[str] = collections.deque()  # popped by _chain on the worker thread
        self.held: List[str] = []
        self.hold = hold
        self.given = 0          # sentences handed to the chain
        self.chars = 0
        self.chunks = 0
        self.parts: List[str] = []  # the text as it came (bounded by limits.max_text_chars)
        self.ended = False
        self.busy = False       # the chain may have more audio of the sentence it is on
        self.clock = clock
        self.last = clock()     # last chunk (or the last time the request went idle)
        self.tokens = 0.0       # chunks-per-second bucket
        self.refilled = self.last
        self.spoken = 0         # sentences that produced audio (the chain's)
        self.skipped = 0        # sentences with nothing the voice can say
        self.wake = asyncio.Event()

    def add(self, sentences: List[str]) -> None:
        self.held.extend(sentences)
        while self.held and not (self.hold and self.given):
            self.ready.append(self.held.pop(0))
            self.given += 1
        self.wake.set()

    @property
    def finished(self) -> bool:
        return self.ended and not self.held and not self.ready and not self.busy


def _chain(engine: TTSEngine, feed: TextFeed, language: str, speed: float) -> Iterator[Optional[Item]]:
    """On the worker: the streamed request's sentences, in order, each through the engine as it
    comes; None when no sentence is ready (the job waits for text, then asks again). A sentence
    with nothing the voice can say is skipped, sent as one audio frame with no samples (the request
    fails only if none is spoken)."""
    while True:
        if not feed.ready:
            yield None
            continue
        sentence = feed.ready.popleft()
        index = feed.spoken + feed.skipped
        try:
            for i, text, pcm in engine.synthesize_stream(sentence, language, speed):
                feed.spoken = max(feed.spoken, index - feed.skipped + int(i) + 1)
                yield index + int(i), text, pcm
        except TextError as e:
            feed.skipped += 1
            logger.info("tts: skipped a sentence with nothing to say (%s)", e.message)
            yield index, sentence, b""  # one frame with no audio: the client can say which went unspoken
