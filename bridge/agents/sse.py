"""Server-Sent Events from an agent's HTTP answer: lines with a bounded buffer (`sse_lines`), then
events (`iter_sse`, the HTML spec's parsing). A line or an event's data longer than MAX_SSE_LINE is
an AgentError (bad_reply) at once: an agent that never ends a line cannot grow the bridge."""

from __future__ import annotations

import re
from typing import AsyncIterator, List, Tuple

from bridge.agents.base import AgentError

# Longest SSE line, and longest data of one event, taken from an agent (characters). Past it the
# reply is `bad_reply` at once: a line is buffered until its end, so an agent that never ends
# one would otherwise grow the bridge without bound.
MAX_SSE_LINE = 1 << 20
_LINE_END = re.compile(r"\r\n|\r|\n")


def _too_long(what: str, limit: int) -> AgentError:
    return AgentError("bad_reply", f"the agent sent an event stream {what} longer than {limit} characters")


async def sse_lines(chunks: AsyncIterator[str], limit: int = MAX_SSE_LINE) -> AsyncIterator[str]:
    """Lines (without their ends: CRLF, LF or CR) from text chunks, like httpx's aiter_lines,
    but a line longer than `limit` is an AgentError (bad_reply) as soon as it is."""
    parts: List[str] = []
    size = 0
    after_cr = False
    async for chunk in chunks:
        if after_cr and chunk.startswith("\n"):
            chunk = chunk[1:]  # the LF of a CRLF split across two chunks
        after_cr = chunk.endswith("\r")
        pieces = _LINE_END.split(chunk)
        for piece in pieces[:-1]:
            if size + len(piece) > limit:
                raise _too_long("line", limit)
            parts.append(piece)
            yield "".join(parts)
            parts, size = [], 0
        size += len(pieces[-1])
        if size > limit:
            raise _too_long("line", limit)
        if pieces[-1]:
            parts.append(pieces[-1])
    if parts:
        yield "".join(parts)


async def iter_sse(lines: AsyncIterator[str], limit: int = MAX_SSE_LINE) -> AsyncIterator[Tuple[str, str]]:
    """(event, data) per Server-Sent Event from an iterator of lines (without newlines).

    Follows the HTML spec's parsing: ``field: value`` with one optional space, several
    ``data`` lines joined by newlines, comments (``:``) ignored, the event dispatched at a
    blank line; the default event name is ``message``. An event whose data is longer than
    `limit` is an AgentError (bad_reply).
    """
    event = ""
    data: List[str] = []
    size = 0
    async for line in lines:
        line = line.rstrip("\r")
        if not line:
            if data or event:
                yield (event or "message", "\n".join(data))
            event, data, size = "", [], 0
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            event = value
        elif name == "data":
            size += len(value) + 1
            if size > limit:
                raise _too_long("event", limit)
            data.append(value)
        # id / retry: not needed (no resume)
    if data:
        yield (event or "message", "\n".join(data))
