"""The bridge's server: page + assets over HTTP, /healthz, and the /ws websocket, on one port.

Built on the websockets library's own patterns (asyncio server, websockets 17):
`process_request` answers plain HTTP GETs (static files from bridge/static only, /healthz)
and vets the websocket handshake (origin, token); `handler` runs one `Session` per browser.

Safe defaults:
- Origin: `bridge.allowed_origins`, or when empty only the page's own origin (an Origin
  header whose host:port equals the Host header) reached by a name that cannot belong to
  someone else: an IP address, localhost, *.localhost, the bind address or this machine's
  hostname. Any other name (DNS rebinding: a foreign domain that resolves to 127.0.0.1, so
  Origin and Host agree) needs allowed_origins. Requests without an Origin header (not a
  browser: CLI tools, tests) are let through: the token is what protects against them.
- Token: when `bridge.token` is set, `?token=` in the websocket URL (a wrong one is refused
  with HTTP 401) or the `token` field of the first `start`/`text` message.
- Logs: websockets' DEBUG request lines and headers go through `RedactSecrets`, so a
  `?token=` (and Authorization/Cookie headers) never reach the log.
- `max_size` = bridge.max_message_bytes (larger messages close the connection with 1009),
  default keepalive pings, at most bridge.max_connections sessions (more are closed with
  1013 "too many connections").
"""

from __future__ import annotations

import asyncio
import http
import ipaddress
import itertools
import json
import logging
import re
import socket
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from bridge.agents import Agent, build_agent, probe_agent
from bridge.session import Session, check_token
from daemon.config import Config

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
# The page talks to its own origin only; the worklet is a same-origin script.
CSP = "default-src 'self'; connect-src 'self' ws: wss:; media-src 'self' blob:; img-src 'self' data:"
HEALTH_CACHE_SECONDS = 5.0
DAEMON_PING_TIMEOUT = 1.0


class RedactSecrets(logging.Filter):
    """websockets logs each request line, header and frame at DEBUG; the token must not
    follow. Incoming text frames lose their payload entirely: the token may sit in a `start`
    message, and websockets shortens long frames to their head and tail, which can cut the
    word "token" off and keep the value."""

    PATTERN = re.compile(r"(?i)([?&]token=)[^&\s]+|((?:authorization|cookie|x-api-key):\s*)\S.*")
    FRAME = re.compile(r"^(< (?:TEXT|CONT)) .*?( \[\d+ bytes\])?$", re.S)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a broken record is logging's problem, not ours
            return True
        red = self.PATTERN.sub(lambda m: (m.group(1) or m.group(2)) + "<redacted>", msg)
        red = self.FRAME.sub(lambda m: m.group(1) + " <redacted>" + (m.group(2) or ""), red)
        if red != msg:
            record.msg, record.args = red, None
        return True


def _ws_logger() -> logging.Logger:
    log = logging.getLogger("websockets.server")
    if not any(isinstance(f, RedactSecrets) for f in log.filters):
        log.addFilter(RedactSecrets())
    return log


def own_host(host_header: str, bind_host: str = "") -> bool:
    """True when a Host header names this machine in a way no one else controls (an IP
    address, localhost, *.localhost, the bind address, the hostname): not DNS rebinding."""
    try:
        name = (urlsplit("//" + host_header).hostname or "").rstrip(".")
    except ValueError:
        return False
    if not name:
        return False
    if name == "localhost" or name.endswith(".localhost") or name == bind_host.lower() \
            or name == socket.gethostname().lower():
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def static_path(url_path: str, root: Path = STATIC_DIR) -> Optional[Path]:
    """The file under `root` that a URL path names, or None.

    The path is percent-decoded once; any segment that is empty, `.`, `..` or hidden, a
    backslash or NUL, or a result outside `root` (symlinks resolved) is refused, and so is
    any file type not in CONTENT_TYPES. `/` is index.html.
    """
    decoded = unquote(url_path, errors="strict") if "%" in url_path else url_path
    if "\\" in decoded or "\x00" in decoded or "%" in decoded:
        return None
    rel = decoded.lstrip("/") or "index.html"
    parts = rel.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        return None
    root = root.resolve()
    try:
        candidate = (root / rel).resolve()
    except (OSError, RuntimeError):
        return None
    if not candidate.is_relative_to(root) or not candidate.is_file():
        return None
    if candidate.suffix not in CONTENT_TYPES:
        return None
    return candidate


def _response(status: http.HTTPStatus, body: bytes, content_type: str, extra: Tuple[Tuple[str, str], ...] = ()) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff"), *extra])
    return Response(status.value, status.phrase, headers, body)


