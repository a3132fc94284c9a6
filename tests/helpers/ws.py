"""A websockets client for the bridge that records every event, and raw HTTP helpers
(shared by the bridge test modules)."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import ssl
import time
import wave
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

FRAME = 640  # 20 ms of 16 kHz PCM16 per websocket message, like the page's worklet (40 ms)


def read_pcm(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        assert w.getframerate() == 16000 and w.getsampwidth() == 2 and w.getnchannels() == 1
        return w.readframes(w.getnframes())


def silence(seconds: float) -> bytes:
    return b"\0\0" * int(16000 * seconds)


class WSClient:
    """A websockets client that records every event with its arrival time."""

    def __init__(self, ws):
        self.ws = ws
        self.events: List[Tuple[float, Any]] = []  # (monotonic, dict | bytes)
        self.closed: Optional[ConnectionClosed] = None
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, **kw) -> "WSClient":
        ws = await connect(url, proxy=None, compression=None, open_timeout=10, **kw)
        return cls(ws)

    async def _read(self) -> None:
        try:
            async for m in self.ws:
                self.events.append((time.monotonic(), m if isinstance(m, bytes) else json.loads(m)))
        except ConnectionClosed as e:
            self.closed = e
        else:
            p = self.ws.protocol
            self.closed = ConnectionClosed(p.close_rcvd, p.close_sent, p.close_rcvd_then_sent)

    def of(self, kind: str) -> List[Dict[str, Any]]:
        return [e for _, e in self.events if isinstance(e, dict) and e.get("type") == kind]

    def audio(self) -> List[Tuple[float, bytes]]:
        return [(t, e) for t, e in self.events if isinstance(e, bytes)]

    async def wait(self, pred, timeout: float = 10.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                kinds = [e.get("type") if isinstance(e, dict) else f"<{len(e)} bytes>" for _, e in self.events][-40:]
                raise AssertionError(f"timed out waiting for {what or pred}; last events: {kinds}")
            if self._task.done() and not pred():
                raise AssertionError(f"connection closed while waiting for {what}: {self.closed!r}")
            await asyncio.sleep(0.01)

    async def wait_event(self, kind: str, n: int = 1, timeout: float = 10.0) -> Dict[str, Any]:
        await self.wait(lambda: len(self.of(kind)) >= n, timeout, f"{n} x {kind}")
        return self.of(kind)[n - 1]

    async def send_json(self, obj: Dict[str, Any]) -> None:
        await self.ws.send(json.dumps(obj, ensure_ascii=False))

    async def stream(self, pcm: bytes, realtime: bool = False, speed: float = 1.0) -> None:
        t0 = time.monotonic()
        for i, off in enumerate(range(0, len(pcm), FRAME)):
            await self.ws.send(pcm[off:off + FRAME])
            if realtime:
                ahead = t0 + (i + 1) * FRAME / 32000 / speed - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            elif i % 25 == 0:
                await asyncio.sleep(0.001)

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self._task, return_exceptions=True)


def http_get(port: int, path: str, headers: Optional[dict] = None,
             ssl_context: Optional[ssl.SSLContext] = None) -> Tuple[int, Dict[str, str], bytes]:
    """Raw GET: http.client sends the path exactly as given (no normalisation of '..')."""
    c = (http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ssl_context) if ssl_context
         else http.client.HTTPConnection("127.0.0.1", port, timeout=10))
    try:
        c.putrequest("GET", path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            c.putheader(k, v)
        c.endheaders()
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def metrics(port: int, ssl_context: Optional[ssl.SSLContext] = None) -> Dict[str, float]:
    """`GET /metrics` parsed: "name{labels}" -> value (Prometheus text format)."""
    status, _, body = http_get(port, "/metrics", ssl_context=ssl_context)
    assert status == 200, body[:200]
    out: Dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"^(\S+?(?:\{.*\})?) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
    return out
