"""The client library's sans-I/O core: what the blocking shell (daemon/wire/client.py) and the
asyncio shell (daemon/wire/client_async.py) share, with no socket, no task and no clock of its
own (the websockets library's shape: one protocol core, thin I/O shells around it).

`ClientCore` is one connection's state:
- it builds the messages a client sends, each with a fresh request id and checked by the
  protocol's own field rules before it leaves (a bad argument is a `DaemonError(bad_request)`
  at the caller, not an `error` reply a round trip later);
- `receive(frames)` decodes what the socket read and routes it: the reply a request waits for
  (`expect`/`answered`/`reply`), an event of an attached stream (`attach`/`events`/`detach`),
  or neither (kept in `unclaimed`, bounded, for the blocking shell's raw `recv`; dropped by the
  asyncio shell, and always when it is a late reply of a request or stream that ended). An `opened` for an `open` the caller gave up on puts a
  `close` in `outgoing()`: nobody would ever close that session;
- errors become `DaemonError`: an `error` reply, a timeout (`timeout_error`), a lost
  connection (`connection_lost`: waiting requests fail `unavailable`, every attached stream
  gets an `error` then `closed` with reason "daemon_gone"), a closed client (`fail_requests`);
- stream state: `ASRStreamState` (seq, closed) and `SynthStreamState` (ended, released,
  finished), which the shells' stream classes extend with their waiting.

A shell only moves frames and waits: it sends `frames(msg)`, hands what its socket reads to
`receive()`, sends what `outgoing()` returns, and waits (a blocking poll, or an asyncio event
per key woken by `receive`) until `answered(rid)` or `has_events(key)`.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Sequence, Set, Tuple, Type

from daemon.errors import ErrorCode, S2SError
from daemon.wire import protocol as P

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
# Socket high-water marks; also how many unclaimed replies the blocking shell keeps for `recv`.
HWM = 1000
# Request ids and stream keys that ended, remembered so their late replies are dropped quietly.
RETIRED_KEYS = 4096

# What answers each request (an `error` with its request id always does).
REPLY_TYPES: Dict[Type[P.Message], Tuple[Type[P.Message], ...]] = {
    P.Open: (P.Opened,), P.Ping: (P.Pong,), P.Describe: (P.Info,), P.Reset: (P.Ack,), P.Cancel: (P.Cancelled,),
}
# Errors that end the wait for a stream's `closed` (there is no session to close).
NO_SESSION_CODES = (ErrorCode.NO_SESSION.value, ErrorCode.NOT_OWNER.value)


class DaemonError(S2SError):
    """An `error` reply from the daemon, or a client-side timeout (code timeout) or lost
    connection (code unavailable)."""

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


def checked(msg: P.Message) -> P.Message:
    """msg, if the daemon's decoder would accept its fields (the protocol's own rules); else
    DaemonError(bad_request). Audio is not re-read (its header has nothing a caller chose)."""
    if not msg.HAS_AUDIO:
        try:
            type(msg).from_header(msg.header(), ())
        except S2SError as e:
            raise DaemonError(e.message, ErrorCode.BAD_REQUEST, getattr(msg, "request_id", ""),
                              getattr(msg, "session_id", "")) from None
    return msg


def route_key(m: P.Message) -> str:
    """The stream a reply belongs to: an ASR session's id, or a synthesis request's id."""
    sid = getattr(m, "session_id", "")
    rid = getattr(m, "request_id", "")
    if isinstance(m, (P.SynthAudio, P.Done, P.Cancelled)) or (isinstance(m, P.Error) and not sid):
        return rid
    return sid or rid


@dataclass
class _Request:
    msg: P.Message
    reply_types: Tuple[Type[P.Message], ...]
    reply: Optional[P.Message] = None
    error: Optional[DaemonError] = None


class ClientCore:
    """One connection's requests, streams and routing; see the module docstring."""

    def __init__(self, endpoint: str, identity: Optional[bytes] = None, keep_unclaimed: bool = True):
        self.endpoint = endpoint
        # The blocking shell's raw `recv` reads what nobody claims; the asyncio shell has no
        # such reader and drops it (kept, it would only fill memory).
        self.keep_unclaimed = keep_unclaimed
        self.identity = identity or f"s2s-{new_id()}".encode()
        self._requests: Dict[str, _Request] = {}
        self._streams: Dict[str, Deque[P.Message]] = {}
        self._retired: "OrderedDict[str, None]" = OrderedDict()
        self._abandoned_opens: "OrderedDict[str, None]" = OrderedDict()
        self._outbox: List[P.Message] = []
        # Replies nobody claimed (no request waits, no stream is attached), oldest first.
        self.unclaimed: Deque[P.Message] = deque(maxlen=HWM)

    # --- frames ----------------------------------------------------------------------------

    @staticmethod
    def frames(msg: P.Message) -> List[bytes]:
        return P.dealer_frames(msg)

    def receive(self, frames: Sequence[bytes]) -> Set[str]:
        """Route one reply read from the socket; the keys (request ids, stream keys) it woke."""
        try:
            m = P.decode_reply(P.split_dealer(frames))
        except P.ProtocolError as e:
            logger.warning("ignoring malformed reply from daemon: %s", e)
            return set()
        return self.deliver(m)

    def deliver(self, m: P.Message) -> Set[str]:
        rid = getattr(m, "request_id", "")
        req = self._requests.get(rid) if rid else None
        if req is not None and req.reply is None and req.error is None and isinstance(m, req.reply_types + (P.Error,)):
            req.reply = m
            inbox = self._streams.get(rid)
            if inbox is not None:  # a cancel's answer also ends the synthesis it cancelled
                inbox.append(m)
            return {rid}
        key = route_key(m)
        inbox = self._streams.get(key)
        if inbox is not None:
            inbox.append(m)
            return {key}
        if isinstance(m, P.Opened) and rid in self._abandoned_opens:
            logger.info("closing session %s: opened after nobody waits for it", m.session_id)
            self._abandoned_opens.pop(rid, None)
            self._outbox.append(P.Close(session_id=m.session_id, request_id=new_id()))
        elif key in self._retired or rid in self._retired or not self.keep_unclaimed:
            logger.debug("dropping %s for %r: nobody waits for it", m.TYPE.value, key)
        else:
            self.unclaimed.append(m)
        return set()

    def outgoing(self) -> List[P.Message]:
        """Messages the core wants sent (closes of abandoned sessions); the shell sends them."""
        out, self._outbox = self._outbox, []
        return out

    def _retire(self, key: str, into: "Optional[OrderedDict[str, None]]" = None) -> None:
        d = self._retired if into is None else into
        d[key] = None
        d.move_to_end(key)
        while len(d) > RETIRED_KEYS:
            d.popitem(last=False)

    # --- requests --------------------------------------------------------------------------

    def expect(self, msg: P.Message, reply_types: Optional[Tuple[Type[P.Message], ...]] = None) -> str:
        """Wait for the reply to msg (reply_types, or the REPLY_TYPES default): its request id."""
        rid = getattr(msg, "request_id", "")
        if not rid:
            raise DaemonError(f"{msg.TYPE.value} needs a request id to be answered", ErrorCode.BAD_REQUEST)
        types = reply_types if reply_types is not None else REPLY_TYPES.get(type(msg), (P.Message,))
        self._requests[rid] = _Request(msg, tuple(types))
        return rid

    def answered(self, rid: str) -> bool:
        req = self._requests.get(rid)
        return req is None or req.reply is not None or req.error is not None

    def reply(self, rid: str) -> P.Message:
        """The answer to request rid; DaemonError for an `error` reply or a failed connection."""
        req = self._requests.get(rid)
        if req is None:
            raise DaemonError(f"no request {rid!r} is waiting", ErrorCode.INTERNAL, rid)
        if req.error is not None:
            raise req.error
        if isinstance(req.reply, P.Error):
            raise DaemonError.from_reply(req.reply)
        if req.reply is None:
            raise DaemonError(f"request {rid!r} has no answer yet", ErrorCode.INTERNAL, rid)
        return req.reply

    def forget(self, rid: str) -> None:
        """The caller stopped waiting (answered or not); a late answer is dropped, a late
        `opened` closed."""
        req = self._requests.pop(rid, None)
        if req is not None and req.reply is None:
            self._retire(rid)
            if isinstance(req.msg, P.Open):
                self._retire(rid, self._abandoned_opens)

    def timeout_error(self, msg: P.Message, timeout: float) -> DaemonError:
        return DaemonError(f"no reply to {msg.TYPE.value} within {timeout:g} s", ErrorCode.TIMEOUT,
                           getattr(msg, "request_id", ""), getattr(msg, "session_id", ""))

    def fail_requests(self, why: str, code: ErrorCode = ErrorCode.UNAVAILABLE) -> Set[str]:
        """Every waiting request fails with why (the client closed, its socket was replaced)."""
        woken = set()
        for rid, req in self._requests.items():
            if req.reply is None and req.error is None:
                req.error = DaemonError(why, code, rid)
                woken.add(rid)
        return woken

    def connection_lost(self) -> Set[str]:
        """The daemon went away: waiting requests fail, attached streams end (their sessions
        died with the daemon: an `error` unavailable, then `closed` "daemon_gone")."""
        why = f"lost the connection to the speech daemon at {self.endpoint}"
        logger.warning("%s (%d request(s) waiting, %d stream(s) open)", why, len(self._requests), len(self._streams))
        woken = self.fail_requests(why)
        for key, inbox in self._streams.items():
            inbox.append(P.Error(code=ErrorCode.UNAVAILABLE.value, message=why, request_id=key, session_id=key))
            inbox.append(P.Closed(session_id=key, reason="daemon_gone"))
            woken.add(key)
        return woken

    # --- streams ---------------------------------------------------------------------------

    def attach(self, key: str) -> None:
        """Route replies for key (a session id, a synthesis request id) to its stream."""
        self._streams.setdefault(key, deque())
        self._retired.pop(key, None)

    def detach(self, key: str) -> None:
        """Stop routing key's replies (its late ones are dropped); what was queued is discarded."""
        if self._streams.pop(key, None) is not None:
            self._retire(key)

    def attached(self, key: str) -> bool:
        return key in self._streams

    def has_events(self, key: str) -> bool:
        return bool(self._streams.get(key))

    def next_event(self, key: str) -> Optional[P.Message]:
        inbox = self._streams.get(key)
        return inbox.popleft() if inbox else None

    def events(self, key: str) -> List[P.Message]:
        inbox = self._streams.get(key)
        if not inbox:
            return []
        out = list(inbox)
        inbox.clear()
        return out

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    # --- messages ----------------------------------------------------------------------------

    def open(self, session_id: Optional[str] = None, language: Optional[str] = None,
             hotwords: Optional[Sequence[str]] = None, sample_rate: int = P.ASR_SAMPLE_RATE, partials: bool = True,
             tentative: bool = False) -> P.Open:
        """An `open` (hotwords None: the daemon's defaults; (): none); its session is attached."""
        if isinstance(hotwords, str):
            raise DaemonError("hotwords must be a list of strings, not one string", ErrorCode.BAD_REQUEST)
        msg = checked(P.Open(session_id=session_id or new_id(), request_id=new_id(), language=language,
                             hotwords=tuple(hotwords) if hotwords is not None else None, sample_rate=sample_rate,
                             partials=partials, tentative=tentative))
        assert isinstance(msg, P.Open)
        self.attach(msg.session_id)
        return msg

    def synthesize(self, text: str = "", language: Optional[str] = None, speed: Optional[float] = None,
                   stream: bool = True, request_id: Optional[str] = None, owner: str = "",
                   stream_text: bool = False, hold: bool = False) -> P.Synthesize:
        """A `synthesize`; its request id is attached as a stream."""
        msg = checked(P.Synthesize(request_id=request_id or new_id(), text=text, language=language, speed=speed,
                                   stream=stream, owner=owner, stream_text=stream_text, hold=hold))
        assert isinstance(msg, P.Synthesize)
        self.attach(msg.request_id)
        return msg


