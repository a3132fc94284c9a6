"""One browser's speech recognition: its daemon ASR session, audio batching and the event pump.

Audio batching at the edge: the page sends 40 ms frames; the daemon's VAD works in 200 ms
steps (100 ms while it counts silence in an utterance, where endpointing is decided). Frames are
collected per session and forwarded in pieces of that 100 ms step (`daemon.rules.FORWARD_BYTES`),
the rest on `stop`, so a session costs the daemon 10 messages a second instead of 25 and the VAD
has its tail step's audio when it is due. Arrival times are kept per browser frame, so the speech end -> final latency
still counts from when the audio reached the bridge. One message to the daemon carries at most
the `max_chunk_seconds` its `opened` advertises (limits.max_chunk_seconds; it refuses more).

Each connection's audio is budgeted (`AudioBudget`: bridge.audio_burst_seconds ahead of real
time, then bridge.max_audio_speed times real time); what runs further ahead is dropped with a
`busy` error for that connection only, so a flood cannot fill the daemon link all share.

The pump reads the session's events and turns them into page events; `on_activity` (speech
start, a non-empty partial: barge-in), `on_final` (a turn: the text and, on the bridge's clock,
when the audio of the speech's end arrived) and `on_tentative` (a speculative
turn; the session asks the daemon for `tentative`/`resume` when `turn.speculate` is on) are the
connection's. Tentatives are not shown to the page: only a final is what the user said.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Awaitable, Callable, Deque, Dict, Optional, Tuple

from websockets.exceptions import ConnectionClosed

from bridge.auth import AudioBudget
from bridge.context import Context
from bridge.daemon_link import OPEN_TIMEOUT
from bridge.wire import ClientTooSlow, Events
from daemon.rules import FORWARD_BYTES
from daemon.wire import protocol as P
from daemon.wire.client import AsyncASRStream, DaemonError, new_id

logger = logging.getLogger(__name__)

INPUT_RATE = 16000
# Largest audio message forwarded to a daemon whose `opened` does not say its max_chunk_seconds.
DAEMON_CHUNK_BYTES = INPUT_RATE * 2  # 1 s
# Audio arrival marks kept for the speech-end -> final latency (40 ms chunks: ~2 minutes).
MAX_MARKS = 3000
# Audio refused for running ahead of real time is said to the page at most this often.
REFUSAL_EVERY = 5.0


class Recognizer:
    def __init__(self, ctx: Context, events: Events, conn_id: str,
                 on_activity: Callable[[str], Awaitable[Any]],
                 on_final: Callable[[str, Optional[float]], Awaitable[Any]],
                 on_tentative: Optional[Callable[[str], Awaitable[Any]]] = None):
        self.ctx = ctx
        self.events = events
        self.id = conn_id
        self.on_activity = on_activity
        self.on_final = on_final
        self.on_tentative = on_tentative
        self.stream: Optional[AsyncASRStream] = None
        self.chunk_bytes = DAEMON_CHUNK_BYTES  # the session's max_chunk_seconds, in bytes
        self.pump_task: Optional[asyncio.Task] = None
        self.started = False
        self.language: Optional[str] = None
        self.hotwords: Optional[Tuple[str, ...]] = None
        self.samples_in = 0
        self.marks: Deque[Tuple[int, float]] = collections.deque(maxlen=MAX_MARKS)
        self.pending = bytearray()       # audio not forwarded yet (less than one batch)
        self.warned_not_started = False
        self.last_daemon_error = 0.0
        bc = ctx.cfg.bridge
        self.budget = AudioBudget(bc.audio_burst_seconds, bc.max_audio_speed)
        self.last_refusal = 0.0
        self.stats: Dict[str, int] = collections.Counter()

    # --- control ----------------------------------------------------------------------

    @property
    def session_id(self) -> Optional[str]:
        """The daemon session's id, None while there is none."""
        return None if self.stream is None else self.stream.session_id

    async def start(self, language: Optional[str], hotwords: Optional[Tuple[str, ...]]) -> Optional[Dict[str, Any]]:
        """(Re)open the daemon session; its capabilities, or None after an `error` event."""
        self.language, self.hotwords = language, hotwords
        if self.stream is not None:
            await self.close()
        if not await self._open():
            return None
        self.started = True
        self.warned_not_started = False
        assert self.stream is not None
        return dict(self.stream.capabilities)

    async def _open(self) -> bool:
        sid = f"br-{self.id}-{new_id()[:8]}"
        daemon = self.ctx.daemon
        try:
            daemon.check("asr")
            stream = await daemon.asr.open(session_id=sid, language=self.language, hotwords=self.hotwords,
                                           partials=True, timeout=OPEN_TIMEOUT,
                                           tentative=self.on_tentative is not None)
        except DaemonError as e:
            await self.events.error(e.code.value, f"speech recognition: {e.message}", "asr")
            return False
        self.stream = stream
        self.chunk_bytes = stream.max_chunk_bytes or DAEMON_CHUNK_BYTES
        self.samples_in = 0
        self.marks.clear()
        self.pending.clear()
        self.pump_task = asyncio.create_task(self._pump(stream), name=f"asr-pump-{self.id}")
        logger.info("conn %s: ASR session %s open (language=%s)", self.id, sid, self.language)
        return True

    async def stop(self) -> None:
        """Flush: the pump reads the remaining events (last final, then closed)."""
        self.started = False
        stream = self.stream
        if stream is None or stream.closed:
            return
        try:
            await self._forward(final=True)
            await self.ctx.daemon.asr.send(stream.finalize_msg())
        except DaemonError as e:
            await self.events.error(e.code.value, f"speech recognition: {e.message}", "asr")

    async def close(self) -> None:
        """Stop the pump and release the daemon session (fire and forget)."""
        stream, self.stream = self.stream, None
        pump, self.pump_task = self.pump_task, None
        if pump is not None and not pump.done() and pump is not asyncio.current_task():
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        if stream is not None:
            await stream.abandon()  # nobody reads its events now; closed at the daemon unless it is

    # --- audio ------------------------------------------------------------------------

    async def audio(self, pcm: bytes) -> None:
        if len(pcm) % 2:
            await self.events.error("bad_audio", f"audio must be PCM16: an even number of bytes, got {len(pcm)}")
            return
        if not pcm:
            return
        if not self.started:
            self.stats["audio_dropped"] += 1
            if not self.warned_not_started:
                self.warned_not_started = True
                await self.events.error("not_started", "send a start message before audio")
            return
        if not self.budget.take(len(pcm) / 2 / INPUT_RATE):
            await self._refuse_fast(len(pcm))
            return
        if self.stream is None or self.stream.closed:
            # The daemon closed the session (idle timeout, restart): open a new one.
            if not await self._open():
                self.started = False
                return
        now = time.monotonic()
        self.samples_in += len(pcm) // 2
        self.marks.append((self.samples_in, now))
        self.stats["audio_bytes_in"] += len(pcm)
        self.pending += pcm
        if len(self.pending) >= FORWARD_BYTES:
            await self._forward()

    async def _refuse_fast(self, nbytes: int) -> None:
        """Audio beyond the connection's budget: dropped, said at most every REFUSAL_EVERY seconds."""
        self.stats["audio_refused"] += 1
        self.stats["audio_bytes_refused"] += nbytes
        now = time.monotonic()
        if now - self.last_refusal > REFUSAL_EVERY:
            self.last_refusal = now
            b = self.budget
            await self.events.error("busy", f"audio is arriving faster than real time: more than {b.burst:g} s ahead, "
                                    f"then more than {b.speed:g}x real time (bridge.audio_burst_seconds, "
                                    "bridge.max_audio_speed); the excess is dropped", "asr")

    async def _forward(self, final: bool = False) -> None:
        """Send the whole batches pending (everything when `final`)."""
        n = len(self.pending) if final else len(self.pending) - len(self.pending) % FORWARD_BYTES
        if not n or self.stream is None:
            return
        data = bytes(self.pending[:n])
        del self.pending[:n]
        step = self.chunk_bytes
        try:
            for off in range(0, len(data), step):
                await self.stream.send(data[off:off + step])
        except DaemonError as e:
            self.stats["audio_dropped"] += 1
            now = time.monotonic()
            if now - self.last_daemon_error > 5.0:
                self.last_daemon_error = now
                await self.events.error(e.code.value, f"speech recognition: {e.message}", "asr")

    # --- events -----------------------------------------------------------------------

    def _arrival(self, t_seconds: float) -> Optional[float]:
        """Monotonic time when the audio sample at t_seconds (session timeline) arrived."""
        idx = int(t_seconds * INPUT_RATE)
        for end, at in self.marks:
            if end >= idx:
                return at
        return None

    async def _pump(self, stream: AsyncASRStream) -> None:
        emit = self.events.emit
        try:
            async for m in stream.events():
                if isinstance(m, P.SpeechStart):
                    await emit({"type": "speech_start", "utterance": m.utterance, "start": m.start})
                    await self.on_activity("speech_start")
                elif isinstance(m, P.Tentative):
                    self.stats["tentatives"] += 1
                    if self.on_tentative is not None and m.text.strip():
                        await self.on_tentative(m.text.strip())
                elif isinstance(m, P.Resume):
                    await self.on_activity("resume")
                elif isinstance(m, P.Partial):
                    await emit({"type": "partial", "text": m.text, "utterance": m.utterance})
                    if m.text.strip():
                        await self.on_activity("partial")
                elif isinstance(m, P.Final):
                    now = time.monotonic()
                    arrived = self._arrival(m.end) if m.text.strip() else None
                    latency = None if arrived is None else now - arrived
                    if latency is not None:
                        self.ctx.metrics.final_latency.observe(latency)
                    await emit({"type": "final", "text": m.text, "utterance": m.utterance, "start": m.start,
                                "end": m.end, "reason": m.reason,
                                "latency_ms": None if latency is None else round(latency * 1000.0, 1)})
                    self.stats["finals"] += 1
                    await self.on_final(m.text.strip(), arrived)
                elif isinstance(m, P.Error):
                    await self.events.error(m.code, f"speech recognition: {m.message}", "asr")
                elif isinstance(m, P.Closed):
                    # daemon_gone: the `error` (unavailable) just before it said so already.
                    if m.reason not in ("finalized", "closed", "idle", "daemon_gone"):
                        await self.events.error("asr_closed", f"the speech recognition session ended ({m.reason})",
                                                "asr")
                    logger.info("conn %s: ASR session %s closed (%s)", self.id, stream.session_id, m.reason)
        except (ClientTooSlow, ConnectionClosed):
            pass
        except Exception:
            logger.exception("conn %s: ASR event pump failed", self.id)
