"""A streamed synthesis that a refusal before its first audio does not lose.

A reply's synthesis is one streamed-text request (bridge/tts.py, bridge/speech.py): its text goes
to the daemon as the agent writes it. The daemon may refuse it before any audio: `busy` (its TTS
queue is full: limits.max_tts_queue, or this owner's share), `shutting_down` (draining for a
restart), `unavailable` (its connection lost). The reply was then left unspoken, its text only on
the page. `RetryingSynthStream` keeps the text (and any release) sent until the first audio, and
on such a refusal asks its `reopen` for a new request, where everything kept is sent again; the
feeder goes on sending into it without knowing. After the first audio it is where it is (its
sentences are being spoken there): a later error is the caller's.

Who decides where and when it goes on is `reopen`: one daemon (bridge/daemon_link.py) waits out
`busy` as the daemon's retry_after says, for up to BUSY_RETRY_SECONDS in all; several daemons
(bridge/daemon_pool.py) place it on another daemon, and wait out `busy` the same way when none
has room.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, List, Tuple

from daemon.errors import ErrorCode
from daemon.wire import protocol as P
from daemon.wire.client import DaemonError

logger = logging.getLogger(__name__)

# The longest a reply waits, in all, for a daemon that answers `busy` before its first audio.
BUSY_RETRY_SECONDS = 10.0
# A busy refusal without retry_after is asked again after this long.
DEFAULT_RETRY_AFTER = 1.0

# reopen(refusal, attempt) -> a new inner stream (AsyncSynthStream's surface), or raises.
Reopen = Callable[[DaemonError, int], Awaitable[Any]]


class BusyWait:
    """The wait for a `busy` daemon: `await wait(e)` sleeps its retry_after, or raises `e` once
    the next try would come after BUSY_RETRY_SECONDS from the first refusal."""

    def __init__(self, budget: float = BUSY_RETRY_SECONDS):
        self.budget = budget
        self.deadline = 0.0

    async def wait(self, e: DaemonError) -> None:
        now = time.monotonic()
        if not self.deadline:
            self.deadline = now + self.budget
        pause = e.retry_after or DEFAULT_RETRY_AFTER
        if now + pause > self.deadline:
            raise e
        await asyncio.sleep(pause)


def retry_id(request_id: str, attempt: int) -> str:
    """The request id of the `attempt`-th try (a refused id is not reused on the same daemon)."""
    return f"{request_id}-r{attempt}"


class RetryingSynthStream:
    """AsyncSynthStream's surface over the request now in use (see the module docstring)."""

    def __init__(self, inner: Any, reopen: Reopen):
        self._inner, self._reopen = inner, reopen
        self._sent: List[Tuple[str, Tuple[Any, ...]]] = []  # until the first audio
        self._heard = False
        self._attempt = 0
        self._cancelled = False

    def __getattr__(self, name: str) -> Any:  # request_id, ended, released, ...
        return getattr(self._inner, name)

    @property
    def finished(self) -> bool:
        """Not while it may still go on in a new request (the feeder would stop sending its text)."""
        return bool(self._inner.finished) and self._heard

    async def send(self, text: str, final: bool = False, release: bool = False, drop_partial: bool = False) -> None:
        if not self._heard:
            self._sent.append(("send", (text, final, release, drop_partial)))
            if self._inner.finished:
                return  # refused there: sent again in the next request
        await self._inner.send(text, final, release, drop_partial)

    async def end(self, text: str = "", release: bool = False, drop_partial: bool = False) -> None:
        await self.send(text, True, release, drop_partial)

    async def release(self) -> None:
        if not self._heard:
            self._sent.append(("release", ()))
        await self._inner.release()

    async def cancel(self) -> None:
        self._cancelled = True  # also while it waits to go on: no new request then
        await self._inner.cancel()

    def __aiter__(self) -> AsyncIterator[P.SynthAudio]:
        return self._audio()

    def audio(self) -> AsyncGenerator[P.SynthAudio, None]:
        return self._audio()

    async def _audio(self) -> AsyncGenerator[P.SynthAudio, None]:
        while True:
            try:
                async for chunk in self._inner:
                    self._heard = True
                    self._sent.clear()
                    yield chunk
                return
            except DaemonError as e:
                if self._heard or e.code not in (ErrorCode.BUSY, ErrorCode.SHUTTING_DOWN, ErrorCode.UNAVAILABLE):
                    raise
                self._attempt += 1
                self._inner = await self._reopen(e, self._attempt)  # raises when it cannot go on
                if self._cancelled:
                    await self._inner.cancel()
                    return
                for kind, args in self._sent:
                    await (self._inner.send(*args) if kind == "send" else self._inner.release())
