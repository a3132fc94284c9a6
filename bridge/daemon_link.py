"""One connection to the speech daemon per bridge process, shared by every browser session.

Two DEALER sockets (the daemon's ASR and TTS sockets), each with its reader and monitor
task, made once at start-up and closed once at shutdown. Browser sessions are multiplexed
by id: ASR session ids are `br-<connection>-<random>`, TTS request ids
`<connection>-<turn>-<sentence>`; the asyncio client's dispatch routes every reply to the
stream or request it belongs to. A browser connection therefore owns no ZeroMQ socket, file
descriptor or task of the client: nothing to leak when it hangs up at a bad moment.

The daemon ties sessions to the peer's identity: one identity for the whole bridge, so the
bridge closes each browser's ASR session itself (`close` when the browser goes) and a TTS
request is cancelled when its iterator is left (daemon.wire.client).

Streamed syntheses go through `synthesize_stream`: a `busy` before the first audio is waited
out (bridge/synth_retry.py), not a reply left unspoken.

A daemon that is down is `unavailable` at once (`check`, before every open and synthesis):
its socket file is missing, or the client's socket monitor saw the connects refused (a daemon
killed with -9 leaves its socket file behind). ZeroMQ goes on connecting every 0.1 s, so a
daemon started again is used as soon as it listens, without a bridge restart.

The asyncio client reconnects its socket after a request times out (to drop what was queued
for a daemon that went away). Shared, that would fail every other browser's requests in
flight, so the shared clients are made with `reconnect_on_timeout=False`: ZeroMQ reconnects to
a restarted daemon by itself, and a lost connection is reported to every open stream by the
socket monitor.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from bridge.synth_retry import BusyWait, RetryingSynthStream, retry_id
from daemon.wire.client import AsyncASRClient, AsyncTTSClient, DaemonError, missing_endpoint
from daemon.config import Config
from daemon.errors import ErrorCode

logger = logging.getLogger(__name__)

# Longest wait for an ASR `opened` (the one owner: bridge/asr.py and bridge/speech.py import it).
OPEN_TIMEOUT = 5.0
# Longest wait for the next TTS chunk (one sentence of at most ~60 characters).
TTS_TIMEOUT = 20.0


class DaemonLink:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.asr = AsyncASRClient(cfg.daemon.endpoint("asr"), timeout=OPEN_TIMEOUT, reconnect_on_timeout=False)
        self.tts = AsyncTTSClient(cfg.daemon.endpoint("tts"), timeout=TTS_TIMEOUT, reconnect_on_timeout=False)

    async def start(self) -> None:
        await self.asr.connect()
        await self.tts.connect()

    async def close(self) -> None:
        await self.asr.close()
        await self.tts.close()

    def check(self, which: str) -> None:
        """DaemonError(unavailable) at once when nothing can be listening: a missing ipc socket
        file, or one nobody listens on (a daemon killed with -9 leaves it behind; ZeroMQ would
        queue requests for it and say nothing): its socket monitor saw the connects refused.
        A stopped (hung) daemon still accepts connections: its requests time out instead."""
        client = self.asr if which == "asr" else self.tts
        why = missing_endpoint(client.endpoint)
        if why:
            raise DaemonError(why, ErrorCode.UNAVAILABLE)
        if client.reachable is False:
            raise DaemonError(f"the speech daemon at {client.endpoint} is not running (its connection is refused; "
                              "is s2s-speechd running?)", ErrorCode.UNAVAILABLE)

    async def synthesize_stream(self, **kw: Any) -> RetryingSynthStream:
        """A streamed-text synthesis (AsyncTTSClient.synthesize_stream's arguments) that a `busy`
        before its first audio does not lose: asked again as retry_after says, its text so far
        sent again, for up to BUSY_RETRY_SECONDS (bridge/synth_retry.py)."""
        busy = BusyWait()
        rid = kw.get("request_id") or ""

        async def reopen(e: DaemonError, attempt: int) -> Any:
            if e.code != ErrorCode.BUSY:
                raise e
            await busy.wait(e)
            self.check("tts")
            logger.info("synthesis %s: busy (%s); asking again", rid, e.message)
            return await self.tts.synthesize_stream(**{**kw, "request_id": retry_id(rid, attempt) if rid else None})

        return RetryingSynthStream(await self.tts.synthesize_stream(**kw), reopen)

    async def ping(self, which: str, timeout: float) -> float:
        self.check(which)
        return await (self.asr if which == "asr" else self.tts).ping(timeout)

    async def describe(self, timeout: float) -> Optional[Dict[str, Any]]:
        try:
            self.check("asr")
            return await self.asr.describe(timeout)
        except DaemonError:
            return None
