"""One browser connection: one daemon ASR session + one agent conversation.

Tasks per connection (the websockets "one task per direction" pattern, plus the work):
  reader  websocket -> control messages / audio to the daemon's ASR session
  writer  bounded outgoing queue -> websocket
  pump    ASR events from the daemon -> page (and turns, and barge-in)
  turn    per reply: agent deltas -> SentenceBuffer -> daemon TTS, sentence by sentence

`run()` waits for the first of reader / writer / "client too slow" to finish, then
cancels the rest and releases the daemon session, the TTS request and the agent stream.

Backpressure: everything sent to the browser goes through `OutQueue`, bounded in bytes
(bridge.send_queue_bytes). A producer waits while it is full; when it stays full for
bridge.slow_client_timeout seconds the connection is closed with 1008 "client too slow"
(the TCP connection is aborted if even the close frame cannot be written). Memory per
connection is therefore bounded by the queue plus websockets' write buffer.

Barge-in: a `speech_start` or non-empty `partial` from the ASR while a reply is being
produced or is still playing (estimated from the audio sent) cancels the turn (agent HTTP
stream closed, daemon TTS request cancelled), drops reply audio still queued here and
sends `interrupted`; the page stops playback on that event.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Set, Tuple, Union

from websockets.exceptions import ConnectionClosed

from bridge.agents import AgentError, stream_reply
from daemon import protocol as P
from daemon.client import AsyncASRClient, AsyncTTSClient, DaemonError, new_id
from daemon.errors import ErrorCode, S2SError
from daemon.rules import LANGUAGES, clean_hotwords
from daemon.textsplit import SentenceBuffer

if TYPE_CHECKING:  # pragma: no cover
    from bridge.server import Bridge

logger = logging.getLogger(__name__)

INPUT_RATE = 16000
# Largest audio message forwarded to the daemon (it refuses more than limits.max_chunk_seconds).
DAEMON_CHUNK_BYTES = INPUT_RATE * 2  # 1 s
# Unauthenticated connections (token configured, none in the URL) must send it this soon.
AUTH_TIMEOUT = 10.0
DAEMON_OPEN_TIMEOUT = 5.0
# A fresh daemon client first pings with this timeout, so a daemon that is not there is
# reported in seconds rather than after a request timeout.
DAEMON_PING_TIMEOUT = 2.0
# Longest wait for the next TTS chunk (one sentence of at most ~60 characters).
TTS_TIMEOUT = 20.0
# How long a cancelled turn may take to release its agent stream and TTS request.
CANCEL_GRACE = 2.0
# Audio arrival marks kept for the speech-end -> final latency (40 ms chunks: ~2 minutes).
MAX_MARKS = 3000
APOLOGY = {"zh": "抱歉，助手暂时无法回答，请稍后再试。",
           "en": "Sorry, the assistant cannot answer right now. Please try again later."}


class ClientTooSlow(Exception):
    pass


class CloseConnection(Exception):
    """Close the websocket with this code and reason (after flushing queued events)."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


Item = Union[str, bytes]


