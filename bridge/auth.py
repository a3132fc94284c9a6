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
- Limits: connections per network (`AddressCap`, keyed by `network_key`: an IPv4 address, an
  IPv6 /64, all of loopback as one, so 127.0.0.2-17 or the addresses of one /64 are one
  network), connections waiting to log in (`PendingLogins`, a budget of their own: they never
  count against bridge.max_connections), agent turns per minute per connection (`TurnRate`)
  and the audio a connection may send (`AudioBudget`).
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import socket
import time
from typing import Any, Callable, Deque, Dict, Optional, Sequence
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
    return (parts.scheme in ("http", "https") and host is not None and host != ""
            and parts.netloc.lower() == host.lower() and own_host(host, bind_host))


def network_key(address: str) -> str:
    """What the per-address caps count: an IPv4 address (a mapped one too), an IPv6 /64 (what
    one subscriber gets), "loopback" for every loopback address; anything else as given."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


class AddressCap:
    """Open connections per network (`network_key`), at most `limit` each."""

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


class PendingLogins:
    """Connections that have not sent the token yet: at most `limit` in all and `per_network`
    from one network. One more is always let in; to make room, the longest waiting of its own
    network goes when that network has its share, else (all taken) the longest waiting of the
    network with the most. So connections that never log in only push each other out: a login
    gets a slot and keeps it for as long as the others need to make `per_network` new ones."""

    def __init__(self, limit: int, per_network: int):
        self.limit = limit
        self.per_network = max(1, min(per_network, limit))
        self._by_net: Dict[str, Dict[Any, None]] = {}   # network -> its waiting, oldest first
        self._net: Dict[Any, str] = {}

    def __len__(self) -> int:
        return len(self._net)

    def __contains__(self, conn: Any) -> bool:
        return conn in self._net

    def add(self, network: str, conn: Any) -> Optional[Any]:
        """Count `conn` as waiting; returns the connection to close to make room, or None."""
        mine = self._by_net.get(network)
        victim = None
        if mine is not None and len(mine) >= self.per_network:
            victim = next(iter(mine))
        elif len(self._net) >= self.limit:
            busiest = max(self._by_net, key=lambda net: len(self._by_net[net]))
            victim = next(iter(self._by_net[busiest]))
        if victim is not None:
            self.remove(victim)
        self._by_net.setdefault(network, {})[conn] = None
        self._net[conn] = network
        return victim

    def remove(self, conn: Any) -> bool:
        network = self._net.pop(conn, None)
        if network is None:
            return False
        mine = self._by_net[network]
        del mine[conn]
        if not mine:
            del self._by_net[network]
        return True


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


class AudioBudget:
    """Seconds of audio a connection may send: `burst` ahead of real time, refilled at `speed`
    times real time (a token bucket). A real-time page never runs out; a flood gets its excess
    refused instead of filling the daemon link every connection shares."""

    def __init__(self, burst: float, speed: float, clock: Callable[[], float] = time.monotonic):
        self.burst = burst
        self.speed = speed
        self.clock = clock
        self.left = burst
        self._at = clock()

    def take(self, seconds: float) -> bool:
        """Whether `seconds` of audio fit now (taken from the budget if so)."""
        now = self.clock()
        self.left = min(self.burst, self.left + (now - self._at) * self.speed)
        self._at = now
        if seconds > self.left:
            return False
        self.left -= seconds
        return True
