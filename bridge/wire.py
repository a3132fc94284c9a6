"""What travels to and from one browser: message validation and the bounded outgoing queue.

Validation happens once, right after `json.loads`: a message is a JSON object with a string
`type`, and every string in it (keys included) must be encodable as UTF-8. JSON allows
escapes such as `\\ud800` that decode to lone surrogates, which no UTF-8 encoder accepts: left
in, they crash whatever encodes them next (the websockets send, the daemon client, the token
check). Such messages are a `bad_message`, like any other malformed one.

Backpressure: everything sent to the browser goes through `OutQueue`, bounded in bytes
(bridge.send_queue_bytes). A producer waits while it is full; when it stays full for
bridge.slow_client_timeout seconds the connection is closed with 1008 "client too slow".
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from typing import Any, Deque, Dict, Optional, Tuple, Union

from daemon.serving.transport import LogLimiter

logger = logging.getLogger(__name__)

Item = Union[str, bytes]


class BadMessage(Exception):
    """A browser message the bridge refuses; `code` is the `error` event's code."""

    def __init__(self, message: str, code: str = "bad_message"):
        super().__init__(message)
        self.code = code
        self.message = message


class ClientTooSlow(Exception):
    pass


class CloseConnection(Exception):
    """Close the websocket with this code and reason (after flushing queued events)."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def encodable(obj: Any, depth: int = 0) -> bool:
    """Every string in a decoded JSON value (keys too) encodes as UTF-8."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if depth > 64:  # json.loads already bounds nesting; this bounds our own recursion
        return False
    if isinstance(obj, dict):
        return all(encodable(k, depth + 1) and encodable(v, depth + 1) for k, v in obj.items())
    if isinstance(obj, list):
        return all(encodable(v, depth + 1) for v in obj)
    return True


def parse_message(text: str) -> Dict[str, Any]:
    """A browser's text message as a dict with a string `type`, or BadMessage."""
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the parser's stack
        raise BadMessage("text messages must be JSON objects") from None
    if not encodable(msg):
        raise BadMessage("strings must be valid Unicode (a lone surrogate such as \\ud800 is not)")
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise BadMessage("a message must be a JSON object with a \"type\"")
    return msg


def dumps(event: Dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


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


class Events:
    """The events of one connection: JSON events, errors (counted; logged at most once per
    LogLimiter interval per code, with how many were held back: a flood of one error is a few
    lines, not one per message) and reply audio."""

    def __init__(self, out: OutQueue, conn_id: str, metrics: Any):
        self.out = out
        self.conn_id = conn_id
        self.metrics = metrics
        self.errors = 0
        self._log = LogLimiter(logger)

    async def emit(self, event: Dict[str, Any]) -> None:
        await self.out.put(dumps(event))

    async def error(self, code: str, message: str, source: str = "bridge", **extra: Any) -> None:
        self.errors += 1
        self.metrics.error(code, source)
        self._log(logging.INFO, f"{source}/{code}", "conn %s: error %s/%s: %s", self.conn_id, source, code, message)
        await self.emit({"type": "error", "code": code, "source": source, "message": message, **extra})

    async def audio(self, pcm: bytes, turn: int) -> None:
        await self.out.put(pcm, audio_turn=turn)
