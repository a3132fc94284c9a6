"""One browser connection: websocket I/O, login and message validation, and dispatch to its
recognizer (bridge/asr.py), its turns (bridge/turns.py) and its speaker (bridge/tts.py).

Tasks (the websockets "one task per direction" pattern): the reader (messages in, with the
login window and the idle timeout), the writer (the bounded outgoing queue out) and a watch on
that queue's overflow ("client too slow"). `run()` waits for the first of them to finish,
then cancels the rest and releases the ASR session, the turns and the agent conversation.
The connection owns no daemon socket: it uses the process's shared one (bridge/daemon_link.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Dict, Optional, Tuple, Union

from websockets.exceptions import ConnectionClosed

from bridge.asr import INPUT_RATE, Recognizer
from bridge.auth import check_token
from bridge.context import Context
from bridge.turns import Turns
from bridge.tts import Speaker
from bridge.wire import BadMessage, ClientTooSlow, CloseConnection, Events, OutQueue, parse_message
from daemon.errors import S2SError
from daemon.rules import LANGUAGES, clean_hotwords

logger = logging.getLogger(__name__)


class Connection:
    """`on_login` (when a token is configured) is asked when the right token arrives: None lets
    the connection in, a reason refuses it (closed with 1013, like a refusal at accept)."""

    def __init__(self, ws: Any, ctx: Context, conn_id: str,
                 on_login: Optional[Callable[[], Optional[str]]] = None):
        self.ws = ws
        self.on_login = on_login
        self.ctx = ctx
        self.id = conn_id
        bc = ctx.cfg.bridge
        self.authed = not bc.token
        self.out = OutQueue(bc.send_queue_bytes, bc.slow_client_timeout)
        self.events = Events(self.out, conn_id, ctx.metrics)
        self.conv = ctx.agent.conversation()
        self.speaker = Speaker(ctx, self.events, conn_id)
        self.turns = Turns(ctx, self.events, conn_id, self.conv, self.speaker)
        self.asr = Recognizer(ctx, self.events, conn_id, self._on_activity, self._on_final,
                              self._on_tentative if self.turns.speculative else None)
        self.barge_in = True
        self.close_reason = ""

    # --- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        reader = writer = slow = None
        close: Optional[Tuple[int, str]] = None
        try:
            await self.events.emit({"type": "hello", "connection": self.id, "agent": self.ctx.public_agent,
                                    "auth_required": not self.authed, "input_sample_rate": INPUT_RATE,
                                    "output_sample_rate": self.speaker.out_rate})
            reader = asyncio.create_task(self._reader(), name=f"ws-read-{self.id}")
            writer = asyncio.create_task(self._writer(), name=f"ws-write-{self.id}")
            slow = asyncio.create_task(self.out.overflow.wait(), name=f"ws-slow-{self.id}")
            done, _pending = await asyncio.wait({reader, writer, slow}, return_when=asyncio.FIRST_COMPLETED)
            if slow in done:
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
                self.close_reason = close[1]
                self.ctx.metrics.closed.labels(close[1]).inc()
                await self._close_ws(*close)
            await self._release()

    async def _writer(self) -> None:
        while True:
            await self.ws.send(await self.out.get())

    async def _close_ws(self, code: int, reason: str) -> None:
        try:
            # close() waits to write the close frame: a client that reads nothing never lets it.
            await asyncio.wait_for(self.ws.close(code, reason), self.ctx.cfg.bridge.slow_client_timeout)
        except (TimeoutError, ConnectionClosed, OSError):
            pass
        finally:
            transport = getattr(self.ws, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.abort()

    async def _release(self) -> None:
        # The turns refuse new work first, then the pump stops (a Final it read would start one).
        self.turns.closing = True
        await self.asr.close()
        await self.turns.close()
        try:
            await self.conv.aclose()
        except Exception:  # never let cleanup fail the handler
            logger.exception("conn %s: closing the agent conversation failed", self.id)
        logger.info("conn %s: released (%s, %d errors, %d interrupted, %d bytes of audio out, speculative turns "
                    "%d released / %d cancelled)", self.id, dict(self.asr.stats), self.events.errors,
                    self.turns.interrupted, self.speaker.audio_bytes_out, self.turns.spec_released,
                    self.turns.spec_wasted)

    # --- reader -----------------------------------------------------------------------

    async def _reader(self) -> None:
        bc = self.ctx.cfg.bridge
        while True:
            window = bc.idle_timeout if self.authed else min(bc.login_timeout, bc.idle_timeout)
            try:
                async with asyncio.timeout(window):
                    message = await self.ws.recv()
            except TimeoutError:
                if not self.authed:
                    await self.events.error("login_timeout", f"no token within {bc.login_timeout:g} s")
                    raise CloseConnection(1008, "login timeout") from None
                if self.turns.active():
                    continue  # a reply is still being written or played: not idle
                await self.events.error("idle_timeout", f"nothing received for {bc.idle_timeout:g} s "
                                        "(bridge.idle_timeout); reconnect to go on")
                raise CloseConnection(1000, "idle timeout") from None
            await self._on_message(message)

    async def _on_message(self, message: Union[str, bytes]) -> None:
        if isinstance(message, bytes):
            if not self.authed:
                await self.events.error("unauthorized", "send the token in the start message first")
                raise CloseConnection(1008, "unauthorized")
            await self.asr.audio(message)
            return
        try:
            msg = parse_message(message)
        except BadMessage as e:
            await self.events.error(e.code, e.message)
            return
        kind = msg["type"]
        if not self.authed:
            token = msg.get("token")
            if kind not in ("start", "text") or not check_token(self.ctx.cfg.bridge.token, token):
                await self.events.error("unauthorized", "missing or wrong token")
                raise CloseConnection(1008, "unauthorized")
            refused = self.on_login() if self.on_login is not None else None
            if refused:
                raise CloseConnection(1013, refused)
            self.authed = True
        if kind == "start":
            await self._on_start(msg)
        elif kind == "stop":
            await self.asr.stop()
        elif kind == "stop_playback":  # the page's 停止播放: no more speech for that reply
            await self.turns.stop_speech(msg.get("turn"))
        elif kind == "text":
            await self._on_text(msg)
        else:
            await self.events.error("unknown_type", f"unknown message type {kind[:40]!r}")

    async def _on_start(self, msg: Dict[str, Any]) -> None:
        language = msg.get("language")
        if language is not None and language not in LANGUAGES:
            await self.events.error("bad_message", f"language must be one of {', '.join(LANGUAGES)}")
            return
        hotwords = msg.get("hotwords")
        if hotwords is not None:
            try:
                if not isinstance(hotwords, list):
                    raise S2SError("hotwords must be a list of strings")
                # The daemon's own rule (daemon/rules.py). The page sends its hotword field, [] when
                # empty: no words of the user's own, so the session asks for the daemon's defaults
                # (Open hotwords=None); which words those are, the daemon alone decides.
                hotwords = tuple(clean_hotwords(hotwords)) or None
            except S2SError as e:
                await self.events.error("bad_message", str(e))
                return
        barge_in = msg.get("barge_in", True)
        if not isinstance(barge_in, bool):
            await self.events.error("bad_message", "barge_in must be true or false")
            return
        self.barge_in = barge_in
        self.turns.language = language
        caps = await self.asr.start(language, hotwords)
        if caps is not None:
            await self.events.emit({"type": "ready", "session_id": self.asr.session_id, "language": language,
                                    "agent": self.ctx.public_agent, "barge_in": self.barge_in,
                                    "input_sample_rate": INPUT_RATE, "output_sample_rate": self.speaker.out_rate,
                                    "partials": bool(caps.get("partials", False)),
                                    "speculate": self.turns.speculative,
                                    "hotwords": caps.get("hotwords", False)})

    async def _on_text(self, msg: Dict[str, Any]) -> None:
        text = msg.get("text")
        limit = self.ctx.cfg.limits.max_text_chars
        if not isinstance(text, str) or not text.strip():
            await self.events.error("bad_message", "text must be a non-empty string")
            return
        if len(text) > limit:
            await self.events.error("bad_message", f"text longer than {limit} characters")
            return
        if not await self.turns.admit():
            return
        text = text.strip()
        await self.events.emit({"type": "user_text", "text": text})
        # Typed input always takes over from a reply in progress, and from one being prepared.
        await self.turns.drop_speculation("text")
        await self.turns.interrupt("text")
        self.turns.start(text, "text")

    # --- from the recognizer ------------------------------------------------------------

    async def _on_activity(self, reason: str) -> None:
        # The user goes on (a new utterance, or speech after the pause that made the tentative):
        # the reply being prepared answers the wrong text. A partial is not enough: the daemon
        # sends partials through the pause too.
        if reason in ("speech_start", "resume"):
            await self.turns.drop_speculation(reason)
        if self.barge_in and reason != "resume":
            await self.turns.interrupt(reason)

    async def _on_tentative(self, text: str) -> None:
        await self.turns.speculate(text)

    async def _on_final(self, text: str, speech_end: Optional[float]) -> None:
        """A final from the recognizer; speech_end: when its last audio reached the bridge
        (monotonic; None when unknown), where the turn's speech end -> first audio counts from."""
        if not text:
            await self.turns.drop_speculation("empty final")
            return
        if not await self.turns.admit():
            await self.turns.drop_speculation("rate_limited")
            return
        if not await self.turns.confirm(text, speech_end):  # released the speculative reply, or dropped it
            self.turns.start(text, "speech", speech_end)
