"""Stable error codes shared by engines, daemon, client and bridge.

Clients see `code` + a one-line human `message`; tracebacks stay in the server log.
"""

from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    BAD_REQUEST = "bad_request"          # malformed message: frames, JSON, fields
    BAD_VERSION = "bad_version"          # unknown protocol version
    UNKNOWN_TYPE = "unknown_type"        # unknown message type
    BAD_AUDIO = "bad_audio"              # odd-length PCM16, NaN, wrong rate, too long a chunk
    BAD_TEXT = "bad_text"                # empty / unspeakable / too long text
    NO_SESSION = "no_session"            # audio/finalize/close for a session that is not open
    NOT_OWNER = "not_owner"              # session opened by another peer
    SESSION_EXISTS = "session_exists"    # open with an id already in use
    BUSY = "busy"                        # at capacity; retry later (retry_after seconds)
    UNSUPPORTED = "unsupported"          # e.g. hotwords with a model that cannot use them
    TIMEOUT = "timeout"                  # request or session idle timeout
    CANCELLED = "cancelled"
    ENGINE_ERROR = "engine_error"        # inference failed (after any CPU fallback)
    UNAVAILABLE = "unavailable"          # daemon/engine not reachable or not loaded
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


class S2SError(Exception):
    """An error with a stable code; `str()` is the human message."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: "ErrorCode | None" = None, **extra):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.extra = extra

    def to_dict(self) -> dict:
        d = {"code": self.code.value, "message": self.message}
        d.update(self.extra)
        return d


class AudioError(S2SError):
    code = ErrorCode.BAD_AUDIO


class TextError(S2SError):
    code = ErrorCode.BAD_TEXT


class UnsupportedError(S2SError):
    code = ErrorCode.UNSUPPORTED


class BusyError(S2SError):
    code = ErrorCode.BUSY


class EngineError(S2SError):
    code = ErrorCode.ENGINE_ERROR


class ModelMissingError(S2SError):
    """A configured model directory is absent or incomplete."""

    code = ErrorCode.UNAVAILABLE
