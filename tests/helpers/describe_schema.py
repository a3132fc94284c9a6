"""Checks a daemon `describe` reply against the one schema (daemon/engines.py) and renders it
with s2s-ctl's pretty-printer, so every describe shape a test meets is walked both ways."""

from __future__ import annotations

from typing import Any, List

from daemon.tools.ctl import _table
from daemon.engines import EngineInfo, Fallback


def mixed_lists(obj: Any, path: str = "$") -> List[str]:
    """Paths of every list in obj whose items are not all of one JSON type."""
    found: List[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += mixed_lists(v, f"{path}.{k}")
    elif isinstance(obj, list):
        kinds = {type(x).__name__ for x in obj}
        if len(kinds) > 1:
            found.append(f"{path}: {sorted(kinds)}")
        for i, v in enumerate(obj):
            found += mixed_lists(v, f"{path}[{i}]")
    return found


def check_describe(info: Any) -> str:
    """Assert the schema; return the s2s-ctl rendering (which must not report an unexpected shape)."""
    assert isinstance(info, dict), type(info)
    assert mixed_lists(info) == [], mixed_lists(info)
    for kind in ("asr", "tts"):
        e = EngineInfo.from_dict(info[kind])
        assert e.kind == kind
        assert e.to_dict() == info[kind]  # nothing lost on the way through the schema
    fallbacks = [Fallback.from_dict(f) for f in info["fallbacks"]]
    assert len({f.key() for f in fallbacks}) == len(fallbacks), "a fallback listed twice"
    for kind in ("asr", "tts"):
        for f in EngineInfo.from_dict(info[kind]).fallbacks:
            assert f.key() in {g.key() for g in fallbacks}, f"{kind} fallback {f} missing from describe()['fallbacks']"
    text = _table(info)
    assert "unexpected" not in text, text
    return text
