"""One browser's reply speech: sentences -> daemon TTS (the shared client) -> reply audio.

Each sentence is its own TTS request (`<connection>-<turn>-<sentence>`), spoken as soon as
the agent finished writing it. A daemon that is down is said once per turn; the text is on
the page anyway. `playback_until` estimates when the browser will be done playing, for
barge-in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

from bridge.context import Context
from bridge.daemon_link import TTS_TIMEOUT
from bridge.wire import Events
from daemon.client import DaemonError
from daemon.errors import ErrorCode

logger = logging.getLogger(__name__)


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

    async def speak_all(self, turn: Any, sentences: asyncio.Queue) -> None:
        """Speak every sentence put on the queue until None."""
        idx = 0
        tts_down = False
        while True:
            text = await sentences.get()
            if text is None:
                return
            if tts_down:
                continue  # the text is on the page; the error was said once
            try:
                await self._speak(turn, idx, text)
            except DaemonError as e:
                await self.events.error(e.code.value, f"speech synthesis: {e.message}", "tts")
                await self.events.emit({"type": "tts_end", "turn": turn.no, "sentence": idx, "error": e.code.value})
                tts_down = e.code in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT, ErrorCode.SHUTTING_DOWN)
            idx += 1

    async def _speak(self, turn: Any, idx: int, text: str) -> None:
        self.ctx.daemon.check("tts")
        await self.events.emit({"type": "tts_start", "turn": turn.no, "sentence": idx, "text": text,
                                "sample_rate": self.out_rate})
        loop = asyncio.get_running_loop()
        async for chunk in self.ctx.daemon.tts.synthesize(text, request_id=f"{self.id}-{turn.no}-{idx}",
                                                          timeout=TTS_TIMEOUT):
            if not chunk.pcm:
                continue
            if turn.first_audio_at is None:
                turn.first_audio_at = time.monotonic()
                self.ctx.metrics.first_audio_latency.observe(turn.first_audio_at - turn.started)
                await self.events.emit({"type": "first_audio", "turn": turn.no,
                                        "latency_ms": ms(turn.started, turn.first_audio_at)})
            rate = chunk.sample_rate or self.out_rate
            self.playback_until = max(self.playback_until, loop.time()) + len(chunk.pcm) / 2 / rate
            self.audio_bytes_out += len(chunk.pcm)
            await self.events.audio(chunk.pcm, turn.no)
        await self.events.emit({"type": "tts_end", "turn": turn.no, "sentence": idx})
