"""The s2s wire protocol, shared by the daemon, the client library and the bridge.

A message is a ZeroMQ multipart message: ``[identity, b"", header, *binary]`` on the daemon's
ROUTER socket, ``[b"", header, *binary]`` at a DEALER client. ``header`` is UTF-8 JSON with at
least ``{"v": 1, "type": "..."}`` plus the message's fields; audio never goes inside the JSON:
it travels as the one binary frame after the header (``audio`` both ways).

Each message type is one frozen dataclass with ``encode() -> list[bytes]`` (the frames after
the empty delimiter) and ``decode``; ``decode_request()`` / ``decode_reply()`` pick the class
from the header. ``audio`` from a client is ASR input (session_id, seq, PCM16 16 kHz);
``audio`` from the daemon is TTS output (request_id, seq, sentence, PCM16).
Streamed text: ``synthesize`` with ``stream_text``, then ``text_chunk``s (``final`` on the last);
the daemon speaks each sentence once complete (daemon/tts/jobs.py).

Bad input raises ``ProtocolError`` carrying a stable ``ErrorCode``, plus whatever request and
session id could be read (and can be sent back), so the daemon can answer with ``error``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type

from daemon.errors import ErrorCode, S2SError
from daemon.wire.protocol_fields import ProtocolError, _check, _fail

PROTOCOL_VERSION = 1
# Largest header accepted (bytes of JSON); audio is never in the header.
MAX_HEADER_BYTES = 64 * 1024
# `synthesize.owner`: who the request is for, inside one peer (the bridge: its connection id).
# The daemon's TTS queue is fair across (peer, owner); "" = the peer itself.
MAX_OWNER_CHARS = 64
ASR_SAMPLE_RATE = 16000
# Frames of a request at the daemon's ROUTER: identity, empty delimiter, header, one binary
# frame at most. A message of more is refused by its count while it is received.
MAX_REQUEST_FRAMES = 4

Frames = List[bytes]


class MsgType(str, enum.Enum):
    # client -> daemon, ASR
    OPEN = "open"
    AUDIO = "audio"  # ASR input from a client; TTS output from the daemon
    FINALIZE = "finalize"
    RESET = "reset"
    CLOSE = "close"
    # client -> daemon, TTS
    SYNTHESIZE = "synthesize"
    TEXT_CHUNK = "text_chunk"  # more text for a synthesize with stream_text
    CANCEL = "cancel"
    # client -> daemon, both sockets
    DESCRIBE = "describe"
    PING = "ping"
    # daemon -> client, ASR
    OPENED = "opened"
    SPEECH_START = "speech_start"
    PARTIAL = "partial"
    FINAL = "final"
    TENTATIVE = "tentative"  # the utterance so far, after a short silence (speculative)
    RESUME = "resume"  # speech went on after a tentative: it is withdrawn
    CLOSED = "closed"
    ACK = "ack"
    # daemon -> client, TTS
    DONE = "done"
    CANCELLED = "cancelled"
    # daemon -> client, both
    INFO = "info"
    PONG = "pong"
    ERROR = "error"


@dataclass(frozen=True)
class Message:
    """Base of every message. Subclasses set TYPE and, for audio, HAS_AUDIO."""

    TYPE: ClassVar[MsgType]
    HAS_AUDIO: ClassVar[bool] = False
    # Required header fields (the rest have defaults).
    REQUIRED: ClassVar[Tuple[str, ...]] = ()

    def header(self) -> Dict[str, Any]:
        h: Dict[str, Any] = {"v": PROTOCOL_VERSION, "type": self.TYPE.value}
        for f in dataclasses.fields(self):
            if f.name == "pcm":
                continue
            v = getattr(self, f.name)
            h[f.name] = list(v) if isinstance(v, tuple) else v
        return h

    def encode(self) -> Frames:
        """Frames after the empty delimiter: [header-json] or [header-json, pcm]."""
        hdr = self.header()
        try:
            head = json.dumps(hdr, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate somewhere (decode refuses them, but a reply must never fail to
            # encode): JSON escapes are plain ASCII.
            head = json.dumps(hdr, separators=(",", ":")).encode("ascii")
        frames = [head]
        if self.HAS_AUDIO:
            frames.append(bytes(getattr(self, "pcm")))
        return frames

    @classmethod
    def from_header(cls, hdr: Mapping[str, Any], binary: Sequence[bytes]) -> "Message":
        kwargs: Dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "pcm":
                continue
            if f.name in hdr:
                kwargs[f.name] = _check(hdr[f.name], f.type, f.name, hdr)
            elif f.name in cls.REQUIRED:
                raise _fail(f"{cls.TYPE.value}: missing field {f.name!r}", hdr)
        if cls.HAS_AUDIO:
            if len(binary) != 1:
                raise _fail(f"{cls.TYPE.value}: expected exactly one audio frame, got {len(binary)}", hdr)
            kwargs["pcm"] = bytes(binary[0])
        elif binary:
            raise _fail(f"{cls.TYPE.value}: unexpected binary frame(s)", hdr)
        msg = cls(**kwargs)
        msg.check(hdr)
        return msg

    def check(self, hdr: Mapping[str, Any]) -> None:
        """Checks beyond the field types (a subclass's); raise `_fail(...)`."""

    @classmethod
    def decode(cls, frames: Sequence[bytes]) -> "Message":
        """Decode [header, *binary] (no identity, no delimiter) as this class."""
        hdr = parse_header(frames)
        if hdr["type"] != cls.TYPE.value:
            raise _fail(f"expected {cls.TYPE.value!r}, got {hdr['type']!r}", hdr, ErrorCode.UNKNOWN_TYPE)
        return cls.from_header(hdr, frames[1:])


@dataclass(frozen=True)
class Open(Message):
    """Open an ASR session. hotwords None = the daemon's defaults; () = none."""

    TYPE: ClassVar[MsgType] = MsgType.OPEN
    REQUIRED: ClassVar[Tuple[str, ...]] = ("session_id",)
    session_id: str = ""
    request_id: str = ""
    language: Optional[str] = None
    hotwords: Optional[Tuple[str, ...]] = None
    sample_rate: int = ASR_SAMPLE_RATE
    partials: bool = True
    tentative: bool = False  # tentative/resume events (turn.early_silence)


@dataclass(frozen=True)
class Audio(Message):
    """ASR input: PCM16 LE mono at the session's sample rate. ack=True asks for an `ack`
    once the chunk has been processed (flow control for faster-than-real-time senders)."""

    TYPE: ClassVar[MsgType] = MsgType.AUDIO
    HAS_AUDIO: ClassVar[bool] = True
    REQUIRED: ClassVar[Tuple[str, ...]] = ("session_id",)
    session_id: str = ""
    seq: int = 0
    pcm: bytes = b""
    request_id: str = ""
    ack: bool = False


@dataclass(frozen=True)
class Finalize(Message):
    """Flush: the daemon answers with the remaining events, a last `final` and `closed`."""

    TYPE: ClassVar[MsgType] = MsgType.FINALIZE
    REQUIRED: ClassVar[Tuple[str, ...]] = ("session_id",)
    session_id: str = ""
    request_id: str = ""


@dataclass(frozen=True)
class Reset(Message):
    TYPE: ClassVar[MsgType] = MsgType.RESET
    REQUIRED: ClassVar[Tuple[str, ...]] = ("session_id",)
    session_id: str = ""
    request_id: str = ""


@dataclass(frozen=True)
class Close(Message):
    TYPE: ClassVar[MsgType] = MsgType.CLOSE
    REQUIRED: ClassVar[Tuple[str, ...]] = ("session_id",)
    session_id: str = ""
    request_id: str = ""


@dataclass(frozen=True)
class Synthesize(Message):
    """TTS request. language/speed None = the daemon's configured defaults. owner: who it is
    for inside the peer (at most MAX_OWNER_CHARS; a bridge sends its connection id): the
    daemon serves waiting requests round-robin across (peer, owner).

    stream_text: the text comes in `text_chunk`s (`text` is the first, may be left out). hold
    (stream_text only): nothing past the first sentence until a chunk with `release`."""

    TYPE: ClassVar[MsgType] = MsgType.SYNTHESIZE
    REQUIRED: ClassVar[Tuple[str, ...]] = ("request_id",)
    request_id: str = ""
    text: str = ""
    language: Optional[str] = None
    speed: Optional[float] = None
    stream: bool = True
    owner: str = ""
    stream_text: bool = False
    hold: bool = False

    def check(self, hdr: Mapping[str, Any]) -> None:
        if "text" not in hdr and not self.stream_text:
            raise _fail("synthesize: missing field 'text'", hdr)
        if len(self.owner) > MAX_OWNER_CHARS:
            raise _fail(f"field 'owner' is longer than {MAX_OWNER_CHARS} characters", hdr)
        if self.hold and not self.stream_text:
            raise _fail("field 'hold' needs stream_text", hdr)


@dataclass(frozen=True)
class TextChunk(Message):
    """More text for a `synthesize` with stream_text. final: the request's last text (what is
    left is spoken, then `done`). release: a held request goes on past its first sentence.
    drop_partial: the text after the last complete sentence is dropped before `text` is added
    (a reply that broke off mid-sentence, followed by an apology)."""

    TYPE: ClassVar[MsgType] = MsgType.TEXT_CHUNK
    REQUIRED: ClassVar[Tuple[str, ...]] = ("request_id",)
    request_id: str = ""
    text: str = ""
    final: bool = False
    release: bool = False
    drop_partial: bool = False


@dataclass(frozen=True)
class Cancel(Message):
    TYPE: ClassVar[MsgType] = MsgType.CANCEL
    REQUIRED: ClassVar[Tuple[str, ...]] = ("request_id",)
    request_id: str = ""


@dataclass(frozen=True)
class Describe(Message):
    TYPE: ClassVar[MsgType] = MsgType.DESCRIBE
    request_id: str = ""


@dataclass(frozen=True)
class Ping(Message):
    TYPE: ClassVar[MsgType] = MsgType.PING
    request_id: str = ""


@dataclass(frozen=True)
class Opened(Message):
    TYPE: ClassVar[MsgType] = MsgType.OPENED
    REQUIRED: ClassVar[Tuple[str, ...]] = ("session_id",)
    session_id: str = ""
    request_id: str = ""
    capabilities: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SpeechStart(Message):
    TYPE: ClassVar[MsgType] = MsgType.SPEECH_START
    REQUIRED: ClassVar[Tuple[str, ...]] = ("session_id",)
    session_id: str = ""
    start: float = 0.0
    utterance: int = 0


@dataclass(frozen=True)
class Partial(Message):
    TYPE: ClassVar[MsgType] = MsgType.PARTIAL
    REQUIRED: ClassVar[Tuple[str, ...]] = ("session_id",)
    session_id: str = ""
    text: str = ""
    start: float = 0.0
    end: float = 0.0
    utterance: int = 0


@dataclass(frozen=True)
class Final(Message):
    """reason: vad | max_length | finalize | sentence | turn; request_id: the finalize's, when it caused it."""

    TYPE: ClassVar[MsgType] = MsgType.FINAL
    REQUIRED: ClassVar[Tuple[str, ...]] = ("session_id",)
    session_id: str = ""
    text: str = ""
    start: float = 0.0
    end: float = 0.0
    utterance: int = 0
    reason: str = "vad"
    request_id: str = ""


@dataclass(frozen=True)
class Tentative(Message):
    """Not a final: `resume` withdraws it and the utterance's `final` decides."""

    TYPE: ClassVar[MsgType] = MsgType.TENTATIVE
    REQUIRED: ClassVar[Tuple[str, ...]] = ("session_id",)
    session_id: str = ""
    text: str = ""
    start: float = 0.0
    end: float = 0.0
    utterance: int = 0


@dataclass(frozen=True)
class Resume(Message):
    TYPE: ClassVar[MsgType] = MsgType.RESUME
    REQUIRED: ClassVar[Tuple[str, ...]] = ("session_id",)
    session_id: str = ""
    start: float = 0.0
    utterance: int = 0


@dataclass(frozen=True)
class Closed(Message):
    """reason: finalized | closed | idle | peer_gone | shutdown | error; the client library
    adds daemon_gone for streams whose connection to the daemon was lost."""

    TYPE: ClassVar[MsgType] = MsgType.CLOSED
    REQUIRED: ClassVar[Tuple[str, ...]] = ("session_id",)
    session_id: str = ""
    request_id: str = ""
    reason: str = "closed"


@dataclass(frozen=True)
class Ack(Message):
    """Answer to `reset` (of="reset") and to `audio` sent with ack=true (of="audio", seq)."""

    TYPE: ClassVar[MsgType] = MsgType.ACK
    session_id: str = ""
    request_id: str = ""
    of: str = ""
    seq: int = 0


@dataclass(frozen=True)
class SynthAudio(Message):
    """TTS output chunk: PCM16 LE mono at sample_rate; sentence = index in the text."""

    TYPE: ClassVar[MsgType] = MsgType.AUDIO
    HAS_AUDIO: ClassVar[bool] = True
    REQUIRED: ClassVar[Tuple[str, ...]] = ("request_id",)
    request_id: str = ""
    seq: int = 0
    sentence: int = 0
    text: str = ""
    sample_rate: int = 24000
    pcm: bytes = b""


@dataclass(frozen=True)
class Done(Message):
    TYPE: ClassVar[MsgType] = MsgType.DONE
    REQUIRED: ClassVar[Tuple[str, ...]] = ("request_id",)
    request_id: str = ""
    chunks: int = 0
    sentences: int = 0
    duration: float = 0.0


@dataclass(frozen=True)
class Cancelled(Message):
    TYPE: ClassVar[MsgType] = MsgType.CANCELLED
    REQUIRED: ClassVar[Tuple[str, ...]] = ("request_id",)
    request_id: str = ""


@dataclass(frozen=True)
class Info(Message):
    TYPE: ClassVar[MsgType] = MsgType.INFO
    request_id: str = ""
    info: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pong(Message):
    TYPE: ClassVar[MsgType] = MsgType.PONG
    request_id: str = ""
    time: float = 0.0


@dataclass(frozen=True)
class Error(Message):
    """code: an ErrorCode value; retry_after (seconds) only with busy and shutting_down."""

    TYPE: ClassVar[MsgType] = MsgType.ERROR
    REQUIRED: ClassVar[Tuple[str, ...]] = ("code",)
    code: str = ErrorCode.INTERNAL.value
    message: str = ""
    request_id: str = ""
    session_id: str = ""
    seq: Optional[int] = None
    retry_after: Optional[float] = None

    @classmethod
    def from_exception(cls, e: BaseException, request_id: str = "", session_id: str = "",
                       seq: Optional[int] = None) -> "Error":
        """Client-safe error: code + one line; never a traceback."""
        if isinstance(e, S2SError):
            retry = e.extra.get("retry_after") if isinstance(e.extra, dict) else None
            return cls(code=e.code.value, message=str(e.message)[:500], request_id=request_id,
                       session_id=session_id, seq=seq,
                       retry_after=float(retry) if isinstance(retry, (int, float)) else None)
        return cls(code=ErrorCode.INTERNAL.value, message="internal error (see daemon log)",
                   request_id=request_id, session_id=session_id, seq=seq)

    @property
    def error_code(self) -> ErrorCode:
        try:
            return ErrorCode(self.code)
        except ValueError:
            return ErrorCode.INTERNAL


REQUESTS: Dict[str, Type[Message]] = {c.TYPE.value: c for c in (
    Open, Audio, Finalize, Reset, Close, Synthesize, TextChunk, Cancel, Describe, Ping)}
REPLIES: Dict[str, Type[Message]] = {c.TYPE.value: c for c in (
    Opened, SpeechStart, Partial, Final, Tentative, Resume, Closed, Ack, SynthAudio, Done, Cancelled, Info, Pong, Error)}
# Requests each socket serves.
ASR_REQUESTS = frozenset({"open", "audio", "finalize", "reset", "close", "describe", "ping"})
TTS_REQUESTS = frozenset({"synthesize", "text_chunk", "cancel", "describe", "ping"})



def parse_header(frames: Sequence[bytes]) -> Dict[str, Any]:
    """Header JSON of [header, *binary]: checks size, JSON, version and that type is a string."""
    if not frames:
        raise ProtocolError("empty message: expected a header frame")
    raw = frames[0]
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        hdr = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        # RecursionError: deeply nested arrays/objects (a few KB of "[[[[..." is enough).
        raise ProtocolError("header is not UTF-8 JSON") from None
    if not isinstance(hdr, dict):
        raise ProtocolError("header must be a JSON object")
    v = hdr.get("v")
    if v != PROTOCOL_VERSION or isinstance(v, bool):
        raise _fail(f"unsupported protocol version {v!r} (this daemon speaks {PROTOCOL_VERSION})", hdr,
                    ErrorCode.BAD_VERSION)
    if not isinstance(hdr.get("type"), str):
        raise _fail("header has no message type", hdr)
    return hdr


def _decode(frames: Sequence[bytes], table: Mapping[str, Type[Message]]) -> Message:
    hdr = parse_header(frames)
    cls = table.get(hdr["type"])
    if cls is None:
        raise _fail(f"unknown message type {hdr['type'][:40]!r}", hdr, ErrorCode.UNKNOWN_TYPE)
    return cls.from_header(hdr, frames[1:])


def decode_request(frames: Sequence[bytes]) -> Message:
    """Client -> daemon message from [header, *binary]."""
    return _decode(frames, REQUESTS)


def decode_reply(frames: Sequence[bytes]) -> Message:
    """Daemon -> client message from [header, *binary]."""
    return _decode(frames, REPLIES)


def split_router(frames: Sequence[bytes]) -> Tuple[bytes, List[bytes]]:
    """ROUTER input [identity, b"", header, *binary] -> (identity, [header, *binary])."""
    if len(frames) < 3:
        raise ProtocolError(f"expected [identity, empty, header, ...], got {len(frames)} frame(s)")
    if frames[1] != b"":
        raise ProtocolError("missing empty delimiter frame after the identity")
    return bytes(frames[0]), [bytes(f) for f in frames[2:]]


def split_dealer(frames: Sequence[bytes]) -> List[bytes]:
    """DEALER input [b"", header, *binary] -> [header, *binary]."""
    if len(frames) < 2 or frames[0] != b"":
        raise ProtocolError("expected [empty, header, ...]")
    return [bytes(f) for f in frames[1:]]


def router_frames(identity: bytes, msg: Message) -> Frames:
    return [identity, b""] + msg.encode()


def dealer_frames(msg: Message) -> Frames:
    return [b""] + msg.encode()
