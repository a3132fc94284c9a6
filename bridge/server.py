"""The bridge's server: page + assets over HTTP(S), /healthz, /metrics and the /ws websocket,
on one port.

Built on the websockets library's own patterns (asyncio server, websockets 17):
`process_request` answers plain HTTP GETs (static files from bridge/static only, /healthz,
/metrics) and vets the websocket handshake (origin; a token in the URL is refused); `handler`
runs one `Connection` per browser (bridge/connection.py). Who may do what is bridge/auth.py.

Safe defaults:
- Origin check and token: bridge/auth.py. The token travels in the first message only.
- `/healthz` answers status, the daemon's engines and fallbacks (component, from, to) and the
  agent's kind to anyone; the detail (agent URL and model, daemon error strings, probe
  results, counters) needs `Authorization: Bearer <bridge.token>`, so with no token
  configured nobody gets it over HTTP (the log and `s2s-ctl health` have it).
- Logs: websockets' DEBUG request lines and headers go through `RedactSecrets`, so a
  `?token=` (and Authorization/Cookie headers) never reach the log.
- `max_size` = bridge.max_message_bytes (larger messages close the connection with 1009),
  default keepalive pings, at most bridge.max_connections logged-in connections and
  bridge.max_connections_per_ip from one network (more are closed with 1013); connections that
  have not sent the token yet have their own budget, bridge.max_pending_logins (bridge/auth.py).
- A request with a doubled Host, Origin, Upgrade or Authorization header, or a path segment
  longer than a file name can be, is a 400 (one log line), never a traceback.
- TLS when bridge.tls_cert / bridge.tls_key are set (https and wss on the same port).
"""

from __future__ import annotations

import asyncio
import http
import itertools
import json
import logging
import re
import ssl
import time
from pathlib import Path
from typing import Any, Dict, Optional, Set, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from bridge import metrics as M
from bridge.agents import AgentLimits, build_agent, probe_agent
from bridge.auth import (AddressCap, PendingLogins, bearer, check_token, network_key, origin_allowed,  # noqa: F401
                         own_host)  # own_host: API
from bridge.connection import Connection
from bridge.context import Context
from bridge.daemon_pool import daemon_link
from daemon.wire.client import DaemonError
from daemon.config import Config
from daemon.serving.transport import LogLimiter

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
TOKEN_IN_URL = "send the token in the first message, not in the URL (it would be kept in history and logs)"
HEALTH_CACHE_SECONDS = 5.0
# Headers the bridge reads: more than one of any is a bad request, not a guess.
SINGLE_HEADERS = ("Host", "Origin", "Upgrade", "Authorization")
# Seconds a connection pushed out of the slots for logins in waiting still has to log in.
PUSH_OUT_GRACE = 1.0
# The longest file name (NAME_MAX); a longer path segment names nothing.
MAX_SEGMENT = 255
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


