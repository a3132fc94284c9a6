"""The daemon's ROUTER transport: IPC preparation, bind, send, and the receive loop.

- **Receive:** decode each message and hand it to the socket's handler; a bad message gets
  an `error` reply with a stable code. Nothing one message does can end the loop: the reply
  to it is built from validated fields only and sending never raises.
- **Flood control:** under a flood pyzmq hands back already-completed futures, so awaiting
  them never yields; the loop yields to the event loop every `YIELD_EVERY` messages. Each
  peer has an error budget for malformed messages (a token bucket): replies beyond it are
  dropped and counted, not sent, so a flooder cannot make us flood it (or the log) back.
  Refusals of well-formed requests are always answered (the bridge is one peer for many users).
- **Send:** `send` never blocks (a vanished peer is reported to `on_peer_gone`; a peer at
  its high-water mark loses the message, counted); `send_wait` retries a full peer for a
  while and is what every reply that must not be lost goes through (TTS audio, finals,
  `done`, `closed`, acks). Log lines about peers are rate-limited.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket as pysocket
import time
from pathlib import Path
from typing import Awaitable, Callable, Dict, List, Optional, Tuple

import zmq
import zmq.asyncio

from daemon.config_frontends import ClusterConfig
from daemon.errors import ErrorCode, S2SError
from daemon.serving.curve import ServerCurve
from daemon.wire import protocol as P
from daemon.wire.curve import CurveError
from daemon.wire.protocol_fields import is_text

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 << 20
LINGER_MS = 500
# Yield to the event loop after this many messages handled back to back.
YIELD_EVERY = 32
# A message of more than P.MAX_REQUEST_FRAMES frames is drained (not kept), yielding to the
# event loop after every this many frames: millions of empty frames are a few MB on the wire.
DRAIN_YIELD_FRAMES = 2048
# Error replies per peer: a burst of this many, refilled at this rate per second.
ERROR_BURST, ERROR_RATE = 200.0, 100.0
# Peers remembered for budgets (the least recently seen are forgotten first).
MAX_PEERS = 4096
# How long `send_wait` keeps retrying a peer at its high-water mark by default, seconds.
SEND_WAIT_SECONDS = 10.0

# Longest unix socket path (sockaddr_un.sun_path less its NUL).
IPC_PATH_MAX = int(getattr(zmq, "IPC_PATH_MAX_LEN", 0) or 107)

Handler = Callable[[bytes, P.Message], Optional[Awaitable[None]]]


class BindError(S2SError):
    """An endpoint the daemon cannot listen on; the message names it and says why."""

    def __init__(self, endpoint: str, why: str):
        super().__init__(f"cannot bind {endpoint}: {why}", ErrorCode.UNAVAILABLE)
        self.endpoint = endpoint


def short(ident: bytes) -> str:
    return ident.hex()[:12] if not ident.isascii() else ident.decode("ascii", "replace")[:40]


class LogLimiter:
    """At most one line per key per `interval` seconds; the next line says how many were held back."""

    def __init__(self, log: logging.Logger, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.log = log
        self.interval = interval
        self.clock = clock
        self._last: Dict[str, Tuple[float, int]] = {}

    def __call__(self, level: int, key: str, msg: str, *args: object) -> bool:
        now = self.clock()
        last, held = self._last.get(key, (-1e18, 0))
        if now - last < self.interval:
            self._last[key] = (last, held + 1)
            return False
        if held:
            msg += " (%d more like this in the last %.0f s)"
            args = args + (held, now - last)
        self._last[key] = (now, 0)
        self.log.log(level, msg, *args)
        return True


class PeerBudgets:
    """A token bucket per peer identity (injected clock, so tests need no sleeps)."""

    def __init__(self, burst: float = ERROR_BURST, rate: float = ERROR_RATE,
                 clock: Callable[[], float] = time.monotonic, max_peers: int = MAX_PEERS):
        self.burst, self.rate, self.clock, self.max_peers = burst, rate, clock, max_peers
        self._peers: Dict[bytes, Tuple[float, float]] = {}

    def take(self, ident: bytes) -> bool:
        now = self.clock()
        tokens, at = self._peers.pop(ident, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        ok = tokens >= 1.0
        self._peers[ident] = (tokens - 1.0 if ok else tokens, now)  # re-inserted: most recent last
        while len(self._peers) > self.max_peers:
            del self._peers[next(iter(self._peers))]
        return ok


def prepare_ipc(endpoint: str) -> Optional[Path]:
    """Create the runtime directory (0750) of an ipc:// endpoint and remove a stale socket
    file; refuse one a live daemon still owns. (tcp:// is daemon/serving/curve.py's.)"""
    if not endpoint.startswith("ipc://"):
        return None
    path = Path(endpoint[len("ipc://"):])
    if len(os.fsencode(path)) > IPC_PATH_MAX:
        raise BindError(endpoint, f"path too long for a unix socket ({len(os.fsencode(path))} bytes; "
                                  f"at most {IPC_PATH_MAX}): use a shorter daemon.runtime_dir")
    parent = path.parent
    if not parent.exists():
        # Only the daemon and its group (the bridge) may look inside a directory we create.
        parent.mkdir(parents=True, mode=0o750)
        os.chmod(parent, 0o750)
    if path.exists():
        # libzmq silently replaces the file: make sure no live daemon still owns it.
        probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise BindError(endpoint, "the socket is in use by another running daemon")
        finally:
            probe.close()
    return path


class Transport:
    """Both ROUTER sockets ("asr", "tts") of one daemon."""

    def __init__(self, hwm: int, socket_mode: int, counters: Dict[str, int],
                 on_peer_gone: Callable[[bytes], None], cluster: ClusterConfig = ClusterConfig()):
        self.hwm = hwm
        self.socket_mode = socket_mode
        self.counters = counters
        self.on_peer_gone = on_peer_gone
        self.ctx = zmq.asyncio.Context()
        self.curve = ServerCurve(self.ctx, cluster.curve_dir, cluster.allow_plain_tcp, counters)
        self.socks: Dict[str, zmq.asyncio.Socket] = {}
        self._sync: Dict[str, zmq.Socket] = {}
        self.endpoints: Dict[str, str] = {}
        self.budgets = PeerBudgets()
        self.limited = LogLimiter(logger)
        for k in ("dropped_hwm", "protocol_errors", "errors_unanswered", "send_retries", "too_many_frames"):
            counters.setdefault(k, 0)

    def bind(self, which: str, endpoint: str) -> None:
        """Listen on `endpoint`; BindError naming it and why otherwise. A socket that failed
        to bind is closed here: one left open would hang the context's termination."""
        try:
            path = prepare_ipc(endpoint)
        except OSError as e:
            raise BindError(endpoint, e.strerror or str(e)) from None
        s = self.ctx.socket(zmq.ROUTER)
        try:
            s.setsockopt(zmq.ROUTER_MANDATORY, 1)
            s.setsockopt(zmq.SNDHWM, self.hwm)
            s.setsockopt(zmq.RCVHWM, self.hwm)
            s.setsockopt(zmq.LINGER, LINGER_MS)
            s.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            curve = self.curve.prepare(s, endpoint)
            s.bind(endpoint)
            if curve:
                self.curve.watch(which, s, endpoint)
            if path is not None:
                os.chmod(path, self.socket_mode)
        except CurveError as e:
            s.close(linger=0)
            raise BindError(endpoint, e.message) from None
        except (zmq.ZMQError, OSError) as e:
            s.close(linger=0)
            if isinstance(e, zmq.ZMQError) and e.errno == errno.EADDRINUSE:
                raise BindError(endpoint, "address in use (another process listens there)") from None
            raise BindError(endpoint, str(e)) from None
        self.socks[which] = s
        self._sync[which] = zmq.Socket.shadow(s.underlying)
        self.endpoints[which] = endpoint
        logger.info("listening on %s%s", endpoint, " (CURVE)" if curve else "")

    # --- sending ---------------------------------------------------------------------------

    def _try(self, which: str, ident: bytes, msg: P.Message) -> Optional[bool]:
        """True sent, False lost for good (peer gone, socket closed, error), None: peer full."""
        sock = self.socks.get(which)
        if sock is None or sock.closed:
            return False
        try:
            frames = P.router_frames(ident, msg)
        except Exception:  # a reply that cannot be encoded is a bug, never a dead loop
            logger.exception("cannot encode %s for %s", msg.TYPE.value, short(ident))
            return False
        try:
            # The synchronous shadow raises at once (zmq.asyncio would hide errors in a future).
            self._sync[which].send_multipart(frames, flags=zmq.DONTWAIT)
            return True
        except zmq.Again:
            return None
        except zmq.ZMQError as e:
            if e.errno == errno.EHOSTUNREACH:
                self.on_peer_gone(ident)
            else:
                self.limited(logging.WARNING, f"send-{which}", "%s: send to %s failed: %s", which, short(ident), e)
            return False
        finally:
            # The shadow send may have processed libzmq's pending commands, and with them the
            # edge on the socket's FD that would wake the pending asyncio recv: without this
            # re-check a session's audio could sit unread until some other peer's traffic.
            if not sock.closed:
                sock.get(zmq.EVENTS)

    def _dropped(self, which: str, ident: bytes, msg: P.Message) -> None:
        self.counters["dropped_hwm"] += 1
        self.limited(logging.WARNING, f"hwm-{which}", "%s: peer %s is not reading (high-water mark): dropped %s",
                     which, short(ident), msg.TYPE.value)

    def send(self, which: str, ident: bytes, msg: P.Message) -> bool:
        """Non-blocking; never raises. False when the message was not sent."""
        ok = self._try(which, ident, msg)
        if ok is None:
            self._dropped(which, ident, msg)
        return bool(ok)

    async def send_wait(self, which: str, ident: bytes, msg: P.Message, timeout: float = SEND_WAIT_SECONDS) -> bool:
        """Send, retrying while the peer is at its high-water mark, up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            ok = self._try(which, ident, msg)
            if ok is not None:
                return ok
            if time.monotonic() >= deadline:
                self._dropped(which, ident, msg)
                return False
            self.counters["send_retries"] += 1
            await asyncio.sleep(delay)
            delay = min(0.1, delay * 2)

    def reply_error(self, which: str, ident: bytes, e: S2SError, request_id: str = "", session_id: str = "",
                    seq: Optional[int] = None, budgeted: bool = False) -> None:
        """An `error` for a request. `budgeted` (malformed messages, which no real client
        sends): only within the peer's error budget. Refusals of well-formed requests (busy,
        no_session, ...) are always answered: one peer may be a bridge serving many users."""
        if not ident:
            return
        if budgeted and not self.budgets.take(ident):
            self.counters["errors_unanswered"] += 1
            return
        self.send(which, ident, P.Error.from_exception(e, request_id, session_id, seq))

    # --- receiving -------------------------------------------------------------------------

    async def receive(self, which: str, allowed: frozenset, handle: Handler) -> None:
        """The receive loop of one socket; ends only when the socket is closed (or cancelled)."""
        sock = self.socks[which]
        handled = 0
        while True:
            try:
                frames, count = await self._recv(which, sock)
            except zmq.ContextTerminated:
                return
            except zmq.ZMQError as e:
                if sock.closed:
                    return
                self.limited(logging.WARNING, f"recv-{which}", "%s: recv failed: %s", which, e)
                await asyncio.sleep(0.01)
                continue
            handled += 1
            if handled % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if count > P.MAX_REQUEST_FRAMES:
                self._too_many_frames(which, frames, count)
                continue
            await self._one(which, allowed, handle, frames)

    async def _recv(self, which: str, sock: zmq.asyncio.Socket) -> Tuple[List[bytes], int]:
        """One message, frame by frame: (its first P.MAX_REQUEST_FRAMES frames, its frame count).
        The frames past the protocol's most are received and dropped, never kept, and the loop
        yields while draining them (pings, other sockets and the watchdog go on)."""
        first = await sock.recv()
        frames: List[bytes] = [first]
        count = 1
        sync = self._sync[which]
        more = bool(sync.get(zmq.RCVMORE))
        while more:
            try:
                # Frame objects (copy=False): about 1 us a frame where recv() and RCVMORE took 3.
                part = sync.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:  # pragma: no cover - a multipart message arrives whole
                break
            count += 1
            more = part.more
            if count <= P.MAX_REQUEST_FRAMES:
                frames.append(part.bytes)
            elif count % DRAIN_YIELD_FRAMES == 0:
                await asyncio.sleep(0)
        return frames, count

    def _too_many_frames(self, which: str, frames: List[bytes], count: int) -> None:
        """Refuse a message by its frame count: one error (within the peer's budget), one log
        line per interval, counted (describe's counters.too_many_frames)."""
        ident = bytes(frames[0])
        self.counters["too_many_frames"] += 1
        self.limited(logging.WARNING, f"frames-{which}", "%s: refused a message of %d frames from %s (at most %d)",
                     which, count, short(ident), P.MAX_REQUEST_FRAMES)
        rid = sid = ""
        if len(frames) > 2:  # the ids, when its header can be read, so the client can match the error
            try:
                hdr = P.parse_header(frames[2:3])
                rid, sid = (str(v) if is_text(v) else "" for v in (hdr.get("request_id"), hdr.get("session_id")))
            except P.ProtocolError as e:
                rid, sid = e.request_id, e.session_id
        err = P.ProtocolError(f"message of {count} frames; a request has at most {P.MAX_REQUEST_FRAMES} "
                              f"(identity, delimiter, header, one binary frame)", ErrorCode.BAD_REQUEST, rid, sid)
        self.reply_error(which, ident, err, rid, sid, budgeted=True)

    async def _one(self, which: str, allowed: frozenset, handle: Handler, frames: List[bytes]) -> None:
        ident = bytes(frames[0]) if frames else b""
        msg: Optional[P.Message] = None
        try:
            ident, body = P.split_router(frames)
            msg = P.decode_request(body)
            if msg.TYPE.value not in allowed:
                raise P.ProtocolError(f"{msg.TYPE.value!r} is not served on the {which} socket",
                                      ErrorCode.UNKNOWN_TYPE, getattr(msg, "request_id", ""),
                                      getattr(msg, "session_id", ""))
            pending = handle(ident, msg)
            if pending is not None:
                await pending
        except P.ProtocolError as e:
            self.counters["protocol_errors"] += 1
            self.limited(logging.INFO, f"bad-{which}", "%s: bad message from %s: %s (%s)", which, short(ident), e,
                         e.code.value)
            self.reply_error(which, ident, e, e.request_id, e.session_id, budgeted=True)
        except S2SError as e:
            if e.code == ErrorCode.BUSY:
                self.counters["busy"] = self.counters.get("busy", 0) + 1
            self.reply_error(which, ident, e, getattr(msg, "request_id", ""), getattr(msg, "session_id", ""),
                             getattr(msg, "seq", None))
        except asyncio.CancelledError:
            raise
        except Exception:  # never let one message end the loop; the client gets a code only
            logger.exception("%s: error handling a message from %s", which, short(ident))
            self.reply_error(which, ident, S2SError("internal error (see daemon log)", ErrorCode.INTERNAL),
                             getattr(msg, "request_id", ""), getattr(msg, "session_id", ""))

    def close(self) -> None:
        self.curve.close()
        for which, s in self.socks.items():
            s.close(linger=LINGER_MS)
            ep = self.endpoints[which]
            if ep.startswith("ipc://"):
                try:
                    os.unlink(ep[len("ipc://"):])
                except OSError:
                    pass
        self.ctx.term()
