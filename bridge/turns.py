"""One browser's turns: scheduling, barge-in and the agent's streamed reply.

A turn starts with a final (spoken) or a `text` message (typed), at most
`bridge.max_turns_per_minute` per connection (more get `rate_limited`). Its agent reply
streams through `SentenceBuffer`; each complete sentence goes to the `Speaker` at once. The
reply is cut at `bridge.max_reply_chars` (`reply_too_long`, agent_done `truncated`), the
whole reply must arrive within `bridge.reply_timeout`, and a reply with no text is an
`empty_reply` error: never silence without a reason. On any agent failure the user gets an
`error` event, the finished sentences and a short spoken apology.

Barge-in: `interrupt()` cancels the turn in progress (agent HTTP stream closed, daemon TTS
request cancelled), drops reply audio still queued and sends `interrupted`. Without barge-in,
replies wait for the one before (they are all heard, in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import List, Optional, Set

from websockets.exceptions import ConnectionClosed

from bridge.agents import AgentError, Conversation, stream_reply
from bridge.auth import TurnRate
from bridge.context import Context
from bridge.tts import Speaker, ms
from bridge.wire import ClientTooSlow, Events
from daemon.textsplit import SentenceBuffer

logger = logging.getLogger(__name__)

# How long a cancelled turn may take to release its agent stream and TTS request.
CANCEL_GRACE = 2.0
APOLOGY = {"zh": "抱歉，助手暂时无法回答，请稍后再试。",
           "en": "Sorry, the assistant cannot answer right now. Please try again later."}


@dataclass
class Turn:
    no: int
    text: str
    source: str                    # "speech" | "text"
    started: float = field(default_factory=time.monotonic)   # final / text received
    first_delta_at: Optional[float] = None
    first_audio_at: Optional[float] = None
    agent_done: bool = False


class Turns:
    def __init__(self, ctx: Context, events: Events, conn_id: str, conv: Conversation, speaker: Speaker):
        self.ctx = ctx
        self.events = events
        self.id = conn_id
        self.conv = conv
        self.speaker = speaker
        bc = ctx.cfg.bridge
        self.rate = TurnRate(bc.max_turns_per_minute)
        self.max_chars = bc.max_reply_chars
        self.language: Optional[str] = None
        self.no = 0
        self.current: Optional[Turn] = None
        self.tasks: Set[asyncio.Task] = set()
        self.closing = False
        self.interrupted = 0

    # --- scheduling ---------------------------------------------------------------------

    async def admit(self) -> bool:
        """Whether one more turn fits the rate limit (says `rate_limited` when not)."""
        if self.rate.allow():
            return True
        await self.events.error("rate_limited", f"more than {self.rate.per_minute} turns a minute "
                                "(bridge.max_turns_per_minute); wait a moment")
        return False

    def start(self, text: str, source: str) -> None:
        if self.closing:
            return  # the connection is going away; nobody would hear the reply
        self.no += 1
        turn = Turn(self.no, text, source)
        self.ctx.metrics.turns.labels(source).inc()
        prev = [t for t in self.tasks if not t.done()]
        task = asyncio.create_task(self._run(turn, prev), name=f"turn-{self.id}-{turn.no}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def active(self) -> bool:
        return any(not t.done() for t in self.tasks) or \
            asyncio.get_running_loop().time() < self.speaker.playback_until

    async def interrupt(self, reason: str) -> bool:
        """Barge-in: stop the reply in progress (agent, TTS, queued audio, page playback)."""
        if not self.active():
            return False
        t0 = time.monotonic()
        tasks = [t for t in self.tasks if not t.done()]
        for t in tasks:
            t.cancel()
        dropped = self.events.out.purge_audio()
        self.speaker.playback_until = 0.0
        no = self.current.no if self.current else 0
        self.interrupted += 1
        await self.events.emit({"type": "interrupted", "turn": no, "reason": reason})
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_GRACE)
        logger.info("conn %s: turn %d interrupted by %s (%d bytes of audio dropped, %.0f ms)", self.id, no,
                    reason, dropped, (time.monotonic() - t0) * 1000)
        return True

    async def close(self) -> None:
        """No new turns; cancel the running ones."""
        self.closing = True
        tasks = [t for t in self.tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_GRACE)

    async def _run(self, turn: Turn, prev: List[asyncio.Task]) -> None:
        try:
            if prev:
                await asyncio.wait(prev)
            self.current = turn
            sentences: asyncio.Queue = asyncio.Queue()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._agent(turn, sentences))
                tg.create_task(self.speaker.speak_all(turn, sentences))
        except* (ClientTooSlow, ConnectionClosed):
            pass  # the connection is going away; it cleans up
        except* Exception as eg:
            logger.error("conn %s: turn %d failed", self.id, turn.no, exc_info=eg)

    # --- the agent ----------------------------------------------------------------------

    async def _agent(self, turn: Turn, sentences: asyncio.Queue) -> None:
        buf = SentenceBuffer()
        parts: List[str] = []
        size = 0
        truncated = False
        cfg = self.ctx.cfg
        try:
            replies = stream_reply(self.conv, turn.text, float(cfg.agent.timeout),
                                   total=float(cfg.bridge.reply_timeout))
            async with contextlib.aclosing(replies):  # closing it closes the agent's HTTP stream
                async for delta in replies:
                    if turn.first_delta_at is None:
                        turn.first_delta_at = time.monotonic()
                    if size + len(delta) > self.max_chars:
                        delta, truncated = delta[:self.max_chars - size], True
                    if delta:
                        size += len(delta)
                        parts.append(delta)
                        await self.events.emit({"type": "agent_delta", "turn": turn.no, "text": delta})
                        for s in buf.push(delta):
                            sentences.put_nowait(s)
                    if truncated:
                        break
            if not parts:
                raise AgentError("empty_reply", "the agent's reply was empty")
            for s in buf.flush():
                sentences.put_nowait(s)
            turn.agent_done = True
            done = {"type": "agent_done", "turn": turn.no, "text": "".join(parts),
                    "first_token_ms": ms(turn.started, turn.first_delta_at)}
            if truncated:
                done["truncated"] = True
                await self.events.error("reply_too_long", f"the reply was cut at {self.max_chars} characters "
                                        "(bridge.max_reply_chars)", "agent")
            await self.events.emit(done)
        except AgentError as e:
            logger.warning("conn %s: turn %d: agent failed: %s (%s)", self.id, turn.no, e.message, e.code)
            await self.events.error(e.code, f"agent: {e.message}", "agent")
            turn.agent_done = True
            await self.events.emit({"type": "agent_done", "turn": turn.no, "text": "".join(parts), "error": e.code})
            sentences.put_nowait(self._apology(turn.text))
        finally:
            sentences.put_nowait(None)

    def _apology(self, user_text: str) -> str:
        lang = self.language if self.language in ("zh", "en") else ("en" if user_text.isascii() else "zh")
        return APOLOGY[lang]