def static_path(url_path: str, root: Path = STATIC_DIR) -> Optional[Path]:
    """The file under `root` that a URL path names, or None.

    The path is percent-decoded once; any segment that is empty, `.`, `..`, hidden or longer
    than a file name can be (MAX_SEGMENT), a
    backslash or NUL, or a result outside `root` (symlinks resolved) is refused, and so is
    any file type not in CONTENT_TYPES. `/` is index.html.
    """
    decoded = unquote(url_path, errors="strict") if "%" in url_path else url_path
    if "\\" in decoded or "\x00" in decoded or "%" in decoded:
        return None
    rel = decoded.lstrip("/") or "index.html"
    parts = rel.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") or len(p) > MAX_SEGMENT for p in parts):
        return None
    root = root.resolve()
    try:
        candidate = (root / rel).resolve()
        if not candidate.is_relative_to(root) or not candidate.is_file():
            return None
    except (OSError, RuntimeError):
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
    """The bridge process: config, agent client, the shared daemon link, metrics, connections."""

    def __init__(self, cfg: Config, agent_kind: Optional[str] = None):
        self.cfg = cfg
        bc = cfg.bridge
        self.agent = build_agent(cfg.agent, agent_kind, AgentLimits(max_tokens=bc.max_reply_tokens,
                                                                    max_reply_chars=bc.max_reply_chars))
        # Started on echo although something else is configured: say so everywhere.
        self.echo_fallback = self.agent.kind == "echo" and cfg.agent.kind != "echo"
        self.notice = ""          # for the log: names the agent's URL
        self.public_notice = ""   # for browsers: does not
        if self.echo_fallback:
            self.notice = (f"The configured agent ({cfg.agent.kind} at {cfg.agent.url}) does not answer: "
                           f"using the built-in echo agent, which repeats what it hears.")
            self.public_notice = (f"The configured agent ({cfg.agent.kind}) does not answer: using the built-in "
                                  f"echo agent, which repeats what it hears. "
                                  f"配置的智能助手没有响应，现在使用内置的回声助手。")
        self.metrics = M.Metrics()
        self.daemon = daemon_link(cfg)
        self.ctx = Context(cfg, self.agent, self.daemon, self.metrics, self.public_agent())
        self.connections: Dict[str, Connection] = {}
        self.addresses = AddressCap(bc.max_connections_per_ip)   # logged-in connections per network
        self.logged_in: Set[str] = set()
        self.pending = PendingLogins(bc.max_pending_logins, bc.max_connections_per_ip)
        self._closing: Set[asyncio.Task] = set()
        self._pushed_out: Dict[Connection, asyncio.TimerHandle] = {}   # in their grace, oldest first
        # Lines a client can cause at will (bad requests, pushed-out logins): a few, with counts.
        self.bad_requests = LogLimiter(logger)
        self._ids = itertools.count(1)
        self._health: Optional[Tuple[float, Dict[str, Any]]] = None
        self._health_lock = asyncio.Lock()
        self.port = 0

    # --- what may be shown --------------------------------------------------------------

    def public_agent(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"kind": self.agent.kind, "configured_kind": self.cfg.agent.kind,
                             "echo_fallback": self.echo_fallback}
        if self.public_notice:
            d["notice"] = self.public_notice
        return d

    def agent_detail(self) -> Dict[str, Any]:
        d = dict(self.agent.describe())
        d.update(configured_kind=self.cfg.agent.kind, echo_fallback=self.echo_fallback)
        if self.notice:
            d["notice"] = self.notice
        return d

    def check_token(self, given: Optional[str]) -> bool:
        return check_token(self.cfg.bridge.token, given)

    def origin_allowed(self, origin: Optional[str], host: Optional[str]) -> bool:
        return origin_allowed(origin, host, self.cfg.bridge.allowed_origins, self.cfg.bridge.host)

    def origin_check(self, query: str, host: Optional[str]) -> Dict[str, Any]:
        """GET /origin-check?origin=<the page's origin>: would the page's websocket be let in? A
        browser cannot read why an upgrade failed (the 403 reaches the page as a bare close), so
        the page asks here and says what to set instead of reconnecting for ever."""
        origin = (parse_qs(query).get("origin") or [""])[0]
        allowed = 0 < len(origin) <= MAX_SEGMENT and self.origin_allowed(origin, host)
        return {"origin": origin[:MAX_SEGMENT], "allowed": allowed, "setting": "bridge.allowed_origins",
                "tls": bool(self.cfg.bridge.tls_cert)}

    # --- health -----------------------------------------------------------------------

    def _link_up(self) -> bool:
        """What the daemon link knows now, without asking the daemon (its socket monitor)."""
        try:
            self.daemon.check("asr")
            self.daemon.check("tts")
            return True
        except DaemonError:
            return False

    async def _ping(self, which: str) -> Dict[str, Any]:
        try:
            rtt = await self.daemon.ping(which, DAEMON_PING_TIMEOUT)
            return {"reachable": True, "rtt_ms": round(rtt * 1000.0, 1)}
        except DaemonError as e:
            return {"reachable": False, "error": e.message}

    async def _engines(self) -> Dict[str, Any]:
        """Which engines the daemon runs and every fallback it took (the daemon's Fallback records)."""
        from daemon.engines import EngineInfo, Fallback, SchemaError

        info = await self.daemon.describe(DAEMON_PING_TIMEOUT)
        if info is None:
            return {"error": "the daemon did not answer describe"}
        try:
            engines = {k: EngineInfo.from_dict(info[k]) for k in ("asr", "tts")}
            fallbacks = [Fallback.from_dict(f).to_dict() for f in info.get("fallbacks", [])]
        except (SchemaError, KeyError, TypeError) as e:
            logger.warning("daemon describe has an unexpected shape: %s", e)
            return {"error": f"unexpected describe shape: {e}"}
        # hotwords/partials: the page disables what the engine cannot honour before a session is opened.
        return {"engines": {k: {"engine": e.engine, "device": e.device, "languages": list(e.capabilities.languages),
                                "hotwords": e.capabilities.hotwords, "partials": e.capabilities.partials}
                            for k, e in engines.items()},
                "fallbacks": fallbacks}

    def counters(self) -> Dict[str, int]:
        m = self.metrics
        c = {"connections": m.count(m.connections)}
        for reason in ("full", "per_address", "pending", "origin", "token_in_url"):
            c[f"refused_{reason}"] = m.count(m.refused, reason)
        c["closed_too_slow"] = m.count(m.closed, "client too slow")
        return c

    async def health(self) -> Dict[str, Any]:
        """The full health report (the detail, behind the token); `public_health` derives the rest."""
        async with self._health_lock:
            now = time.monotonic()
            # The cache never hides a daemon the link already knows is gone (a load balancer's
            # health check must see it at once) nor one that is back.
            if self._health is not None and now - self._health[0] < HEALTH_CACHE_SECONDS \
                    and self._health[1]["daemon"]["reachable"] == self._link_up():
                return self._health[1]
            asr, tts = await asyncio.gather(self._ping("asr"), self._ping("tts"))
            agent = self.agent_detail()
            ok, why = await probe_agent(self.cfg.agent, self.agent.kind, timeout=2.0)
            agent.update(reachable=ok, detail=why)
            if self.echo_fallback:
                c_ok, c_why = await probe_agent(self.cfg.agent, self.cfg.agent.kind, timeout=2.0)
                agent.update(configured_reachable=c_ok, configured_detail=c_why)
            daemon_ok = asr["reachable"] and tts["reachable"]
            healthy = daemon_ok and ok
            engines = await self._engines() if asr["reachable"] else {}
            # Several daemons (cluster.daemons): each one's placement state (up, why, room, sessions).
            report = getattr(self.daemon, "report", None)
            daemons = {"daemons": report()} if report is not None else {}
            h = {"status": "ok" if healthy else "degraded", "auth_required": bool(self.cfg.bridge.token),
                 "tls": bool(self.cfg.bridge.tls_cert),
                 "daemon": {"reachable": daemon_ok, "asr": asr, "tts": tts, **engines, **daemons},
                 "agent": agent,
                 "connections": len(self.connections), "max_connections": self.cfg.bridge.max_connections,
                 "counters": self.counters()}
            self._health = (now, h)
            return h

    def public_health(self, h: Dict[str, Any]) -> Dict[str, Any]:
        """What anyone may see: status, engines, fallbacks (component, from, to, when), the agent's kind."""
        d = h["daemon"]
        daemon: Dict[str, Any] = {"reachable": d["reachable"]}
        if "daemons" in d:  # how many are in placement, not where they are
            daemon["daemons_up"], daemon["daemons"] = sum(r["up"] for r in d["daemons"]), len(d["daemons"])
        if "engines" in d:
            daemon["engines"] = d["engines"]
            daemon["fallbacks"] = [{k: f[k] for k in ("component", "from", "to", "when") if k in f}
                                   for f in d.get("fallbacks", [])]
        a = h["agent"]
        agent = {**self.public_agent(), **{k: a[k] for k in ("reachable", "configured_reachable") if k in a}}
        return {"status": h["status"], "auth_required": h["auth_required"], "daemon": daemon, "agent": agent,
                "connections": h["connections"]}

    # --- HTTP -------------------------------------------------------------------------

    def _bad_request(self, request: Request) -> Optional[str]:
        """Why a request is malformed in a way the handlers below must not see, or None."""
        for name in SINGLE_HEADERS:
            if len(request.headers.get_all(name)) > 1:
                return f"more than one {name} header"
        if any(len(seg) > MAX_SEGMENT for seg in urlsplit(request.path).path.split("/")):
            return f"a path segment is longer than {MAX_SEGMENT} characters"
        return None

    async def process_request(self, connection: ServerConnection, request: Request) -> Optional[Response]:
        bad = self._bad_request(request)
        if bad is not None:
            self.bad_requests(logging.WARNING, "bad request", "bad request from %s: %s",
                              connection.remote_address[0] if connection.remote_address else "?", bad)
            return _text_response(http.HTTPStatus.BAD_REQUEST, bad)
        url = urlsplit(request.path)
        path = url.path
        if path == "/ws":
            origin = request.headers.get("Origin")
            if not self.origin_allowed(origin, request.headers.get("Host")):
                self.metrics.refused.labels("origin").inc()
                self.bad_requests(logging.WARNING, "origin", "refused websocket from origin %r (host %r)",
                                  origin, request.headers.get("Host"))
                return _text_response(http.HTTPStatus.FORBIDDEN, "origin not allowed")
            if "token" in parse_qs(url.query, keep_blank_values=True):
                self.metrics.refused.labels("token_in_url").inc()
                return _text_response(http.HTTPStatus.BAD_REQUEST, TOKEN_IN_URL)
            return None  # go on with the websocket handshake
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return _text_response(http.HTTPStatus.NOT_FOUND, "the websocket endpoint is /ws")
        if path == "/origin-check":
            return _json_response(http.HTTPStatus.OK, self.origin_check(url.query, request.headers.get("Host")))
        if path == "/healthz":
            h = await self.health()
            given = bearer(request.headers.get("Authorization"))
            detail = bool(self.cfg.bridge.token) and given is not None and self.check_token(given)
            status = http.HTTPStatus.OK if h["status"] == "ok" else http.HTTPStatus.SERVICE_UNAVAILABLE
            return _json_response(status, h if detail else self.public_health(h))
        if path == "/metrics":
            info = await self.daemon.describe(DAEMON_PING_TIMEOUT)
            return _response(http.HTTPStatus.OK, self.metrics.render(info), M.CONTENT_TYPE)
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

    async def _refuse(self, ws: ServerConnection, reason: str, message: str) -> None:
        self.metrics.refused.labels(reason).inc()
        self.bad_requests(logging.WARNING, f"refused {reason}", "refusing a connection from %s: %s",
                          ws.remote_address, message)
        await ws.close(1013, message)

    def _admit(self, network: str) -> Optional[Tuple[str, str]]:
        """Count one more logged-in connection from `network`; (reason, message) when it does not fit."""
        if len(self.logged_in) >= self.cfg.bridge.max_connections:
            return "full", "too many connections"
        if not self.addresses.acquire(network):
            return "per_address", "too many connections from this address"
        return None

    def _login(self, conn: Connection, network: str) -> Optional[str]:
        """The right token arrived: from the budget for logins in waiting to the logged-in one."""
        self.pending.remove(conn)
        self._forget_pushed_out(conn)  # made it within its grace
        refused = self._admit(network)
        if refused is not None:
            self.metrics.refused.labels(refused[0]).inc()
            logger.warning("conn %s: refused at login: %s", conn.id, refused[1])
            return refused[1]
        self.logged_in.add(conn.id)
        return None

    def _push_out(self, conn: Connection) -> None:
        """A connection waiting to log in lost its slot to a newer one: it has PUSH_OUT_GRACE
        seconds left to log in, then it is closed. (Closed at once, a squatter that reconnects
        whenever it is closed would push out the next one at once, and that one the next: a
        login would keep its slot for milliseconds. With the grace they cycle once a second.)
        At most max_pending_logins wait in their grace; one more closes the oldest at once."""
        if len(self._pushed_out) >= self.cfg.bridge.max_pending_logins:
            self._close_pushed_out(next(iter(self._pushed_out)))
        self._pushed_out[conn] = asyncio.get_running_loop().call_later(PUSH_OUT_GRACE, self._close_pushed_out, conn)

    def _close_pushed_out(self, conn: Connection) -> None:
        handle = self._pushed_out.pop(conn, None)
        if handle is not None:
            handle.cancel()
        self.metrics.refused.labels("pending").inc()
        self.bad_requests(logging.WARNING, "pushed out", "conn %s: closed while waiting to log in: more connections "
                          "wait than bridge.max_pending_logins or its network's share allow", conn.id)
        task = asyncio.create_task(conn.ws.close(1013, "too many connections waiting to log in"))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _forget_pushed_out(self, conn: Connection) -> None:
        handle = self._pushed_out.pop(conn, None)
        if handle is not None:
            handle.cancel()

    async def handler(self, ws: ServerConnection) -> None:
        address = str(ws.remote_address[0]) if ws.remote_address else ""
        network = network_key(address)
        if not self.cfg.bridge.token:  # no token configured: logged in at once
            refused = self._admit(network)
            if refused is not None:
                await self._refuse(ws, *refused)
                return
        conn_id = f"c{next(self._ids)}"
        conn = Connection(ws, self.ctx, conn_id, on_login=lambda: self._login(conn, network))
        if conn.authed:
            self.logged_in.add(conn_id)
        else:
            victim = self.pending.add(network, conn)
            if victim is not None:
                self._push_out(victim)
        try:
            self.connections[conn_id] = conn
            self.metrics.connections.inc()
            self.metrics.open.inc()
            logger.info("conn %s: open from %s (%d open)", conn_id, ws.remote_address, len(self.connections))
            try:
                await conn.run()
            finally:
                del self.connections[conn_id]
                self.metrics.open.dec()
                logger.info("conn %s: closed (code %s)", conn_id, ws.close_code)
        finally:
            self.pending.remove(conn)
            self._forget_pushed_out(conn)
            if conn_id in self.logged_in:
                self.logged_in.discard(conn_id)
                self.addresses.release(network)

    def ssl_context(self) -> Optional[ssl.SSLContext]:
        bc = self.cfg.bridge
        if not bc.tls_cert:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(bc.tls_cert, bc.tls_key)
        return ctx

    async def serve(self, stop: asyncio.Event, on_ready: Any = None) -> None:
        bc = self.cfg.bridge
        tls = self.ssl_context()
        await self.daemon.start()
        try:
            async with serve(self.handler, bc.host, bc.port, process_request=self.process_request,
                             max_size=bc.max_message_bytes, close_timeout=bc.slow_client_timeout, ssl=tls,
                             # PCM barely compresses: permessage-deflate would only cost CPU.
                             compression=None, server_header="s2s-bridge", logger=_ws_logger()) as server:
                sock = next(iter(server.sockets))
                self.port = sock.getsockname()[1]
                logger.info("s2s-bridge: serving %s://%s:%d/ (agent %s%s)", "https" if tls else "http", bc.host,
                            self.port, self.agent.kind, ", echo fallback" if self.echo_fallback else "")
                if on_ready is not None:
                    on_ready(self)
                await stop.wait()
                logger.info("s2s-bridge: stopping (%d connections)", len(self.connections))
        finally:
            await self.daemon.close()
            await self.agent.aclose()
