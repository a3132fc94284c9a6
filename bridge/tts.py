"""One browser's reply speech: sentences -> daemon TTS (the shared client) -> reply audio.

Each sentence is its own TTS request (`<connection>-<turn key>-<sentence>`, owner `<connection>`),
spoken as soon as the agent finished writing it; at most MAX_SYNTHESES per connection at once.
What a turn sends the page goes through its `Outlet` (bridge/turns.py), which holds a speculative
turn's audio until it is released. A daemon that is down is said once per turn; the text is on
the page anyway. `playback_until` estimates when the browser will be done playing, for barge-in.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Dict, Optional

from bridge.context import Context
from bridge.daemon_link import TTS_TIMEOUT
from bridge.wire import Events
from daemon import protocol as P
from daemon.client import DaemonError
from daemon.errors import ErrorCode

logger = logging.getLogger(__name__)

# Synthesis requests one connection may have at the daemon at once: the reply being spoken and a
# speculative turn's first sentence. Each is the connection's own `owner` there, so the daemon's
# TTS queue is fair across connections, not first-come first-served.
MAX_SYNTHESES = 2


def ms(t0: float, t1: Optional[float]) -> Optional[float]:
    return None if t1 is None else round((t1 - t0) * 1000.0, 1)


class Speaker:
    def __init__(self, ctx: Context, events: Events, conn_id: str):
        self.ctx = ctx
        self.events = events
        self.id = conn_id
        self.out_rate = int(ctx.cfg.tts.sample_rate)
        self.playback_until = 0.0        # loop time when the browser should be done playing
        self.audio_bytes_out = 0
        self.outstanding = asyncio.Semaphore(MAX_SYNTHESES)
        self.live: Dict[str, str] = {}   # turn key -> its TTS request at the daemon now (for stop())

    async def speak_all(self, turn: Any, sentences: asyncio.Queue) -> None:
        """Speak every sentence put on the queue until None."""
        idx = 0
        tts_down = False
        while True:
            text = await sentences.get()
            if text is None:
                return
            if tts_down or getattr(turn, "silenced", False):
                continue  # the text is on the page; the error was said once
            if idx and not turn.out.released.is_set():
                await turn.out.released.wait()  # speculative: only the first sentence before the final
            try:
                await self._speak(turn, idx, text)
            except DaemonError as e:
                await turn.out.error(e.code.value, f"speech synthesis: {e.message}", "tts")
                await turn.out.emit({"type": "tts_end", "turn": turn.no, "sentence": idx, "error": e.code.value})
                tts_down = e.code in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT, ErrorCode.SHUTTING_DOWN)
            idx += 1

    async def _speak(self, turn: Any, idx: int, text: str) -> None:
        self.ctx.daemon.check("tts")
        await turn.out.emit({"type": "tts_start", "turn": turn.no, "sentence": idx, "text": text,
                             "sample_rate": self.out_rate})
        async with self.outstanding:
            rid = f"{self.id}-{turn.key}-{idx}"
            self.live[turn.key] = rid
            try:
                if not getattr(turn, "silenced", False):  # 停止播放 while it waited here: never asked for
                    await self._stream(turn, rid, text)
            finally:
                self.live.pop(turn.key, None)
        await turn.out.emit({"type": "tts_end", "turn": turn.no, "sentence": idx})

    async def _stream(self, turn: Any, rid: str, text: str) -> None:
        async for chunk in self.ctx.daemon.tts.synthesize(text, request_id=rid, timeout=TTS_TIMEOUT, owner=self.id):
            if getattr(turn, "silenced", False):
                break  # 停止播放: leaving the stream cancels the request at the daemon
            if chunk.pcm:
                await turn.out.audio(chunk.pcm, chunk.sample_rate or self.out_rate)

    async def stop(self, turn: Any) -> None:
        """The page's 停止播放: cancel `turn`'s synthesis in flight at the daemon (its stream ends;
        speak_all skips the turn's later sentences)."""
        rid = self.live.get(turn.key)
        if rid is None:
            return
        try:
            # Not waited for (the reader must go on): the daemon's `cancelled` ends the stream.
            await self.ctx.daemon.tts.send(P.Cancel(request_id=rid))
        except DaemonError:
            pass  # the daemon is gone: nothing more is synthesised either way

    def played(self, pcm: bytes, rate: int) -> None:
        """Reply audio sent to the page: when the browser will be done playing it."""
        loop = asyncio.get_running_loop()
        self.playback_until = max(self.playback_until, loop.time()) + len(pcm) / 2 / rate
        self.audio_bytes_out += len(pcm)