class ASRStreamState:
    """One open ASR session: its id, the daemon's capabilities, the next audio seq, closed; it
    stops being routed (detached from the core) once closed."""

    def __init__(self, core: ClientCore, session_id: str, capabilities: Dict[str, Any]):
        self.core = core
        self.session_id = session_id
        self.capabilities = capabilities
        self.seq = 0
        self.closed = False

    @property
    def max_chunk_bytes(self) -> Optional[int]:
        """The largest audio message the daemon takes for this session: its `opened`'s
        max_chunk_seconds (limits.max_chunk_seconds) at the session's sample rate, in whole PCM16
        samples (at least one); None when the daemon does not say."""
        seconds, rate = self.capabilities.get("max_chunk_seconds"), self.capabilities.get("sample_rate")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            return None
        rate = rate if isinstance(rate, int) and not isinstance(rate, bool) and rate > 0 else P.ASR_SAMPLE_RATE
        return max(2, int(seconds * rate) * 2)

    def audio(self, pcm: bytes, ack: bool = False) -> P.Audio:
        """The next chunk (PCM16); `sent()` once it is on its way."""
        return P.Audio(session_id=self.session_id, seq=self.seq, pcm=bytes(pcm), ack=ack)

    def sent(self) -> int:
        seq, self.seq = self.seq, self.seq + 1
        return seq

    def finalize_msg(self) -> P.Finalize:
        return P.Finalize(session_id=self.session_id, request_id=new_id())

    def reset_msg(self) -> P.Reset:
        return P.Reset(session_id=self.session_id, request_id=new_id())

    def close_msg(self) -> P.Close:
        return P.Close(session_id=self.session_id, request_id=new_id())

    def seen(self, m: P.Message) -> P.Message:
        """Note an event read from the session (closed: nothing more comes)."""
        if isinstance(m, P.Closed):
            self.closed = True
            self.core.detach(self.session_id)
        return m

    def detach(self) -> None:
        """Nobody reads this stream any more: its events are dropped (the session stays open)."""
        self.core.detach(self.session_id)

    def abandon_msg(self) -> Optional[P.Close]:
        """Detach; the `close` to send without waiting, unless the session closed already."""
        self.detach()
        if self.closed:
            return None
        self.closed = True
        return self.close_msg()

    def closing(self, m: P.Message) -> bool:
        """While waiting for `closed`: True at it; DaemonError when there is no session to close."""
        if isinstance(m, P.Error) and m.code in NO_SESSION_CODES:
            raise DaemonError.from_reply(m)
        return isinstance(m, P.Closed)

    def close_timeout(self) -> DaemonError:
        return DaemonError("session did not close in time", ErrorCode.TIMEOUT, session_id=self.session_id)


