"""CURVE on the daemon's tcp:// ROUTER sockets (the keys and the rule: daemon/wire/curve.py).

- `prepare(sock, endpoint)` before bind: a tcp:// endpoint serves CURVE with
  `cluster.curve_dir`/server.key_secret when a keys directory is configured; plain tcp:// on a
  non-loopback address is refused unless `cluster.allow_plain_tcp` (then said once, loudly).
- Who may connect: a ZAP authenticator (zmq.auth, one thread per daemon) admits the public
  keys in curve_dir/clients/ (read at start; a new client needs a restart).
- Refused handshakes are seen by a monitor on each CURVE socket (one thread for all) and said in
  the log once per kind per socket (then counted: `curve_refused` in describe's counters): a
  client without CURVE, a client with a wrong server key, a client key not in clients/, a client
  that hung up mid-handshake (libzmq reports about 4 in 10 plain clients this way: the client saw
  the mismatch first and closed).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from daemon.wire.curve import SERVER, CurveError, clients_dir, is_loopback, load_secret

logger = logging.getLogger(__name__)

# One line per kind of refusal per socket in this many seconds ("once" for any real incident).
REFUSAL_LOG_INTERVAL = 600.0
FAILED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
MISMATCH = getattr(zmq, "PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH", 0x11000002)
CRYPTO = getattr(zmq, "PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC", 0x11000001)


def refusal(event: int, value: int, keys_dir: str) -> Tuple[str, str]:
    """(kind, what to say) for a failed handshake's monitor event."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "client_key", (f"a CURVE client whose public key is not in {keys_dir}/clients/ (a wrong or unlisted "
                              "client key; `s2s-ctl keys --client NAME` adds one, then restart the daemon)")
    if value == MISMATCH:
        return "plain", ("a client without CURVE (plain ZeroMQ; give it the keys: cluster.curve_dir with "
                         f"{keys_dir}/server.key and a client keypair)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        # The peer hung up mid-handshake (value is an errno): most often a plain client that saw the
        # mechanism mismatch first and closed, sometimes a port scanner.
        return "hangup", (f"a client that hung up during the CURVE handshake (errno {value}: most often a client "
                          "without CURVE that saw the mismatch first)")
    if value == CRYPTO:
        return "server_key", (f"a CURVE client whose handshake does not decrypt (a wrong server key: it must use "
                               f"{keys_dir}/server.key)")
    return f"protocol-{value:x}", f"a client whose handshake failed (ZMTP error 0x{value:x})"


class ServerCurve:
    """CURVE for one daemon's sockets; `close()` before the context terminates."""

    def __init__(self, ctx: "zmq.Context[Any]", curve_dir: str, allow_plain_tcp: bool, counters: Dict[str, int]):
        self.curve_dir, self.allow_plain_tcp, self.counters = curve_dir, allow_plain_tcp, counters
        # A blocking view of the (asyncio) context: the authenticator and the monitor are threads.
        self._ctx: "zmq.Context[zmq.Socket]" = zmq.Context.shadow(ctx.underlying)
        self._keys: Optional[Tuple[bytes, bytes]] = None
        self._auth: Optional[ThreadAuthenticator] = None
        self._monitors: List[Tuple[str, str, zmq.Socket, zmq.Socket]] = []  # which, endpoint, watched, pair
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._said: Dict[Tuple[str, str], Tuple[float, int]] = {}
        counters.setdefault("curve_refused", 0)

    def prepare(self, sock: zmq.Socket, endpoint: str) -> bool:
        """Before bind. True when `sock` will serve CURVE; CurveError when it may not listen."""
        if not endpoint.startswith("tcp://"):
            return False
        if not self.curve_dir:
            if is_loopback(endpoint):
                return False
            if not self.allow_plain_tcp:
                raise CurveError("plain tcp:// on a non-loopback address is refused: set cluster.curve_dir (keys "
                                 "from `s2s-ctl keys`) or, on a trusted network, cluster.allow_plain_tcp: true")
            logger.warning("endpoint %s is plain tcp:// on a non-loopback address (cluster.allow_plain_tcp): anyone "
                           "who can reach it can use the daemon and read its audio", endpoint)
            return False
        if self._keys is None:
            d = Path(self.curve_dir)
            public, secret = load_secret(d / f"{SERVER}.key_secret")
            allowed = clients_dir(d)
            auth = ThreadAuthenticator(self._ctx, log=logging.getLogger(__name__ + ".zap"))
            auth.start()
            auth.configure_curve(domain="*", location=str(allowed))
            self._auth, self._keys = auth, (public, secret)
            n = len(list(allowed.glob("*.key")))
            logger.info("CURVE: serving with %s/server.key; %d client key(s) admitted from %s", d, n, allowed)
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = self._keys
        return True

    def watch(self, which: str, sock: zmq.Socket, endpoint: str) -> None:
        """After bind: log the refused handshakes of `sock`."""
        addr = f"inproc://s2s-curve-monitor-{which}-{id(sock)}"
        sock.monitor(addr, FAILED)
        pair = self._ctx.socket(zmq.PAIR)
        pair.connect(addr)
        with self._lock:
            self._monitors.append((which, endpoint, sock, pair))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="curve-monitor", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        known: Dict[zmq.Socket, Tuple[str, str]] = {}
        while not self._stop.is_set():
            with self._lock:
                for which, endpoint, _, pair in self._monitors:
                    if pair not in known:
                        known[pair] = (which, endpoint)
                        poller.register(pair, zmq.POLLIN)
            for pair, _ in poller.poll(200):
                try:
                    ev = recv_monitor_message(pair, zmq.NOBLOCK)
                except zmq.ZMQError:
                    continue
                which, endpoint = known[pair]
                self._refused(which, endpoint, int(ev["event"]), int(ev["value"]))
        for pair in known:
            pair.close(linger=0)

    def _refused(self, which: str, endpoint: str, event: int, value: int) -> None:
        self.counters["curve_refused"] = self.counters.get("curve_refused", 0) + 1
        kind, what = refusal(event, value, self.curve_dir)
        now = time.monotonic()
        last, held = self._said.get((which, kind), (-1e18, 0))
        if now - last < REFUSAL_LOG_INTERVAL:
            self._said[(which, kind)] = (last, held + 1)
            return
        self._said[(which, kind)] = (now, 0)
        more = f" ({held} more since the last line)" if held else ""
        logger.warning("%s: refused %s on %s%s", which, what, endpoint, more)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            watched = [m[2] for m in self._monitors]
        for sock in watched:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
        if self._thread is not None:
            self._thread.join(2.0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