def _json_response(status: http.HTTPStatus, obj: Any) -> Response:
    return _response(status, json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8"), "application/json")


def _text_response(status: http.HTTPStatus, text: str) -> Response:
    return _response(status, (text + "\n").encode("utf-8"), "text/plain; charset=utf-8")


class Bridge:
    """Shared state of the bridge process: config, agent client, sessions, counters."""

    def __init__(self, cfg: Config, agent_kind: Optional[str] = None):
        self.cfg = cfg
        self.agent: Agent = build_agent(cfg.agent, agent_kind)
        # Started on echo although something else is configured: say so everywhere.
        self.echo_fallback = self.agent.kind == "echo" and cfg.agent.kind != "echo"
        self.notice = ""
        if self.echo_fallback:
            self.notice = (f"The configured agent ({cfg.agent.kind} at {cfg.agent.url}) does not answer: "
                           f"using the built-in echo agent, which repeats what it hears. "
                           f"配置的智能助手没有响应，现在使用内置的回声助手。")
        self.sessions: Dict[str, Session] = {}
        self.counters: Dict[str, int] = {"connections": 0, "refused_full": 0, "refused_origin": 0,
                                         "refused_token": 0, "closed_too_slow": 0}
        self._ids = itertools.count(1)
        self._health: Optional[Tuple[float, Dict[str, Any]]] = None
        self._health_lock = asyncio.Lock()
        self.port = 0

    # --- helpers ----------------------------------------------------------------------

    def agent_info(self) -> Dict[str, Any]:
        d = dict(self.agent.describe())
        d.update(configured_kind=self.cfg.agent.kind, echo_fallback=self.echo_fallback)
        if self.notice:
            d["notice"] = self.notice
        return d

    def check_token(self, given: Optional[str]) -> bool:
        return check_token(self.cfg.bridge.token, given)

    def origin_allowed(self, origin: Optional[str], host: Optional[str]) -> bool:
        if origin is None:
            return True  # not a browser
        allowed = self.cfg.bridge.allowed_origins
        if allowed:
            return origin.rstrip("/") in tuple(o.rstrip("/") for o in allowed)
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        # A browser's Origin is scheme://host[:port], nothing more.
        if parts.path or parts.query or parts.fragment or "@" in parts.netloc:
            return False
        return (parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host.lower()
                and own_host(host, self.cfg.bridge.host))

    # --- health -----------------------------------------------------------------------

    async def _ping(self, which: str) -> Dict[str, Any]:
        from daemon.client import AsyncClient, DaemonError

        c = AsyncClient(self.cfg.daemon.endpoint(which), timeout=DAEMON_PING_TIMEOUT)
        try:
            rtt = await c.ping(DAEMON_PING_TIMEOUT)
            return {"reachable": True, "rtt_ms": round(rtt * 1000.0, 1)}
        except DaemonError as e:
            return {"reachable": False, "error": e.message}
        finally:
            await c.close()

    async def _engines(self) -> Dict[str, Any]:
        """Which engines the daemon runs and every fallback it took (the daemon's Fallback records)."""
        from daemon.client import AsyncClient, DaemonError
        from daemon.engines import EngineInfo, Fallback, SchemaError

        c = AsyncClient(self.cfg.daemon.endpoint("asr"), timeout=DAEMON_PING_TIMEOUT)
        try:
            info = await c.describe(DAEMON_PING_TIMEOUT)
            engines = {k: EngineInfo.from_dict(info[k]) for k in ("asr", "tts")}
            fallbacks = [Fallback.from_dict(f).to_dict() for f in info.get("fallbacks", [])]
        except DaemonError as e:
            return {"error": e.message}
        except (SchemaError, KeyError, TypeError) as e:
            logger.warning("daemon describe has an unexpected shape: %s", e)
            return {"error": f"unexpected describe shape: {e}"}
        finally:
            await c.close()
        # hotwords/partials: the page disables what the engine cannot honour before a session is opened.
        return {"engines": {k: {"engine": e.engine, "device": e.device, "languages": list(e.capabilities.languages),
                                "hotwords": e.capabilities.hotwords, "partials": e.capabilities.partials}
                            for k, e in engines.items()},
                "fallbacks": fallbacks}

    async def health(self) -> Dict[str, Any]:
        async with self._health_lock:
            now = time.monotonic()
            if self._health is not None and now - self._health[0] < HEALTH_CACHE_SECONDS:
                return self._health[1]
            asr, tts = await asyncio.gather(self._ping("asr"), self._ping("tts"))
            agent = self.agent_info()
            ok, why = await probe_agent(self.cfg.agent, self.agent.kind, timeout=2.0)
            agent.update(reachable=ok, detail=why)
            if self.echo_fallback:
                c_ok, c_why = await probe_agent(self.cfg.agent, self.cfg.agent.kind, timeout=2.0)
                agent.update(configured_reachable=c_ok, configured_detail=c_why)
            daemon_ok = asr["reachable"] and tts["reachable"]
            healthy = daemon_ok and ok
            engines = await self._engines() if asr["reachable"] else {}
            h = {"status": "ok" if healthy else "degraded",
                 "daemon": {"reachable": daemon_ok, "asr": asr, "tts": tts, **engines},
                 "agent": agent,
                 "connections": len(self.sessions), "max_connections": self.cfg.bridge.max_connections,
                 "counters": dict(self.counters)}
            self._health = (now, h)
            return h

    # --- HTTP -------------------------------------------------------------------------

    async def process_request(self, connection: ServerConnection, request: Request) -> Optional[Response]:
        url = urlsplit(request.path)
        path = url.path
        if path == "/ws":
            origin = request.headers.get("Origin")
            if not self.origin_allowed(origin, request.headers.get("Host")):
                self.counters["refused_origin"] += 1
                logger.warning("refused websocket from origin %r (host %r)", origin, request.headers.get("Host"))
                return _text_response(http.HTTPStatus.FORBIDDEN, "origin not allowed")
            tokens = parse_qs(url.query).get("token")
            if tokens is not None and not self.check_token(tokens[0]):
                self.counters["refused_token"] += 1
                return _text_response(http.HTTPStatus.UNAUTHORIZED, "wrong token")
            return None  # go on with the websocket handshake
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return _text_response(http.HTTPStatus.NOT_FOUND, "the websocket endpoint is /ws")
        if path == "/healthz":
            h = await self.health()
            return _json_response(http.HTTPStatus.OK if h["status"] == "ok" else http.HTTPStatus.SERVICE_UNAVAILABLE, h)
        try:
            f = static_path(path)
        except UnicodeDecodeError:
            f = None
        if f is None:
            return _text_response(http.HTTPStatus.NOT_FOUND, "not found")
        body = await asyncio.to_thread(f.read_bytes)
        extra = (("Content-Security-Policy", CSP),) if f.suffix == ".html" else ()
        return _response(http.HTTPStatus.OK, body, CONTENT_TYPES[f.suffix], extra)

    # --- websocket --------------------------------------------------------------------

    async def handler(self, ws: ServerConnection) -> None:
        if len(self.sessions) >= self.cfg.bridge.max_connections:
            self.counters["refused_full"] += 1
            logger.warning("refusing a connection from %s: %d connections open (bridge.max_connections)",
                           ws.remote_address, len(self.sessions))
            await ws.close(1013, "too many connections")
            return
        conn_id = f"c{next(self._ids)}"
        query = parse_qs(urlsplit(ws.request.path).query) if ws.request is not None else {}
        token = (query.get("token") or [None])[0]
        authed = not self.cfg.bridge.token or (token is not None and self.check_token(token))
        session = Session(ws, self, conn_id, authed)
        self.sessions[conn_id] = session
        self.counters["connections"] += 1
        logger.info("conn %s: open from %s (%d open)", conn_id, ws.remote_address, len(self.sessions))
        try:
            await session.run()
        finally:
            del self.sessions[conn_id]
            logger.info("conn %s: closed (code %s)", conn_id, ws.close_code)

    async def serve(self, stop: asyncio.Event, on_ready: Any = None) -> None:
        bc = self.cfg.bridge
        async with serve(self.handler, bc.host, bc.port, process_request=self.process_request,
                         max_size=bc.max_message_bytes, close_timeout=bc.slow_client_timeout,
                         # PCM barely compresses: permessage-deflate would only cost CPU.
                         compression=None, server_header="s2s-bridge", logger=_ws_logger()) as server:
            sock = next(iter(server.sockets))
            self.port = sock.getsockname()[1]
            logger.info("s2s-bridge: serving http://%s:%d/ (agent %s%s)", bc.host, self.port, self.agent.kind,
                        ", echo fallback" if self.echo_fallback else "")
            if on_ready is not None:
                on_ready(self)
            await stop.wait()
            logger.info("s2s-bridge: stopping (%d connections)", len(self.sessions))
        await self.agent.aclose()
