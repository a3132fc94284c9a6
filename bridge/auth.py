"""Who may use the bridge: the token, the Origin check and the per-connection limits.

- Token: `bridge.token`, compared in constant time. It travels in the first `start`/`text`
  message only (never in the URL, where it would land in browser history and proxy logs);
  `/healthz` detail takes it as `Authorization: Bearer`.
- Origin: `bridge.allowed_origins`, or when empty only the page's own origin (an Origin header
  whose host:port equals the Host header) reached by a name that cannot belong to someone else:
  an IP address, localhost, *.localhost, the bind address or this machine's hostname. Any
  other name (DNS rebinding: a foreign domain that resolves to 127.0.0.1, so Origin and Host
  agree) needs allowed_origins. Requests without an Origin header are not a browser's; a
  local process can send any header it likes, so against those only the token protects: the
  bridge refuses to listen beyond loopback without one (`open_to_network_without_token`).
- Limits: connections per IP address (`AddressCap`) and agent turns per minute per
  connection (`TurnRate`).
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import socket
import time
from typing import Callable, Deque, Dict, Optional, Sequence
from urllib.parse import urlsplit


def check_token(expected: str, given: Optional[str]) -> bool:
    """Constant-time token comparison; no token configured = everyone.

    `given` must be encodable (the message validation refuses lone surrogates before this)."""
    if not expected:
        return True
    if not isinstance(given, str):
        return False
    try:
        raw = given.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), raw)


def bearer(header: Optional[str]) -> Optional[str]:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def is_loopback(host: str) -> bool:
    if host in ("localhost", "") or host.endswith(".localhost"):
        return host != ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_to_network_without_token(host: str, token: str) -> bool:
    """True for a configuration that would let anyone on the network use the agent."""
    return not token and not is_loopback(host)


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


def origin_allowed(origin: Optional[str], host: Optional[str], allowed: Sequence[str], bind_host: str) -> bool:
    if origin is None:
        return True  # not a browser: the token is what protects against it
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
            and own_host(host, bind_host))


class AddressCap:
    """Open connections per remote IP address, at most `limit` each."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: Dict[str, int] = {}

    def acquire(self, address: str) -> bool:
        if self.open.get(address, 0) >= self.limit:
            return False
        self.open[address] = self.open.get(address, 0) + 1
        return True

    def release(self, address: str) -> None:
        n = self.open.get(address, 0) - 1
        if n > 0:
            self.open[address] = n
        else:
            self.open.pop(address, None)


class TurnRate:
    """At most `per_minute` turns in any 60 s window (a sliding log: exact, and tiny at these rates)."""

    WINDOW = 60.0

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self._times: Deque[float] = collections.deque()

    def allow(self) -> bool:
        now = self.clock()
        while self._times and now - self._times[0] >= self.WINDOW:
            self._times.popleft()
        if len(self._times) >= self.per_minute:
            return False
        self._times.append(now)
        return True
