"""One browser's reply speech: the agent's text -> one daemon TTS request -> reply audio.

A reply is one streamed-text request at the daemon (`<connection>-<turn key>`, owner
`<connection>`): its text goes there as the agent writes it, and the daemon cuts the sentences
(daemon/tts/textsplit.py, the one splitter) and speaks each as soon as it is complete. The page still
gets `tts_start` / `tts_end` per sentence, from the sentence index and text on the daemon's audio.
A speculative turn's request is opened with `hold` (only its first sentence is synthesised) and
released when the turn is. What a turn sends the page goes through its `Outlet` (bridge/turns.py),
which holds a speculative turn's audio until it is released. At most MAX_SYNTHESES requests per
connection at once. A daemon that is down is said once per turn; the text is on the page anyway.
`playback_until` estimates when the browser will be done playing, for barge-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Dict, List, Optional, Tuple

from bridge.context import Context
from bridge.daemon_link import TTS_TIMEOUT
from bridge.synth_retry import RetryingSynthStream
from bridge.wire import Events
from daemon.wire.client import DaemonError

logger = logging.getLogger(__name__)

# Synthesis requests one connection may have at the daemon at once: the reply being spoken and a
# speculative turn's. Each is the connection's own `owner` there, so the daemon's TTS queue is
# fair across connections, not first-come first-served.
MAX_SYNTHESES = 2

# What a turn's text queue carries: (text, drop_partial) until None. drop_partial: the reply broke
# off; what follows its last complete sentence is not spoken (an apology follows).
Piece = Tuple[str, bool]


def ms(t0: float, t1: Optional[float]) -> Optional[float]:
    return None if t1 is None else round((t1 - t0) * 1000.0, 1)


async def _drain(texts: asyncio.Queue) -> None:
    while await texts.get() is not None:
        pass


class Speaker:
    def __init__(self, ctx: Context, events: Events, conn_id: str):
        self.ctx = ctx
        self.events = events
        self.id = conn_id
        self.out_rate = int(ctx.cfg.tts.sample_rate)
        self.playback_until = 0.0        # loop time when the browser should be done playing
        self.audio_bytes_out = 0
        self.outstanding = asyncio.Semaphore(MAX_SYNTHESES)
        self.live: Dict[str, RetryingSynthStream] = {}   # turn key -> its TTS request at the daemon (for stop())

    async def speak_all(self, turn: Any, texts: asyncio.Queue) -> None:
        """Speak the reply's text put on the queue ((text, drop_partial) pieces until None) as one
        daemon request, opened at its first piece. A reply longer than the daemon takes in one
        request (limits.max_text_chars) goes on in a next one, its sentences numbered on."""
        first = await texts.get()
        if first is None:
            return
        pieces: List[Piece] = [first]
        part = sentences = 0
        while pieces:
            if getattr(turn, "silenced", False):
                return await _drain(texts)
            try:
                self.ctx.daemon.check("tts")
            except DaemonError as e:
                await self._failed(turn, e, sentences)
                return await _drain(texts)
            rid = f"{self.id}-{turn.key}" + (f"-{part}" if part else "")
            pieces, spoken, ok = await self._request(turn, rid, pieces, texts, sentences)
            if not ok:
                return await _drain(texts)
            part += 1
            sentences += spoken

    async def _request(self, turn: Any, rid: str, pieces: List[Piece], texts: asyncio.Queue,
                       base: int) -> Tuple[List[Piece], int, bool]:
        """One daemon request: (the pieces past its text limit, sentences spoken, whether it went well)."""
        async with self.outstanding:
            if getattr(turn, "silenced", False):  # 停止播放 while it waited here: never asked for
                return [], 0, False
            held = not turn.out.released.is_set()
            try:
                stream = await self.ctx.daemon.synthesize_stream(request_id=rid, owner=self.id, hold=held,
                                                                 timeout=TTS_TIMEOUT)
            except DaemonError as e:
                await self._failed(turn, e, base)
                return [], 0, False
            self.live[turn.key] = stream
            release = asyncio.create_task(self._release(turn, stream)) if held else None
            try:
                async with asyncio.TaskGroup() as tg:
                    feed = tg.create_task(self._feed(stream, pieces, texts))
                    read = tg.create_task(self._read(turn, stream, base))
                rest = feed.result()
                spoken, ok = read.result()
                return rest, spoken, ok
            finally:
                self.live.pop(turn.key, None)
                if release is not None:
                    release.cancel()
                await stream.cancel()  # left early (barge-in, a dropped speculation): stop it there

    async def _feed(self, stream: RetryingSynthStream, pieces: List[Piece], texts: asyncio.Queue) -> List[Piece]:
        """The reply's text to the daemon as it comes (what queued meanwhile goes as one chunk), up
        to what one request takes; returns the pieces past that (empty: the reply ended here)."""
        room = int(self.ctx.cfg.limits.max_text_chars)
        pending = list(pieces)
        while True:
            end = False
            while not end:
                try:
                    item = texts.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if item is None:
                    end = True
                    texts.put_nowait(None)  # the reply's end stays queued: for _drain, or a next request
                else:
                    pending.append(item)
            chunks: List[Piece] = []
            for text, drop in pending:  # a drop_partial piece starts a chunk of its own
                if chunks and not drop:
                    chunks[-1] = (chunks[-1][0] + text, chunks[-1][1])
                else:
                    chunks.append((text, drop))
            pending = []
            for i, (text, drop) in enumerate(chunks):
                if stream.finished:
                    return []  # the reader says why
                last = i == len(chunks) - 1
                try:
                    if len(text) > room:  # the rest goes in the next request
                        await stream.end(text[:room], drop_partial=drop)
                        rest = [(text[room:], False)] + chunks[i + 1:]
                        if not end:
                            rest.append(await self._until_end(texts, rest))
                        return [p for p in rest if p[0]]
                    await stream.send(text, final=end and last, drop_partial=drop)
                    room -= len(text)
                except DaemonError:
                    return []
            if end:
                if not chunks and not stream.finished:
                    with contextlib.suppress(DaemonError):
                        await stream.end()
                return []
            item = await texts.get()
            if item is None:
                texts.put_nowait(None)  # as above
                if not stream.finished:
                    with contextlib.suppress(DaemonError):
                        await stream.end()
                return []
            pending.append(item)

    @staticmethod
    async def _until_end(texts: asyncio.Queue, rest: List[Piece]) -> Piece:
        """Pieces past one request's text while it is being spoken: kept for the next (the end
        of the reply stays on the queue, as the marker it is)."""
        joined = ""
        while True:
            item = await texts.get()
            if item is None:
                texts.put_nowait(None)
                return (joined, False)
            if item[1]:
                rest.append((joined, False))
                joined = ""
                rest.append(item)
            else:
                joined += item[0]

    async def _release(self, turn: Any, stream: RetryingSynthStream) -> None:
        """A speculative turn's request goes on past its first sentence once the turn is released."""
        await turn.out.released.wait()
        if not stream.finished:
            with contextlib.suppress(DaemonError):
                await stream.release()

    async def _read(self, turn: Any, stream: RetryingSynthStream, base: int) -> Tuple[int, bool]:
        """Audio to the page, with tts_start / tts_end around each sentence's (numbered from
        `base`): (sentences, whether the request went well)."""
        current: Optional[int] = None
        got = 0  # bytes of the current sentence: none = the daemon skipped it (nothing this voice can say)
        ok = True
        try:
            async with contextlib.aclosing(stream.audio()) as chunks:
                async for chunk in chunks:
                    if getattr(turn, "silenced", False):
                        ok = False
                        break  # 停止播放: leaving the stream cancels the request at the daemon
                    if base + chunk.sentence != current:
                        if current is not None:
                            await self._end(turn, current, got)
                        current, got = base + chunk.sentence, 0
                        await turn.out.emit({"type": "tts_start", "turn": turn.no, "sentence": current,
                                             "text": chunk.text, "sample_rate": self.out_rate})
                    got += len(chunk.pcm)
                    if chunk.pcm:
                        await turn.out.audio(chunk.pcm, chunk.sample_rate or self.out_rate)
        except DaemonError as e:
            if current is not None and got:
                await turn.out.emit({"type": "tts_end", "turn": turn.no, "sentence": current})
            elif current is not None:  # the skipped sentence is the one this error is about
                await self._failed(turn, e, current)
                return 0, False
            await self._failed(turn, e, base if current is None else current + 1)
            return 0, False
        finally:
            if not stream.finished:
                await stream.cancel()
        if current is not None:
            await self._end(turn, current, got)
        if getattr(turn, "silenced", False):
            ok = False
        return (0 if current is None else current + 1 - base), ok

    @staticmethod
    async def _end(turn: Any, sentence: int, got: int) -> None:
        """tts_end of a sentence; one the daemon skipped (no audio) ends with error bad_text."""
        event: Dict[str, Any] = {"type": "tts_end", "turn": turn.no, "sentence": sentence}
        if not got:
            event["error"] = "bad_text"
        await turn.out.emit(event)

    async def _failed(self, turn: Any, e: DaemonError, sentence: int) -> None:
        await turn.out.error(e.code.value, f"speech synthesis: {e.message}", "tts")
        await turn.out.emit({"type": "tts_end", "turn": turn.no, "sentence": sentence, "error": e.code.value})

    async def stop(self, turn: Any) -> None:
        """The page's 停止播放: cancel `turn`'s synthesis at the daemon (its stream ends; the rest of
        its text is not sent)."""
        stream = self.live.get(turn.key)
        if stream is not None:
            # Not waited for (the reader must go on): the daemon's `cancelled` ends the stream.
            await stream.cancel()

    def played(self, pcm: bytes, rate: int) -> None:
        """Reply audio sent to the page: when the browser will be done playing it."""
        loop = asyncio.get_running_loop()
        self.playback_until = max(self.playback_until, loop.time()) + len(pcm) / 2 / rate
        self.audio_bytes_out += len(pcm)
