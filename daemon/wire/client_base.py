"""What both daemon clients share (daemon/wire/client.py blocking, daemon/wire/client_async.py asyncio):
the error type, ids, the DEALER socket settings, reply decoding and the missing-socket check."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Optional, Sequence

import zmq

from daemon.wire import protocol as P
from daemon.errors import ErrorCode, S2SError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
HWM = 1000


class DaemonError(S2SError):
    """An `error` reply from the daemon, or a client-side timeout (code timeout)."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INTERNAL, request_id: str = "",
                 session_id: str = "", retry_after: Optional[float] = None):
        super().__init__(message, code)
        self.request_id = request_id
        self.session_id = session_id
        self.retry_after = retry_after

    @classmethod
    def from_reply(cls, e: P.Error) -> "DaemonError":
        return cls(e.message or e.code, e.error_code, e.request_id, e.session_id, e.retry_after)


def new_id() -> str:
    return uuid.uuid4().hex


def _socket(ctx: zmq.Context, endpoint: str, identity: bytes) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, identity)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, HWM)
    s.setsockopt(zmq.RCVHWM, HWM)
    s.connect(endpoint)
    return s


def _decode(frames: Sequence[bytes]) -> Optional[P.Message]:
    try:
        return P.decode_reply(P.split_dealer(frames))
    except P.ProtocolError as e:
        logger.warning("ignoring malformed reply from daemon: %s", e)
        return None


def missing_endpoint(endpoint: str) -> Optional[str]:
    """Why nothing can be listening at `endpoint` (an ipc:// socket file that does not exist), or None.

    libzmq connects to a missing ipc path without complaint and waits; this lets a caller say so at once."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not os.path.exists(path):
            return f"no daemon at {endpoint}: the socket file {path} does not exist (is s2s-speechd running?)"
    return None
