"""The socket side both client shells share (daemon/wire/client.py blocking, daemon/wire/client_async.py
asyncio): the DEALER socket settings, the connection monitor's events and the missing-socket
check. What they share without I/O (ids, messages, routing, errors, stream state) is the core,
daemon/wire/client_core.py; its names are re-exported here for existing imports."""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import zmq

from daemon.errors import ErrorCode
from daemon.wire.client_core import DEFAULT_TIMEOUT, HWM, DaemonError, new_id
from daemon.wire.curve import secure_client

__all__ = ["DEFAULT_TIMEOUT", "HWM", "MONITOR_EVENTS", "DaemonError", "Reachability", "endpoint_error",
           "missing_endpoint", "new_id", "send_queue_full"]

# What the connection monitor watches: connected, lost, refused (a killed daemon's stale ipc file).
MONITOR_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CLOSED


def _socket(ctx: Any, endpoint: str, identity: bytes) -> Tuple[Any, Any]:
    """A DEALER socket (blocking or asyncio, as ctx makes them): our identity, LINGER 0, HWMs;
    and its monitor socket (MONITOR_EVENTS), made before the connect so no event is missed."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, identity)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, HWM)
    s.setsockopt(zmq.RCVHWM, HWM)
    try:
        secure_client(s, endpoint)  # CURVE keys on tcp:// (daemon/wire/curve.py)
    except Exception:
        s.close(linger=0)
        raise
    monitor = s.get_monitor_socket(MONITOR_EVENTS)
    s.connect(endpoint)
    return s, monitor


def missing_endpoint(endpoint: str) -> Optional[str]:
    """Why nothing can be listening at `endpoint` (an ipc:// socket file that does not exist), or None.

    libzmq connects to a missing ipc path without complaint and waits; this lets a caller say so at once."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not os.path.exists(path):
            return f"no daemon at {endpoint}: the socket file {path} does not exist (is s2s-speechd running?)"
    return None


def endpoint_error(endpoint: str, msg: Any = None) -> Optional[DaemonError]:
    """DaemonError(unavailable) when nothing can be listening at endpoint (before a send: libzmq
    would queue the message and wait for a daemon that is not there)."""
    why = missing_endpoint(endpoint)
    return None if why is None else DaemonError(why, ErrorCode.UNAVAILABLE, getattr(msg, "request_id", ""))


def send_queue_full(endpoint: str) -> DaemonError:
    return DaemonError(f"daemon at {endpoint} is not reading (send queue full)", ErrorCode.UNAVAILABLE)


class Reachability:
    """What the socket monitor says: `reachable` True once connected, False while ZeroMQ's
    connects fail or after a disconnect, None before either (a stopped daemon stays True).
    `event()` returns True when the connection was lost (the caller ends its requests and streams)."""

    def __init__(self) -> None:
        self.reachable: Optional[bool] = None

    def event(self, ev: int) -> bool:
        if ev == zmq.EVENT_DISCONNECTED:
            self.reachable = False
            return True
        if ev == zmq.EVENT_CONNECTED:
            self.reachable = True
        elif ev in (zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_CLOSED):
            self.reachable = False
        return False