class OutQueue:
    """Bounded (bytes) FIFO of outgoing websocket messages; audio items carry their turn
    so a barge-in can drop them."""

    def __init__(self, max_bytes: int, timeout: float):
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._items: Deque[Tuple[Item, int, Optional[int]]] = collections.deque()
        self.bytes = 0
        self.peak_bytes = 0
        self._nonempty = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._empty = asyncio.Event()
        self._empty.set()
        self.overflow = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: Item, audio_turn: Optional[int] = None) -> None:
        if self.overflow.is_set():
            raise ClientTooSlow()
        # Upper bound of the UTF-8 size for text; exact for bytes.
        size = len(item) if isinstance(item, bytes) else len(item) * 3
        if self._items and self.bytes + size > self.max_bytes:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.timeout
            while self._items and self.bytes + size > self.max_bytes:
                self._space.clear()
                left = deadline - loop.time()
                try:
                    if left <= 0:
                        raise TimeoutError
                    await asyncio.wait_for(self._space.wait(), left)
                except TimeoutError:
                    self.overflow.set()
                    raise ClientTooSlow() from None
                if self.overflow.is_set():
                    raise ClientTooSlow()
        self._items.append((item, size, audio_turn))
        self.bytes += size
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        self._nonempty.set()
        self._empty.clear()

    async def get(self) -> Item:
        while not self._items:
            self._nonempty.clear()
            await self._nonempty.wait()
        item, size, _turn = self._items.popleft()
        self.bytes -= size
        self._space.set()
        if not self._items:
            self._empty.set()
        return item

    def purge_audio(self) -> int:
        """Drop every queued audio item; returns the bytes dropped."""
        kept = collections.deque(x for x in self._items if x[2] is None)
        dropped = self.bytes - sum(x[1] for x in kept)
        self._items = kept
        self.bytes -= dropped
        self._space.set()
        if not self._items:
            self._empty.set()
        return dropped

    async def drained(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
            return True
        except TimeoutError:
            return False


@dataclass
class Turn:
    no: int
    text: str
    source: str                    # "speech" | "text"
    started: float = field(default_factory=time.monotonic)   # final / text received
    first_delta_at: Optional[float] = None
    first_audio_at: Optional[float] = None
    agent_done: bool = False


class Session:
    def __init__(self, ws: Any, bridge: "Bridge", conn_id: str, authed: bool):
        self.ws = ws
        self.bridge = bridge
        self.cfg = bridge.cfg
        self.id = conn_id
        self.authed = authed
        bc = self.cfg.bridge
        self.out = OutQueue(bc.send_queue_bytes, bc.slow_client_timeout)
        self.conv = bridge.agent.conversation()
        self.asr_client: Optional[AsyncASRClient] = None
        self.tts_client: Optional[AsyncTTSClient] = None
        self.asr_stream: Any = None          # daemon.client.AsyncASRStream
        self.pump_task: Optional[asyncio.Task] = None
        self.started = False
        self.language: Optional[str] = None
        self.hotwords: Optional[Tuple[str, ...]] = None
        self.barge_in = True
        self.turn_no = 0
        self.turn: Optional[Turn] = None
        self.turn_tasks: Set[asyncio.Task] = set()
        self.playback_until = 0.0        # loop time when the browser should be done playing
        self.samples_in = 0              # samples sent to the current ASR session
        self.marks: Deque[Tuple[int, float]] = collections.deque(maxlen=MAX_MARKS)
        self.warned_not_started = False
        self.releasing = False           # set by _release(): no new turns, no new daemon clients
        self.last_daemon_error = 0.0
        self.stats = collections.Counter()
        self.out_rate = int(self.cfg.tts.sample_rate)

    # --- plumbing ---------------------------------------------------------------------

    async def emit(self, event: Dict[str, Any]) -> None:
        await self.out.put(json.dumps(event, ensure_ascii=False, separators=(",", ":")))

    async def error(self, code: str, message: str, source: str = "bridge") -> None:
        self.stats["errors"] += 1
        logger.info("conn %s: error %s/%s: %s", self.id, source, code, message)
        await self.emit({"type": "error", "code": code, "source": source, "message": message})

    async def _writer(self) -> None:
        while True:
            item = await self.out.get()
            await self.ws.send(item)

    # --- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        reader = writer = slow = None
        close: Optional[Tuple[int, str]] = None
        try:
            await self.emit({"type": "hello", "connection": self.id, "agent": self.bridge.agent_info(),
                             "auth_required": not self.authed, "input_sample_rate": INPUT_RATE,
                             "output_sample_rate": self.out_rate})
            reader = asyncio.create_task(self._reader(), name=f"ws-read-{self.id}")
            writer = asyncio.create_task(self._writer(), name=f"ws-write-{self.id}")
            slow = asyncio.create_task(self.out.overflow.wait(), name=f"ws-slow-{self.id}")
            done, _pending = await asyncio.wait({reader, writer, slow}, return_when=asyncio.FIRST_COMPLETED)
            if slow in done:
                self.bridge.counters["closed_too_slow"] += 1
                logger.warning("conn %s: client too slow (%d bytes queued for %.1f s): closing", self.id,
                               self.out.bytes, self.out.timeout)
                close = (1008, "client too slow")
            elif reader in done:
                exc = reader.exception()
                if isinstance(exc, CloseConnection):
                    close = (exc.code, exc.reason)
                    # Let the page read why (the error event) before the close frame.
                    await self.out.drained(1.0)
                elif exc is not None and not isinstance(exc, ConnectionClosed):
                    logger.error("conn %s: reader failed", self.id, exc_info=exc)
                    close = (1011, "internal error")
            elif writer in done:
                exc = writer.exception()
                if exc is not None and not isinstance(exc, (ConnectionClosed, ClientTooSlow)):
                    logger.error("conn %s: writer failed", self.id, exc_info=exc)
                    close = (1011, "internal error")
        finally:
            for t in (reader, writer, slow):
                if t is not None and not t.done():
                    t.cancel()
            await asyncio.gather(*(t for t in (reader, writer, slow) if t is not None), return_exceptions=True)
            if close is not None:
                await self._close_ws(*close)
            await self._release()

    async def _close_ws(self, code: int, reason: str) -> None:
        try:
            # close() waits to write the close frame: a client that reads nothing never lets it.
            await asyncio.wait_for(self.ws.close(code, reason), self.cfg.bridge.slow_client_timeout)
        except (TimeoutError, ConnectionClosed, OSError):
            pass
        finally:
            transport = getattr(self.ws, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.abort()

    async def _release(self) -> None:
        # From here on nothing may start a turn or connect a daemon client: a client made
        # after this point would never be closed (its reader task keeps it, its sockets and
        # libzmq's buffers alive for the life of the process).
        self.releasing = True
        # The pump first: a Final it reads while turns are being cancelled would start a new one.
        await self._close_asr()
        await self._cancel_turns()
        clients, self.asr_client, self.tts_client = (self.asr_client, self.tts_client), None, None
        for c in clients:
            if c is not None:
                await c.close()
        try:
            await self.conv.aclose()
        except Exception:  # never let cleanup fail the handler
            logger.exception("conn %s: closing the agent conversation failed", self.id)
        logger.info("conn %s: released (%s)", self.id, dict(self.stats))

    async def _close_asr(self) -> None:
        stream, self.asr_stream = self.asr_stream, None
        pump, self.pump_task = self.pump_task, None
        if pump is not None and not pump.done() and pump is not asyncio.current_task():
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        if stream is not None and not stream.closed and self.asr_client is not None:
            try:
                # Fire and forget: the daemon releases the session; no need to wait for `closed`.
                await self.asr_client.send(P.Close(session_id=stream.session_id, request_id=new_id()))
            except DaemonError:
                pass

    async def _new_client(self, cls: type, which: str, timeout: float) -> Any:
        """A connected, pinged daemon client, or an exception with the client closed.

        Closed on *any* exception, cancellation included: a browser that hangs up while
        this ping is in flight cancels the task, and a client left connected here is
        referenced by nothing but its own reader/monitor tasks, which the event loop keeps
        alive forever (the bridge's per-connection memory creep)."""
        if self.releasing:
            raise DaemonError("the connection is closing", ErrorCode.UNAVAILABLE)
        client = cls(self.cfg.daemon.endpoint(which), timeout=timeout)
        try:
            await client.ping(DAEMON_PING_TIMEOUT)
            if self.releasing:
                raise DaemonError("the connection is closing", ErrorCode.UNAVAILABLE)
        except BaseException:
            await asyncio.shield(client.close())
            raise
        return client

    # --- reader -----------------------------------------------------------------------

    async def _reader(self) -> None:
        if not self.authed:
            try:
                async with asyncio.timeout(AUTH_TIMEOUT):
                    first = await self.ws.recv()
            except TimeoutError:
                await self.error("unauthorized", "no token received")
                raise CloseConnection(1008, "unauthorized") from None
            await self._on_message(first)
        async for message in self.ws:
            await self._on_message(message)

    async def _on_message(self, message: Union[str, bytes]) -> None:
        if isinstance(message, bytes):
            if not self.authed:
                await self.error("unauthorized", "send the token in the start message first")
                raise CloseConnection(1008, "unauthorized")
            await self._on_audio(message)
            return
        try:
            msg = json.loads(message)
        except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the parser's stack
            await self.error("bad_message", "text messages must be JSON objects")
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            await self.error("bad_message", "a message must be a JSON object with a \"type\"")
            return
        kind = msg["type"]
        if not self.authed:
            token = msg.get("token")
            if kind not in ("start", "text") or not isinstance(token, str) or not self.bridge.check_token(token):
                await self.error("unauthorized", "missing or wrong token")
                raise CloseConnection(1008, "unauthorized")
            self.authed = True
        if kind == "start":
            await self._on_start(msg)
        elif kind == "stop":
            await self._on_stop()
        elif kind == "text":
            await self._on_text(msg)
        else:
            await self.error("unknown_type", f"unknown message type {kind[:40]!r}")

    async def _on_start(self, msg: Dict[str, Any]) -> None:
        language = msg.get("language")
        if language is not None and language not in LANGUAGES:
            await self.error("bad_message", f"language must be one of {', '.join(LANGUAGES)}")
            return
        hotwords = msg.get("hotwords")
        if hotwords is not None:
            try:
                if not isinstance(hotwords, list):
                    raise S2SError("hotwords must be a list of strings", ErrorCode.BAD_REQUEST)
                hotwords = clean_hotwords(hotwords)  # the daemon's own rule (daemon/rules.py)
            except S2SError as e:
                await self.error("bad_message", str(e))
                return
            hotwords = tuple(hotwords) or None
        barge_in = msg.get("barge_in", True)
        if not isinstance(barge_in, bool):
            await self.error("bad_message", "barge_in must be true or false")
            return
        self.language, self.hotwords, self.barge_in = language, hotwords, barge_in
        if self.asr_stream is not None:
            await self._close_asr()
        if await self._open_asr():
            self.started = True
            self.warned_not_started = False
            caps = self.asr_stream.capabilities
            await self.emit({"type": "ready", "session_id": self.asr_stream.session_id, "language": language,
                             "agent": self.bridge.agent_info(), "barge_in": self.barge_in,
                             "input_sample_rate": INPUT_RATE, "output_sample_rate": self.out_rate,
                             "partials": bool(caps.get("partials", False)),
                             "hotwords": caps.get("hotwords", False)})

    async def _open_asr(self) -> bool:
        sid = f"br-{self.id}-{new_id()[:8]}"
        try:
            if self.asr_client is None:
                self.asr_client = await self._new_client(AsyncASRClient, "asr", DAEMON_OPEN_TIMEOUT)
            stream = await self.asr_client.open(session_id=sid, language=self.language, hotwords=self.hotwords,
                                                partials=True, timeout=DAEMON_OPEN_TIMEOUT)
        except DaemonError as e:
            await self.error(e.code.value, f"speech recognition: {e.message}", "asr")
            return False
        self.asr_stream = stream
        self.samples_in = 0
        self.marks.clear()
        self.pump_task = asyncio.create_task(self._pump(stream), name=f"asr-pump-{self.id}")
        logger.info("conn %s: ASR session %s open (language=%s)", self.id, sid, self.language)
        return True

    async def _on_stop(self) -> None:
        self.started = False
        stream = self.asr_stream
        if stream is None or stream.closed:
            return
        try:
            # The pump reads the remaining events (last final, then closed).
            await self.asr_client.send(P.Finalize(session_id=stream.session_id, request_id=new_id()))
        except DaemonError as e:
            await self.error(e.code.value, f"speech recognition: {e.message}", "asr")

    async def _on_text(self, msg: Dict[str, Any]) -> None:
        text = msg.get("text")
        limit = self.cfg.limits.max_text_chars
        if not isinstance(text, str) or not text.strip():
            await self.error("bad_message", "text must be a non-empty string")
            return
        if len(text) > limit:
            await self.error("bad_message", f"text longer than {limit} characters")
            return
        text = text.strip()
        await self.emit({"type": "user_text", "text": text})
        # Typed input always takes over from a reply in progress.
        await self._interrupt("text")
        await self._start_turn(text, "text")

    async def _on_audio(self, pcm: bytes) -> None:
        if len(pcm) % 2:
            await self.error("bad_audio", f"audio must be PCM16: an even number of bytes, got {len(pcm)}")
            return
        if not pcm:
            return
        if not self.started:
            self.stats["audio_dropped"] += 1
            if not self.warned_not_started:
                self.warned_not_started = True
                await self.error("not_started", "send a start message before audio")
            return
        if self.asr_stream is None or self.asr_stream.closed:
            # The daemon closed the session (idle timeout, restart): open a new one.
            if not await self._open_asr():
                self.started = False
                return
        now = time.monotonic()
        try:
            for off in range(0, len(pcm), DAEMON_CHUNK_BYTES):
                await self.asr_stream.send(pcm[off:off + DAEMON_CHUNK_BYTES])
        except DaemonError as e:
            self.stats["audio_dropped"] += 1
            if now - self.last_daemon_error > 5.0:
                self.last_daemon_error = now
                await self.error(e.code.value, f"speech recognition: {e.message}", "asr")
            return
        self.samples_in += len(pcm) // 2
        self.marks.append((self.samples_in, now))
        self.stats["audio_bytes_in"] += len(pcm)

    # --- ASR events -------------------------------------------------------------------

    def _arrival(self, t_seconds: float) -> Optional[float]:
        """Monotonic time when the audio sample at t_seconds (session timeline) arrived."""
        idx = int(t_seconds * INPUT_RATE)
        for end, at in self.marks:
            if end >= idx:
                return at
        return None

    async def _pump(self, stream: Any) -> None:
        try:
            async for m in stream.events():
                if isinstance(m, P.SpeechStart):
                    await self.emit({"type": "speech_start", "utterance": m.utterance, "start": m.start})
                    if self.barge_in:
                        await self._interrupt("speech_start")
                elif isinstance(m, P.Partial):
                    await self.emit({"type": "partial", "text": m.text, "utterance": m.utterance})
                    if self.barge_in and m.text.strip():
                        await self._interrupt("partial")
                elif isinstance(m, P.Final):
                    now = time.monotonic()
                    arrived = self._arrival(m.end) if m.text.strip() else None
                    latency = None if arrived is None else round((now - arrived) * 1000.0, 1)
                    await self.emit({"type": "final", "text": m.text, "utterance": m.utterance, "start": m.start,
                                     "end": m.end, "reason": m.reason, "latency_ms": latency})
                    self.stats["finals"] += 1
                    if m.text.strip():
                        await self._start_turn(m.text.strip(), "speech")
                elif isinstance(m, P.Error):
                    await self.error(m.code, f"speech recognition: {m.message}", "asr")
                elif isinstance(m, P.Closed):
                    # daemon_gone: the `error` (unavailable) just before it said so already.
                    if m.reason not in ("finalized", "closed", "idle", "daemon_gone"):
                        await self.error("asr_closed", f"the speech recognition session ended ({m.reason})", "asr")
                    logger.info("conn %s: ASR session %s closed (%s)", self.id, stream.session_id, m.reason)
        except (ClientTooSlow, ConnectionClosed):
            pass
        except Exception:
            logger.exception("conn %s: ASR event pump failed", self.id)

    # --- turns ------------------------------------------------------------------------

    def _reply_active(self) -> bool:
        active = any(not t.done() for t in self.turn_tasks)
        return active or asyncio.get_running_loop().time() < self.playback_until

    async def _interrupt(self, reason: str) -> bool:
        """Barge-in: stop the reply in progress (agent, TTS, queued audio, page playback)."""
        if not self._reply_active():
            return False
        t0 = time.monotonic()
        tasks = [t for t in self.turn_tasks if not t.done()]
        for t in tasks:
            t.cancel()
        dropped = self.out.purge_audio()
        self.playback_until = 0.0
        turn = self.turn.no if self.turn else 0
        self.stats["interrupted"] += 1
        await self.emit({"type": "interrupted", "turn": turn, "reason": reason})
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_GRACE)
        logger.info("conn %s: turn %d interrupted by %s (%d bytes of audio dropped, %.0f ms)", self.id, turn,
                    reason, dropped, (time.monotonic() - t0) * 1000)
        return True

    async def _cancel_turns(self) -> None:
        tasks = [t for t in self.turn_tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_GRACE)

    async def _start_turn(self, text: str, source: str) -> None:
        if self.releasing:
            return  # the connection is going away; nobody would hear the reply
        self.turn_no += 1
        turn = Turn(self.turn_no, text, source)
        # Without barge-in, replies wait for the one before (they are all heard, in order).
        prev = [t for t in self.turn_tasks if not t.done()]
        task = asyncio.create_task(self._run_turn(turn, prev), name=f"turn-{self.id}-{turn.no}")
        self.turn_tasks.add(task)
        task.add_done_callback(self.turn_tasks.discard)

    async def _run_turn(self, turn: Turn, prev: List[asyncio.Task]) -> None:
        try:
            if prev:
                await asyncio.wait(prev)
            self.turn = turn
            sentences: asyncio.Queue = asyncio.Queue()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._agent(turn, sentences))
                tg.create_task(self._speak_all(turn, sentences))
        except* (ClientTooSlow, ConnectionClosed):
            pass  # the connection is going away; run() cleans up
        except* Exception as eg:
            logger.error("conn %s: turn %d failed", self.id, turn.no, exc_info=eg)

    async def _agent(self, turn: Turn, sentences: asyncio.Queue) -> None:
        buf = SentenceBuffer()
        parts: List[str] = []
        timeout = float(self.cfg.agent.timeout)
        try:
            async for delta in stream_reply(self.conv, turn.text, timeout):
                if turn.first_delta_at is None:
                    turn.first_delta_at = time.monotonic()
                parts.append(delta)
                await self.emit({"type": "agent_delta", "turn": turn.no, "text": delta})
                for s in buf.push(delta):
                    sentences.put_nowait(s)
            for s in buf.flush():
                sentences.put_nowait(s)
            turn.agent_done = True
            await self.emit({"type": "agent_done", "turn": turn.no, "text": "".join(parts),
                             "first_token_ms": self._ms(turn.started, turn.first_delta_at)})
        except AgentError as e:
            # Never silence without a reason: say it on the page and out loud.
            self.stats["agent_errors"] += 1
            logger.warning("conn %s: turn %d: agent failed: %s (%s)", self.id, turn.no, e.message, e.code)
            await self.error(e.code, f"agent: {e.message}", "agent")
            turn.agent_done = True
            await self.emit({"type": "agent_done", "turn": turn.no, "text": "".join(parts), "error": e.code})
            sentences.put_nowait(self._apology(turn.text))
        finally:
            sentences.put_nowait(None)

    def _apology(self, user_text: str) -> str:
        lang = self.language if self.language in ("zh", "en") else ("en" if user_text.isascii() else "zh")
        return APOLOGY[lang]

    @staticmethod
    def _ms(t0: float, t1: Optional[float]) -> Optional[float]:
        return None if t1 is None else round((t1 - t0) * 1000.0, 1)

    async def _speak_all(self, turn: Turn, sentences: asyncio.Queue) -> None:
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
                await self.error(e.code.value, f"speech synthesis: {e.message}", "tts")
                await self.emit({"type": "tts_end", "turn": turn.no, "sentence": idx, "error": e.code.value})
                tts_down = e.code in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT, ErrorCode.SHUTTING_DOWN)
            idx += 1

    async def _speak(self, turn: Turn, idx: int, text: str) -> None:
        if self.tts_client is None:
            self.tts_client = await self._new_client(AsyncTTSClient, "tts", TTS_TIMEOUT)
        await self.emit({"type": "tts_start", "turn": turn.no, "sentence": idx, "text": text,
                         "sample_rate": self.out_rate})
        loop = asyncio.get_running_loop()
        async for chunk in self.tts_client.synthesize(text, request_id=f"{self.id}-{turn.no}-{idx}",
                                                      timeout=TTS_TIMEOUT):
            if not chunk.pcm:
                continue
            if turn.first_audio_at is None:
                turn.first_audio_at = time.monotonic()
                await self.emit({"type": "first_audio", "turn": turn.no,
                                 "latency_ms": self._ms(turn.started, turn.first_audio_at)})
            rate = chunk.sample_rate or self.out_rate
            self.playback_until = max(self.playback_until, loop.time()) + len(chunk.pcm) / 2 / rate
            self.stats["audio_bytes_out"] += len(chunk.pcm)
            await self.out.put(chunk.pcm, audio_turn=turn.no)
        await self.emit({"type": "tts_end", "turn": turn.no, "sentence": idx})


def check_token(expected: str, given: Optional[str]) -> bool:
    """Constant-time token comparison; no token configured = everyone."""
    if not expected:
        return True
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())
