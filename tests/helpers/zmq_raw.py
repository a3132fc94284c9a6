"""Raw DEALER sockets for tests that send what a well-behaved client never would."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence

import zmq

from daemon.wire import protocol as P


def raw(ctx: zmq.Context, endpoint: str, rcvhwm: Optional[int] = None) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, uuid.uuid4().hex.encode())
    if rcvhwm is not None:
        s.setsockopt(zmq.RCVHWM, rcvhwm)
    s.connect(endpoint)
    return s


def recv_reply(sock: zmq.Socket, timeout: float = 5.0) -> P.Message:
    assert sock.poll(int(timeout * 1000)), "no reply"
    return P.decode_reply(P.split_dealer(sock.recv_multipart()))


def send_json(sock: zmq.Socket, header: str, *binary: bytes) -> None:
    """Send a header given as JSON text (so it can hold escapes such as a lone "\\ud800")."""
    sock.send_multipart([b"", header.encode("ascii")] + list(binary))


def ping(sock: zmq.Socket, timeout: float = 3.0) -> P.Message:
    """A round trip on this very socket: skips unrelated replies, returns the pong."""
    rid = uuid.uuid4().hex
    sock.send_multipart([b""] + P.Ping(request_id=rid).encode())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sock.poll(int(max(0.0, deadline - time.monotonic()) * 1000)):
            break
        m = P.decode_reply(P.split_dealer(sock.recv_multipart()))
        if isinstance(m, P.Pong) and m.request_id == rid:
            return m
    raise AssertionError("no pong on this socket")


def drain(sock: zmq.Socket, quiet: float = 0.3) -> List[P.Message]:
    out: List[P.Message] = []
    while sock.poll(int(quiet * 1000)):
        out.append(P.decode_reply(P.split_dealer(sock.recv_multipart())))
    return out


def gaps(times: Sequence[float], start: float, end: float) -> float:
    """Longest stretch in [start, end] without an event."""
    pts = [start] + [t for t in times if start <= t <= end] + [end]
    return max(b - a for a, b in zip(pts, pts[1:]))


def header(**fields: Any) -> str:
    d: Dict[str, Any] = {"v": 1}
    d.update(fields)
    return json.dumps(d)
