"""Header field validation for daemon/wire/protocol.py: each field is checked against its dataclass
annotation, and every string must be one UTF-8 can carry (no lone surrogates), so that an id
echoed back in a reply can always be encoded. `ProtocolError` names what was wrong, with the
stable `ErrorCode` and whatever request/session id could be read."""

from __future__ import annotations

import math
from typing import Any, Mapping

from daemon.errors import ErrorCode, S2SError


class ProtocolError(S2SError):
    """A message that cannot be used; `code` says why, ids are filled in when readable."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST,
                 request_id: str = "", session_id: str = ""):
        super().__init__(message, code)
        self.request_id = request_id
        self.session_id = session_id


def is_text(value: Any) -> bool:
    """A str that UTF-8 can carry: JSON's "\\ud800" escapes decode to lone surrogates, which
    cannot be encoded again (an id echoed in a reply would make the reply itself fail)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fail(msg: str, hdr: Mapping[str, Any], code: ErrorCode = ErrorCode.BAD_REQUEST) -> ProtocolError:
    rid = hdr.get("request_id", "")
    sid = hdr.get("session_id", "")
    return ProtocolError(msg, code, rid if is_text(rid) else "", sid if is_text(sid) else "")


def _check(value: Any, tp: Any, name: str, hdr: Mapping[str, Any]) -> Any:
    """Validate one header field against a dataclass annotation string."""
    t = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    t = t.replace("typing.", "")
    optional = t.startswith("Optional[")
    if optional:
        if value is None:
            return None
        t = t[len("Optional["):-1]
    if t == "str":
        if not isinstance(value, str):
            raise _fail(f"field {name!r} must be a string", hdr)
        if not is_text(value):
            raise _fail(f"field {name!r} is not valid Unicode (lone surrogate)", hdr)
        return value
    if t == "bool":
        if not isinstance(value, bool):
            raise _fail(f"field {name!r} must be true or false", hdr)
        return value
    if t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(f"field {name!r} must be an integer", hdr)
        return value
    if t == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _fail(f"field {name!r} must be a finite number", hdr)
        return float(value)
    if t.startswith("Tuple[str"):
        if not isinstance(value, (list, tuple)) or not all(is_text(v) for v in value):
            raise _fail(f"field {name!r} must be a list of strings", hdr)
        return tuple(value)
    if t.startswith("Dict"):
        if not isinstance(value, dict):
            raise _fail(f"field {name!r} must be an object", hdr)
        return value
    raise _fail(f"field {name!r}: unsupported type {t}", hdr)  # pragma: no cover - programming error