class SynthStreamState:
    """One synthesis request: text sent so far (ended, released) and whether it finished
    (done, cancelled or an error seen: then it is detached from the core)."""

    def __init__(self, core: ClientCore, request_id: str, timeout: float, ended: bool = False):
        self.core = core
        self.request_id = request_id
        self.timeout = timeout
        self.ended = ended
        self.released = False
        self.finished = False

    def text(self, text: str, final: bool = False, release: bool = False, drop_partial: bool = False) -> P.TextChunk:
        if self.ended:
            raise DaemonError("the text has ended", ErrorCode.BAD_REQUEST, self.request_id)
        self.ended = self.ended or final
        self.released = self.released or release
        return P.TextChunk(request_id=self.request_id, text=text, final=final, release=release,
                           drop_partial=drop_partial)

    def release_msg(self) -> Optional[P.TextChunk]:
        if self.released or self.finished:
            return None
        self.released = True
        return P.TextChunk(request_id=self.request_id, release=True)

    def cancel_msg(self) -> Optional[P.Cancel]:
        return None if self.finished else P.Cancel(request_id=self.request_id)

    def wait_limit(self) -> Optional[float]:
        """How long to wait for the next chunk: `timeout` once the text has ended; before, none
        (the text may pause; the daemon ends an idle request after limits.text_idle_timeout)."""
        return self.timeout if self.ended else None

    def take(self, m: P.Message) -> Optional[P.SynthAudio]:
        """A message of this request: its audio, None (done, cancelled: finished), DaemonError."""
        if isinstance(m, (P.Error, P.Done, P.Cancelled)):
            self.finished = True
            self.core.detach(self.request_id)
            if isinstance(m, P.Error):
                raise DaemonError.from_reply(m)
            return None
        return m if isinstance(m, P.SynthAudio) else None

    def next_chunk(self) -> Optional[P.SynthAudio]:
        """The next message received for this request, as `take` says (None: nothing yet, or no audio)."""
        m = self.core.next_event(self.request_id)
        return None if m is None else self.take(m)

    def has_news(self) -> bool:
        return self.core.has_events(self.request_id)

    def timeout_error(self) -> DaemonError:
        return DaemonError(f"no audio within {self.timeout:g} s", ErrorCode.TIMEOUT, self.request_id)

    def left_msg(self) -> Optional[P.Cancel]:
        """The reader left (break, an exception, a timeout): detach, and the `cancel` to send
        unless it had finished (the daemon stops synthesising; late chunks are dropped)."""
        self.core.detach(self.request_id)
        if self.finished:
            return None
        self.finished = True
        return P.Cancel(request_id=self.request_id)
