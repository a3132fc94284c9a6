"""One browser's turns: scheduling, barge-in and the agent's streamed reply.

A turn starts with a final (spoken) or a `text` message (typed), at most
`bridge.max_turns_per_minute` per connection (more get `rate_limited`). Its agent reply
streams to the `Speaker` as it comes: one daemon TTS request per reply, the daemon cutting and
speaking each sentence as soon as it is complete. The
reply is cut at `bridge.max_reply_chars` (`reply_too_long`, agent_done `truncated`), the
whole reply must arrive within `bridge.reply_timeout`, and a reply with no text is an
`empty_reply` error: never silence without a reason. On any agent failure the user gets an
`error` event, the finished sentences and a short spoken apology.

Barge-in: `interrupt()` cancels the turn in progress (agent HTTP stream closed, daemon TTS
request cancelled), drops reply audio still queued and sends `interrupted`. Without barge-in,
replies wait for the one before (they are all heard, in order).

Speculative turns (`turn.speculate`): `speculate()` starts a turn on the daemon's `tentative`
text before the utterance is final. It runs like any turn (agent, sentences, synthesis) but its
`Outlet` holds everything it would send the page. `confirm()` on the final releases it at once
when the final says the same (normalised), else drops it; `drop_speculation()` (the user went
on, typed, or a new utterance began) drops it: its agent run is cancelled and forgotten
(`Conversation.discard`), its TTS request cancelled, and nothing it produced reaches the page.
Its TTS request is opened with `hold`: the daemon synthesises only its first sentence (or first
clause) until the turn is released.
A speculative turn gets its turn number only when released, so the page never sees a gap.

What the page learns about timing: a spoken turn's `first_audio` carries `speech_end_ms` (the
user's speech end, where the final's `latency_ms` counts from, -> first reply audio, on the
bridge's clock) beside `latency_ms` (final -> first audio). With speculation on, every spoken
turn and every dropped speculative turn sends `speculation` {`released`, `cancelled`, `turns`}:
the connection's running counts (cancelled = wasted), never anything of the dropped turn.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

from websockets.exceptions import ConnectionClosed

from bridge.agents import AgentError, Conversation, stream_reply
from bridge.auth import TurnRate
from bridge.context import Context
from bridge.tts import Speaker, ms
from bridge.wire import ClientTooSlow, Events
from daemon.rules import SPOKEN_LANGUAGES

logger = logging.getLogger(__name__)

# How long a cancelled turn may take to release its agent stream and TTS request.
CANCEL_GRACE = 2.0
APOLOGY = {"zh": "抱歉，助手暂时无法回答，请稍后再试。",
           "en": "Sorry, the assistant cannot answer right now. Please try again later."}


_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


def same_text(a: str, b: str) -> bool:
    """Whether a tentative and a final say the same: case, spaces and punctuation ignored."""
    return _NOT_WORD.sub("", a).casefold() == _NOT_WORD.sub("", b).casefold()


@dataclass
class Turn:
    no: int                        # 0 while speculative: numbered when released
    text: str
    source: str                    # "speech" | "text"
    started: float = field(default_factory=time.monotonic)   # final / text / tentative received
    first_delta_at: Optional[float] = None
    first_audio_at: Optional[float] = None
    agent_done: bool = False
    key: str = ""                  # in TTS request ids: unique per connection, also when dropped
    final_at: Optional[float] = None   # a speculative turn: when its final released it
    speech_end: Optional[float] = None  # a spoken turn: when the user's speech ended (its audio arrived)
    out: Any = None                # its Outlet
    asked: bool = False            # its agent request has started (only then is there a reply to discard)
    silenced: bool = False         # the page pressed 停止播放: nothing more of it is synthesised


class Outlet:
    """Where one turn's page output goes: straight to the connection, or, for a speculative turn,
    held in order until `release()` (sent then, in order) or `drop()` (never sent). First-audio
    latency and the playback estimate count from when audio is really sent."""

    def __init__(self, events: Events, speaker: Speaker, turn: Turn, held: bool = False):
        self.events = events
        self.speaker = speaker
        self.turn = turn
        self.held = held
        self.dropped = False
        self.released = asyncio.Event()
        if not held:
            self.released.set()
        self._buf: Deque[Tuple[str, Any]] = collections.deque()

    async def emit(self, event: Dict[str, Any]) -> None:
        await self._put(("emit", event))

    async def error(self, code: str, message: str, source: str = "bridge") -> None:
        await self._put(("error", (code, message, source)))

    async def audio(self, pcm: bytes, rate: int) -> None:
        await self._put(("audio", (pcm, rate)))

    async def _put(self, item: Tuple[str, Any]) -> None:
        if self.dropped:
            return
        if self.held:
            self._buf.append(item)
        else:
            await self._send(item)

    async def _send(self, item: Tuple[str, Any]) -> None:
        kind, x = item
        t = self.turn
        if kind == "emit":
            await self.events.emit({**x, "turn": t.no} if "turn" in x else x)
        elif kind == "error":
            await self.events.error(*x, turn=t.no)  # the page puts it on that turn's bubble
        else:
            pcm, rate = x
            if t.first_audio_at is None:
                t.first_audio_at = time.monotonic()
                t0 = t.final_at if t.final_at is not None else t.started
                self.speaker.ctx.metrics.first_audio_latency.observe(max(t.first_audio_at - t0, 0.0))
                event = {"type": "first_audio", "turn": t.no, "latency_ms": ms(t0, t.first_audio_at)}
                if t.speech_end is not None:
                    event["speech_end_ms"] = ms(t.speech_end, t.first_audio_at)
                if t.final_at is not None:
                    event["speculative"] = True
                await self.events.emit(event)
            self.speaker.played(pcm, rate)
            await self.events.audio(pcm, t.no)

    async def release(self) -> None:
        while self._buf and not self.dropped:
            await self._send(self._buf.popleft())
        self.held = False  # no await since the buffer was seen empty: nothing slips out of order
        self.released.set()

    def drop(self) -> None:
        self.dropped = True
        self._buf.clear()


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
        self.speculative = bool(ctx.cfg.turn.speculate)
        self.spec: Optional[Tuple[Turn, asyncio.Task]] = None   # the speculative turn, held
        self.spec_no = 0
        self.spec_released = 0
        self.spec_wasted = 0
        self.heard = 0                 # spoken turns (finals that got a turn), for `speculation`

    # --- scheduling ---------------------------------------------------------------------

    async def admit(self) -> bool:
        """Whether one more turn fits the rate limit (says `rate_limited` when not)."""
        if self.rate.allow():
            return True
        await self.events.error("rate_limited", f"more than {self.rate.per_minute} turns a minute "
                                "(bridge.max_turns_per_minute); wait a moment")
        return False

    def start(self, text: str, source: str, speech_end: Optional[float] = None) -> None:
        if self.closing:
            return  # the connection is going away; nobody would hear the reply
        self.no += 1
        turn = Turn(self.no, text, source, key=str(self.no), speech_end=speech_end)
        turn.out = Outlet(self.events, self.speaker, turn)
        self.ctx.metrics.turns.labels(source).inc()
        prev = [t for t in self.tasks if not t.done()]
        task = asyncio.create_task(self._run(turn, prev), name=f"turn-{self.id}-{turn.no}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- speculative turns --------------------------------------------------------------

    async def speculate(self, text: str) -> None:
        """Start a held turn on a tentative text (a newer tentative replaces an older one)."""
        if self.closing or not self.speculative:
            return
        if self.spec is not None:
            if same_text(self.spec[0].text, text):
                return  # already working on exactly this
            await self.drop_speculation("newer tentative")
        self.spec_no += 1
        turn = Turn(0, text, "speech", key=f"s{self.spec_no}")
        turn.out = Outlet(self.events, self.speaker, turn, held=True)
        prev = [t for t in self.tasks if not t.done()]
        task = asyncio.create_task(self._run(turn, prev), name=f"turn-{self.id}-{turn.key}")
        self.spec = (turn, task)
        logger.info("conn %s: speculative turn %s started on %r", self.id, turn.key, text[:80])

    async def confirm(self, text: str, speech_end: Optional[float] = None) -> bool:
        """On a final (a spoken turn): release the speculative turn if it said the same (True),
        else drop it (False: the caller starts the turn)."""
        if self.spec is None:
            if self.speculative:
                self.heard += 1
                await self._report()
            return False
        turn, task = self.spec
        if not same_text(turn.text, text):
            await self.drop_speculation("final differs", report=False)
            self.heard += 1
            await self._report()
            return False
        self.spec = None
        self.no += 1
        turn.no = turn.no or self.no
        turn.text = text
        turn.final_at = time.monotonic()
        turn.speech_end = speech_end
        self.spec_released += 1
        self.heard += 1
        self.ctx.metrics.turns.labels("speech").inc()
        self.ctx.metrics.speculative.labels("released").inc()
        if not task.done():
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self.current = turn
        logger.info("conn %s: speculative turn %s released as turn %d (%.0f ms after it started)", self.id,
                    turn.key, turn.no, (turn.final_at - turn.started) * 1000)
        await self._report()
        await turn.out.release()
        return True

    async def _report(self) -> None:
        """The page's running counts: speculative turns released and cancelled, spoken turns."""
        await self.events.emit({"type": "speculation", "released": self.spec_released,
                                "cancelled": self.spec_wasted, "turns": self.heard})

    async def drop_speculation(self, reason: str, report: bool = True) -> bool:
        """Cancel the speculative turn: nothing of it reaches the page (only the new counts, in
        `speculation`); the agent forgets it."""
        if self.spec is None:
            return False
        (turn, task), self.spec = self.spec, None
        turn.out.drop()
        task.cancel()
        self.spec_wasted += 1
        self.ctx.metrics.speculative.labels("cancelled").inc()
        if report and not self.closing:
            await self._report()
        await asyncio.wait([task], timeout=CANCEL_GRACE)
        if not turn.asked:
            # Still waiting for the turn before it (barge-in off): it never reached the agent, and
            # the conversation's last exchange is a heard one that must not be forgotten.
            logger.info("conn %s: speculative turn %s cancelled before asking the agent (%s)", self.id, turn.key,
                        reason)
            return True
        try:
            await self.conv.discard()
        except Exception:  # the agent may be gone; the reply was never shown anyway
            logger.warning("conn %s: could not discard speculative turn %s at the agent", self.id, turn.key,
                           exc_info=True)
        logger.info("conn %s: speculative turn %s cancelled (%s)", self.id, turn.key, reason)
        return True

    async def stop_speech(self, no: Any = None) -> bool:
        """The page's 停止播放 (`stop_playback` {`turn`?}): the reply being spoken says nothing more.
        Its synthesis in flight is cancelled at the daemon, its sentences not yet synthesised are
        skipped and its queued audio dropped; its text still comes. A `turn` that is not the
        current one (the page was behind) changes nothing."""
        turn = self.current
        if turn is None or turn.silenced or (isinstance(no, int) and no != turn.no):
            return False
        turn.silenced = True
        dropped = self.events.out.purge_audio()
        self.speaker.playback_until = 0.0
        await self.speaker.stop(turn)
        logger.info("conn %s: turn %d: playback stopped by the page (%d bytes of audio dropped)", self.id, turn.no,
                    dropped)
        return True

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
        if self.spec is not None:
            self.spec[0].out.drop()
            self.spec[1].cancel()
            self.tasks.add(self.spec[1])
            self.spec = None
        tasks = [t for t in self.tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_GRACE)

    async def _run(self, turn: Turn, prev: List[asyncio.Task]) -> None:
        try:
            if prev:
                await asyncio.wait(prev)
            if not turn.out.held:
                self.current = turn
            texts: asyncio.Queue = asyncio.Queue()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._agent(turn, texts))
                tg.create_task(self.speaker.speak_all(turn, texts))
        except* (ClientTooSlow, ConnectionClosed):
            pass  # the connection is going away; it cleans up
        except* Exception as eg:
            logger.error("conn %s: turn %d failed", self.id, turn.no, exc_info=eg)

    # --- the agent ----------------------------------------------------------------------

    async def _agent(self, turn: Turn, texts: asyncio.Queue) -> None:
        """The agent's reply, each delta to the page and to the Speaker's queue as (text,
        drop_partial) pieces, then None."""
        parts: List[str] = []
        size = 0
        truncated = False
        cfg = self.ctx.cfg
        try:
            turn.asked = True
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
                        await turn.out.emit({"type": "agent_delta", "turn": turn.no, "text": delta})
                        texts.put_nowait((delta, False))
                    if truncated:
                        break
            if not parts:
                raise AgentError("empty_reply", "the agent's reply was empty")
            turn.agent_done = True
            done = {"type": "agent_done", "turn": turn.no, "text": "".join(parts),
                    "first_token_ms": ms(turn.started, turn.first_delta_at)}
            if truncated:
                done["truncated"] = True
                await turn.out.error("reply_too_long", f"the reply was cut at {self.max_chars} characters "
                                     "(bridge.max_reply_chars)", "agent")
            await turn.out.emit(done)
        except AgentError as e:
            logger.warning("conn %s: turn %d: agent failed: %s (%s)", self.id, turn.no, e.message, e.code)
            await turn.out.error(e.code, f"agent: {e.message}", "agent")
            turn.agent_done = True
            await turn.out.emit({"type": "agent_done", "turn": turn.no, "text": "".join(parts), "error": e.code})
            # The unfinished sentence it broke off in is not spoken; the apology is.
            texts.put_nowait(("\n" + self._apology(turn.text), True))
        finally:
            texts.put_nowait(None)

    def _apology(self, user_text: str) -> str:
        lang = self.language if self.language in SPOKEN_LANGUAGES else ("en" if user_text.isascii() else "zh")
        return APOLOGY[lang]
