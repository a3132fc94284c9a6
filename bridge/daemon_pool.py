"""Several speech daemons behind one front end (issue 29): `DaemonPool` speaks the same surface
as the one-daemon link (bridge/daemon_link.py: `asr.open`, `asr.send`, `tts.synthesize_stream`,
`tts.synthesize`, `check`, `ping`, `describe`, `start`, `close`) over one pair of shared
asyncio clients per daemon (`cluster.daemons`), and daemon/wire/placement.py decides where each new
ASR session and synthesis goes.

- A session stays on the daemon it was opened on: its stream object holds that daemon's client,
  and `asr.send(msg)` for a session goes to the client that opened it.
- An `open` refused with `shutting_down` (a daemon draining for a restart), `unavailable` (its
  connection lost) or `busy` is tried on the other daemons, most room first, before the caller
  sees the error (the last one). A streamed synthesis refused before its first audio goes on
  another daemon with its text so far (bridge/synth_retry.py); placement stops choosing a stopping
  daemon within INTERVAL (0.25 s), this covers the moment before.
- `report()` is each daemon's placement state for /healthz and /metrics.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple, cast

from bridge.daemon_link import OPEN_TIMEOUT, TTS_TIMEOUT, DaemonLink
from bridge.synth_retry import BusyWait, RetryingSynthStream, retry_id
from daemon.wire.placement import ClientMember, Placement
from daemon.config import Config
from daemon.errors import ErrorCode, S2SError
from daemon.wire import protocol as P
from daemon.wire.client import AsyncASRClient, AsyncTTSClient, DaemonError

logger = logging.getLogger(__name__)

def _unavailable(e: Exception) -> DaemonError:
    return e if isinstance(e, DaemonError) else DaemonError(str(getattr(e, "message", e)), ErrorCode.UNAVAILABLE)


class PlacedASR:
    def __init__(self, pool: "DaemonPool"):
        self.pool = pool
        self._streams: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()

    async def open(self, **kw: Any) -> Any:
        async def attempt(m: Any) -> Any:
            return await m.asr.open(**kw)

        try:
            stream = await self.pool.placement.first_taker("asr", attempt)
        except DaemonError:
            raise
        except S2SError as e:  # no daemon in placement: the clients' error type, as the one-daemon link's
            raise DaemonError(e.message, e.code) from None
        self._streams[stream.session_id] = stream
        return stream

    async def send(self, msg: P.Message) -> None:
        """A message for an open session (finalize, reset, close): to the daemon it lives on."""
        stream = self._streams.get(getattr(msg, "session_id", ""))
        if stream is None:
            raise DaemonError(f"no open session {getattr(msg, 'session_id', '')!r} on any daemon", ErrorCode.NO_SESSION)
        await stream.client.send(msg)


class PlacedTTS:
    def __init__(self, pool: "DaemonPool"):
        self.pool = pool

    async def synthesize_stream(self, **kw: Any) -> RetryingSynthStream:
        """Placed on the daemon with the most room; refused before its first audio (`shutting_down`:
        placed in the moment between a SIGTERM and placement learning it; `unavailable`; `busy`), it
        goes on on another daemon with its text so far, and waits out `busy` when none has room
        (bridge/synth_retry.py)."""
        placement = self.pool.placement
        m: Any = placement.place("tts")
        tried, busy, rid = [m], BusyWait(), kw.get("request_id") or ""

        async def reopen(e: DaemonError, attempt: int) -> Any:
            placement.refused(tried[-1], e.code)
            try:
                nxt: Any = placement.place("tts", exclude=tried)
            except S2SError:
                if e.code != ErrorCode.BUSY:
                    raise e from None
                await busy.wait(e)  # every daemon tried: wait as the last one said, then the most room
                tried[:] = []
                try:
                    nxt = placement.place("tts")
                except S2SError:
                    raise e from None
            logger.info("synthesis %s refused (%s): going on on daemon %s", rid, e.code.value, nxt.name)
            tried.append(nxt)
            return await nxt.tts.synthesize_stream(**{**kw, "request_id": retry_id(rid, attempt) if rid else None})

        return RetryingSynthStream(await m.tts.synthesize_stream(**kw), reopen)

    async def synthesize(self, text: str, **kw: Any) -> AsyncIterator[P.SynthAudio]:
        m: Any = self.pool.placement.place("tts")
        async for chunk in m.tts.synthesize(text, **kw):
            yield chunk


class DaemonPool:
    def __init__(self, endpoints: Sequence[Any], open_timeout: float, tts_timeout: float,
                 cfg: Optional[Config] = None):
        """endpoints: cluster.daemons entries (asr, tts); cfg: the front end's (as the link's `cfg`)."""
        self.cfg = cfg or Config()
        self.members = [ClientMember(f"{i}:{d.asr}",
                                     AsyncASRClient(d.asr, timeout=open_timeout, reconnect_on_timeout=False),
                                     AsyncTTSClient(d.tts, timeout=tts_timeout, reconnect_on_timeout=False))
                        for i, d in enumerate(endpoints)]
        self.placement = Placement(self.members)
        self.asr = PlacedASR(self)
        self.tts = PlacedTTS(self)

    async def start(self) -> None:
        for m in self.members:
            await m.asr.connect()
            await m.tts.connect()
        await self.placement.start()

    async def close(self) -> None:
        await self.placement.close()
        for m in self.members:
            await m.asr.close()
            await m.tts.close()

    async def synthesize_stream(self, **kw: Any) -> RetryingSynthStream:
        """The front ends' streamed synthesis (as DaemonLink.synthesize_stream): placed, see PlacedTTS."""
        return await self.tts.synthesize_stream(**kw)

    def check(self, which: str) -> None:
        """DaemonError(unavailable) at once when no daemon is in placement, naming each one's why."""
        if not self.placement.live():
            why = "; ".join(f"{r['name']}: {r['why']}" for r in self.placement.report())
            raise DaemonError(f"no speech daemon is available ({why})", ErrorCode.UNAVAILABLE)

    async def ping(self, which: str, timeout: float) -> float:
        """The round trip to the first daemon in placement that answers."""
        self.check(which)
        last: Optional[Exception] = None
        for s in self.placement.live():
            m: Any = s.member
            try:
                rtt: float = await (m.asr if which == "asr" else m.tts).ping(timeout)
                return rtt
            except DaemonError as e:
                last = e
        raise _unavailable(last or DaemonError("no daemon answered", ErrorCode.UNAVAILABLE))

    async def describe(self, timeout: float) -> Optional[Dict[str, Any]]:
        """The first daemon in placement's describe (engines, fallbacks), with every daemon's
        placement state under "placement" and its last counters under "daemon_series" (/metrics)."""
        for s in self.placement.live():
            try:
                info: Dict[str, Any] = await s.member.describe(timeout)
            except DaemonError:
                continue
            return {**info, "placement": self.placement.report(), "daemon_series": self.placement.series()}
        return None

    def report(self) -> List[Dict[str, Any]]:
        return self.placement.report()


def daemon_link(cfg: Config) -> DaemonLink:
    """What a front end talks to: the one daemon of daemon.asr_endpoint/tts_endpoint
    (bridge/daemon_link.py), or, with cluster.daemons set, a DaemonPool over those (it has the
    link's surface; cast so the front ends' annotations stay one type)."""
    if cfg.cluster.daemons:
        return cast(DaemonLink, DaemonPool(cfg.cluster.daemons, OPEN_TIMEOUT, TTS_TIMEOUT, cfg))
    return DaemonLink(cfg)
