"""Agent clients: what answers the user, behind one small interface.

    agent = build_agent(cfg.agent)            # or build_agent(cfg.agent, kind="echo")
    conv = agent.conversation()               # one per browser connection
    async for delta in conv.reply("你好"):     # text deltas as the agent writes them
        ...
    await conv.aclose(); await agent.aclose()

Kinds:
- ``langgraph``: the LangGraph server API. ``POST /threads`` once per conversation, then
  ``POST /threads/{id}/runs/stream`` per user message, reading the SSE stream in
  ``messages-tuple`` mode (``event: messages``, data ``[message_chunk, metadata]``); the
  legacy ``messages`` mode (``messages/partial`` with cumulative content,
  ``messages/complete``) is understood too. The server keeps the history in its thread.
- ``openai``: any OpenAI-compatible ``/v1/chat/completions`` with ``stream: true`` (SSE
  ``data: {"choices":[{"delta":{"content":...}}]}`` ... ``data: [DONE]``); the history is
  kept here, per conversation.
- ``echo``: built in; answers with what it heard. Used when the configured agent does not
  answer (scripts/start-s2s.sh, agent.fallback_echo).

Every failure is an `AgentError` with a stable code (``timeout``, ``unavailable``,
``agent_error``, ``bad_reply``, ``empty_reply``) and a one-line message safe to show a user.
`agent.timeout` bounds the wait for the first token and between tokens, `stream_reply`'s
`total` (bridge.reply_timeout) the whole reply. An answer that is not an event stream (a
plain JSON body, an HTML error page) is ``bad_reply``, never an empty reply; so is an SSE
line or event longer than MAX_SSE_LINE (the line buffer is bounded). Cancelling the
consumer (barge-in, the reply cap) closes the HTTP stream, so the agent server sees the
disconnect (a LangGraph run is asked with ``on_disconnect: cancel``: the server stops it).
`Conversation.discard()` forgets the last reply when it was speculative and never shown (a
LangGraph run is cancelled with rollback through the server's API, or deleted with its
checkpoints when it is no longer running; an OpenAI-style history drops the exchange).
`AgentLimits` carries the bridge's caps: ``max_tokens`` for OpenAI-compatible requests, and the
characters of a reply kept in the conversation's history.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from daemon.config import AgentConfig

logger = logging.getLogger(__name__)

KINDS = ("langgraph", "openai", "echo")


@dataclass(frozen=True)
class AgentLimits:
    max_tokens: int = 1024          # sent as `max_tokens` to OpenAI-compatible agents
    max_reply_chars: int = 4000     # of a reply kept in history (the bridge cuts the stream there too)


class AgentError(Exception):
    """The agent failed; `code` is stable, the message is one line safe to show a user."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# --- SSE ----------------------------------------------------------------------------------


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


def _content_text(content: Any) -> str:
    """Text of a LangChain message content: a string or a list of content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and block.get("type") in ("text", "text_delta", None):
                t = block.get("text")
                if isinstance(t, str):
                    parts.append(t)
        return "".join(parts)
    return ""


_AI_TYPES = ("AIMessageChunk", "ai", "AIMessage", "assistant")


class LangGraphStreamParser:
    """Turns LangGraph run-stream SSE events into text deltas of the assistant's messages.

    Handles ``messages`` / ``messages|<namespace>`` (messages-tuple mode: data is
    ``[chunk, metadata]``; chunk content is a delta, except a complete ``ai`` message,
    which is reduced to what was not streamed yet), ``messages/partial`` and
    ``messages/complete`` (legacy mode: data is a list of messages with cumulative
    content), ``error`` (raises AgentError) and ignores everything else (``metadata``,
    ``values``, ``updates``, ``end``, heartbeats).
    """

    def __init__(self) -> None:
        # message id -> text already emitted for it
        self._seen: Dict[str, str] = {}
        self.ended = False

    def _emit_full(self, mid: str, text: str) -> str:
        """Delta for a message whose whole text so far is `text`."""
        prev = self._seen.get(mid, "")
        if text.startswith(prev):
            self._seen[mid] = text
            return text[len(prev):]
        # Content rewritten (rare): say nothing more rather than repeat.
        self._seen[mid] = text
        return ""

    def feed(self, event: str, data: str) -> str:
        if event == "error":
            msg = "the agent reported an error"
            try:
                d = json.loads(data)
                if isinstance(d, dict):
                    msg = str(d.get("message") or d.get("error") or msg)
            except ValueError:
                pass
            raise AgentError("agent_error", msg[:200])
        if event == "end":
            self.ended = True
            return ""
        base = event.split("|", 1)[0]
        if base not in ("messages", "messages/partial", "messages/complete"):
            return ""
        try:
            payload = json.loads(data)
        except ValueError:
            raise AgentError("bad_reply", "the agent sent an unreadable message") from None
        out: List[str] = []
        if base == "messages":
            if not isinstance(payload, list) or not payload:
                return ""
            chunk = payload[0]
            if not isinstance(chunk, dict) or chunk.get("type", "AIMessageChunk") not in _AI_TYPES:
                return ""
            text = _content_text(chunk.get("content"))
            mid = str(chunk.get("id") or "")
            if chunk.get("type") in ("AIMessageChunk", None) or "type" not in chunk:
                self._seen[mid] = self._seen.get(mid, "") + text
                out.append(text)
            else:
                out.append(self._emit_full(mid, text))
        else:
            msgs = payload if isinstance(payload, list) else [payload]
            for m in msgs:
                if not isinstance(m, dict) or m.get("type", "ai") not in _AI_TYPES:
                    continue
                out.append(self._emit_full(str(m.get("id") or ""), _content_text(m.get("content"))))
        return "".join(out)


def openai_delta(data: str) -> Optional[str]:
    """Content delta of one chat.completion.chunk; None at ``[DONE]``."""
    if data.strip() == "[DONE]":
        return None
    try:
        d = json.loads(data)
    except ValueError:
        raise AgentError("bad_reply", "the agent sent an unreadable message") from None
    if isinstance(d, dict) and d.get("error"):
        err = d["error"]
        msg = err.get("message") if isinstance(err, dict) else str(err)
        raise AgentError("agent_error", str(msg or "the agent reported an error")[:200])
    out = []
    for choice in (d.get("choices") or []) if isinstance(d, dict) else []:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        c = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(c, str):
            out.append(c)
    return "".join(out)


# --- interface ----------------------------------------------------------------------------


class Conversation:
    """One conversation (thread) with an agent: one per browser connection."""

    conversation_id: str = ""

    async def reply(self, text: str) -> AsyncIterator[str]:  # pragma: no cover - interface
        raise NotImplementedError
        yield ""

    async def discard(self) -> None:
        """Forget the last reply (its stream is closed already): it was speculative and never
        reached the user, so the conversation must not remember it."""

    async def aclose(self) -> None:
        pass


class Agent:
    kind: str = ""

    def conversation(self) -> Conversation:  # pragma: no cover - interface
        raise NotImplementedError

    async def probe(self) -> None:
        """Raise AgentError unless the agent answers."""

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind}

    async def aclose(self) -> None:
        pass


async def stream_reply(conv: Conversation, text: str, timeout: float,
                       total: Optional[float] = None) -> AsyncIterator[str]:
    """`conv.reply(text)` with `timeout` seconds for the first delta and between deltas, and
    `total` seconds for the whole reply.

    Heartbeats and empty chunks do not count as progress. The generator is closed when
    the consumer stops, which closes the HTTP stream.
    """
    gen = conv.reply(text).__aiter__()
    loop = asyncio.get_running_loop()
    end = None if total is None else loop.time() + total
    try:
        async with asyncio.timeout(timeout if end is None else min(timeout, total)) as cm:  # type: ignore[type-var]
            while True:
                try:
                    delta = await gen.__anext__()
                except StopAsyncIteration:
                    return
                if delta:
                    nxt = loop.time() + timeout
                    cm.reschedule(nxt if end is None else min(nxt, end))
                    yield delta
    except TimeoutError:
        if end is not None and loop.time() >= end - 0.01:
            raise AgentError("timeout", f"the reply took longer than {total:g} s (bridge.reply_timeout)") from None
        raise AgentError("timeout", f"the agent did not answer within {timeout:g} s") from None
    finally:
        await gen.aclose()


def _check_event_stream(r: Any) -> None:
    """AgentError(bad_reply) unless an HTTP answer is a server-sent event stream."""
    ctype = r.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "text/event-stream":
        raise AgentError("bad_reply", f"the agent answered {ctype or 'without a content type'}, "
                         "not an event stream")


# --- echo -----------------------------------------------------------------------------------


_CJK = re.compile(r"[\u3400-\u9fff]")


def echo_text(text: str) -> str:
    text = text.strip()
    if not text:
        return "我没有听清。"
    if _CJK.search(text) or not text.isascii():
        return f"你说的是：{text}"
    return f"You said: {text}"


class EchoConversation(Conversation):
    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.turns = 0

    async def reply(self, text: str) -> AsyncIterator[str]:
        self.turns += 1
        answer = echo_text(text)
        # Several deltas, like a real agent, so the sentence path is the same.
        for piece in re.findall(r".{1,4}", answer, flags=re.S):
            if self.delay:
                await asyncio.sleep(self.delay)
            yield piece


class EchoAgent(Agent):
    kind = "echo"

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    def conversation(self) -> Conversation:
        return EchoConversation(self.delay)


# --- HTTP agents ----------------------------------------------------------------------------


def _http_error(e: BaseException, url: str) -> AgentError:
    import httpx

    if isinstance(e, AgentError):
        return e
    if isinstance(e, httpx.TimeoutException):
        return AgentError("timeout", "the agent did not answer in time")
    if isinstance(e, httpx.HTTPStatusError):
        return AgentError("agent_error", f"the agent answered HTTP {e.response.status_code}")
    if isinstance(e, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return AgentError("unavailable", "the agent is not reachable" if isinstance(e, httpx.ConnectError)
                          else "the agent closed the connection")
    if isinstance(e, httpx.HTTPError):
        return AgentError("unavailable", f"agent request failed: {type(e).__name__}")
    return AgentError("agent_error", f"agent request failed: {type(e).__name__}")


class _HTTPAgent(Agent):
    def __init__(self, cfg: AgentConfig, limits: AgentLimits = AgentLimits()):
        import httpx  # only the HTTP agents need it

        self.cfg = cfg
        self.limits = limits
        self.url = cfg.url.rstrip("/")
        t = float(cfg.timeout)
        # read = longest silence between two chunks of a stream; stream_reply() adds the
        # token-level deadline on top (heartbeats keep the socket busy but say nothing).
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=min(t, 10.0), read=t, write=t, pool=t),
            headers=self._headers(), trust_env=False)

    def _headers(self) -> Dict[str, str]:
        return {}

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "url": self.url}

    async def _probe_get(self, paths: Tuple[str, ...], timeout: float) -> None:
        import httpx

        last: Optional[BaseException] = None
        for path in paths:
            try:
                r = await self.client.get(self.url + path, timeout=timeout)
            except httpx.HTTPError as e:
                raise _http_error(e, self.url) from None
            if r.status_code < 400:
                return
            last = httpx.HTTPStatusError("status", request=r.request, response=r)
        raise _http_error(last, self.url) if last else AgentError("unavailable", "no answer")

    async def aclose(self) -> None:
        await self.client.aclose()


class LangGraphConversation(Conversation):
    def __init__(self, agent: "LangGraphAgent"):
        self.agent = agent
        self.thread_id = ""
        self.run_id = ""       # the last run (from the stream's `metadata` event)
        self.run_ended = False
        self.kept_run = ""     # the newest run not discarded: a reply the user got
        self.posted = False    # this reply's run was asked for (it may exist before we know its id)

    @property
    def conversation_id(self) -> str:  # type: ignore[override]
        return self.thread_id

    async def _ensure_thread(self) -> str:
        if not self.thread_id:
            r = await self.agent.client.post(self.agent.url + "/threads", json={})
            r.raise_for_status()
            d = r.json()
            tid = d.get("thread_id") if isinstance(d, dict) else None
            if not isinstance(tid, str) or not tid:
                raise AgentError("bad_reply", "the agent did not create a thread")
            self.thread_id = tid
            logger.info("langgraph thread %s created", tid)
        return self.thread_id

    async def reply(self, text: str) -> AsyncIterator[str]:
        a = self.agent
        # Until this reply's run exists there is none of its own to discard (never the last one's).
        if self.run_id:
            self.kept_run = self.run_id
        self.run_id, self.run_ended, self.posted = "", False, False
        try:
            tid = await self._ensure_thread()
            body = {"assistant_id": a.cfg.assistant_id,
                    "input": {"messages": [{"role": "user", "content": text}]},
                    "stream_mode": ["messages-tuple"],
                    # Closing the stream (barge-in, the reply cap, a timeout, a dropped speculative
                    # turn) stops the run. The server's default is to finish it unheard, and to
                    # queue this thread's next run behind it.
                    "on_disconnect": "cancel"}
            self.posted = True
            async with a.client.stream("POST", f"{a.url}/threads/{tid}/runs/stream", json=body,
                                       headers={"Accept": "text/event-stream"}) as r:
                if r.status_code >= 400:
                    await r.aread()
                    r.raise_for_status()
                _check_event_stream(r)
                parser = LangGraphStreamParser()
                self.run_id, self.run_ended = _run_id(r.headers.get("content-location", "")), False
                async for event, data in iter_sse(sse_lines(r.aiter_text())):
                    if event == "metadata" and not self.run_id:
                        self.run_id = _metadata_run_id(data)
                    delta = parser.feed(event, data)
                    if delta:
                        yield delta
                    if parser.ended:
                        break
                # The whole stream was read: the run is over (the LangGraph server closes the
                # stream without an `end` event).
                self.run_ended = True
        except AgentError:
            raise
        except Exception as e:  # httpx errors, bad JSON
            raise _http_error(e, a.url) from None

    async def discard(self) -> None:
        """Forget the last run, so the thread's history never shows the speculative exchange.

        A run still going is cancelled with rollback: the server deletes the run and its
        checkpoints. One that is not (it finished, or the server stopped it when the stream was
        closed: the cancel answers 404, or the run outlives it) is deleted once the server is done
        with it; deleting a run deletes its checkpoints too (it is what the server's rollback does)."""
        tid, rid, posted = self.thread_id, self.run_id, self.posted
        self.run_id, self.posted = "", False
        if tid and not rid and posted:
            # Dropped before the answer's headers named the run: the server may have made it
            # (with the user's words in the thread); its newest run is ours unless it is the
            # last one we kept.
            rid = await self._newest_run(tid)
            if rid == self.kept_run:
                rid = ""
        if not tid or not rid:
            return
        a = self.agent
        run_url = f"{a.url}/threads/{tid}/runs/{rid}"
        r = await a.client.post(run_url + "/cancel", params={"wait": "true", "action": "rollback"}, timeout=5.0)
        if r.status_code < 400 and (await a.client.get(run_url, timeout=5.0)).status_code == 404:
            logger.info("langgraph thread %s: run %s cancelled (rollback)", tid, rid)
            return
        if r.status_code >= 400 and r.status_code != 404:
            logger.warning("langgraph thread %s: cancelling run %s answered HTTP %d; the thread keeps it",
                           tid, rid, r.status_code)
            return
        how = "finished" if self.run_ended else "stopped"
        await self._wait_not_busy(tid)  # nothing of the run may be written after it is deleted
        d = await a.client.delete(run_url, timeout=5.0)
        if d.status_code < 400:
            logger.info("langgraph thread %s: run %s had %s; deleted with its checkpoints", tid, rid, how)
        else:
            logger.warning("langgraph thread %s: run %s had %s; deleting it answered HTTP %d, the thread keeps it",
                           tid, rid, how, d.status_code)

    async def _newest_run(self, tid: str) -> str:
        r = await self.agent.client.get(f"{self.agent.url}/threads/{tid}/runs", params={"limit": 1}, timeout=5.0)
        try:
            runs = r.json() if r.status_code < 400 else []
            rid = runs[0].get("run_id") if isinstance(runs, list) and runs and isinstance(runs[0], dict) else ""
        except ValueError:
            rid = ""
        return rid if isinstance(rid, str) else ""

    async def _wait_not_busy(self, tid: str, limit: float = 2.0) -> None:
        """Until the thread is no longer busy: the server is done with its last run."""
        a = self.agent
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        while True:
            r = await a.client.get(f"{a.url}/threads/{tid}", timeout=limit)
            try:
                busy = r.status_code < 400 and r.json().get("status") == "busy"
            except (ValueError, AttributeError):
                busy = False
            if not busy or loop.time() >= end:
                return
            await asyncio.sleep(0.02)

    async def aclose(self) -> None:
        """Delete the thread: the server would keep every conversation forever otherwise."""
        tid, self.thread_id = self.thread_id, ""
        if not tid:
            return
        try:
            r = await self.agent.client.delete(f"{self.agent.url}/threads/{tid}", timeout=3.0)
            if r.status_code >= 400 and r.status_code != 404:
                logger.warning("langgraph thread %s: delete answered HTTP %d", tid, r.status_code)
        except Exception as e:  # the agent may be gone; nothing to do about it here
            logger.warning("langgraph thread %s: delete failed: %s", tid, type(e).__name__)


def _run_id(location: str) -> str:
    """The run id in a runs/stream answer's Content-Location (/threads/T/runs/R[/stream])."""
    m = re.search(r"/runs/([^/?#]+)", location or "")
    return m.group(1) if m and m.group(1) != "stream" else ""


def _metadata_run_id(data: str) -> str:
    try:
        d = json.loads(data)
    except ValueError:
        return ""
    rid = d.get("run_id") if isinstance(d, dict) else None
    return rid if isinstance(rid, str) else ""


class LangGraphAgent(_HTTPAgent):
    kind = "langgraph"

    def _headers(self) -> Dict[str, str]:
        return {"x-api-key": self.cfg.api_key} if self.cfg.api_key else {}

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "url": self.url, "assistant_id": self.cfg.assistant_id}

    def conversation(self) -> Conversation:
        return LangGraphConversation(self)

    async def probe(self, timeout: float = 3.0) -> None:
        # /ok is the LangGraph server's liveness route; /info older servers also have.
        await self._probe_get(("/ok", "/info"), timeout)


class OpenAIConversation(Conversation):
    # Keep the prompt bounded on long conversations (messages, not tokens: good enough).
    MAX_HISTORY = 40

    def __init__(self, agent: "OpenAIAgent"):
        self.agent = agent
        self.history: List[Dict[str, str]] = []
        self._mark: Optional[int] = None

    async def discard(self) -> None:
        """Drop the last exchange (the user's text and whatever was said to it)."""
        if self._mark is not None:
            del self.history[self._mark:]
            self._mark = None

    async def reply(self, text: str) -> AsyncIterator[str]:
        a = self.agent
        self.history.append({"role": "user", "content": text})
        self.history = self.history[-self.MAX_HISTORY:]
        self._mark = len(self.history) - 1  # where this exchange starts (for discard)
        body: Dict[str, Any] = {"messages": list(self.history), "stream": True,
                                "max_tokens": a.limits.max_tokens}
        if a.cfg.model:
            body["model"] = a.cfg.model
        said: List[str] = []
        try:
            async with a.client.stream("POST", a.completions_url, json=body,
                                       headers={"Accept": "text/event-stream"}) as r:
                if r.status_code >= 400:
                    await r.aread()
                    r.raise_for_status()
                _check_event_stream(r)
                async for _event, data in iter_sse(sse_lines(r.aiter_text())):
                    delta = openai_delta(data)
                    if delta is None:
                        break
                    if delta:
                        said.append(delta)
                        yield delta
        except AgentError:
            raise
        except Exception as e:
            raise _http_error(e, a.url) from None
        finally:
            # What the user heard is what the assistant said, also when cut short.
            if said:
                self.history.append({"role": "assistant", "content": "".join(said)[:a.limits.max_reply_chars]})


class OpenAIAgent(_HTTPAgent):
    kind = "openai"

    def __init__(self, cfg: AgentConfig, limits: AgentLimits = AgentLimits()):
        super().__init__(cfg, limits)
        self.completions_url = self.url + ("/chat/completions" if self.url.endswith("/v1") else "/v1/chat/completions")

    def _headers(self) -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "url": self.url, "model": self.cfg.model}

    def conversation(self) -> Conversation:
        return OpenAIConversation(self)

    async def probe(self, timeout: float = 3.0) -> None:
        base = self.url if self.url.endswith("/v1") else self.url + "/v1"
        await self._probe_get((base[len(self.url):] + "/models",), timeout)


def build_agent(cfg: AgentConfig, kind: Optional[str] = None, limits: AgentLimits = AgentLimits()) -> Agent:
    """The agent client for `kind` (default: cfg.kind)."""
    kind = kind or cfg.kind
    if kind == "echo":
        return EchoAgent()
    if kind == "langgraph":
        return LangGraphAgent(cfg, limits)
    if kind == "openai":
        return OpenAIAgent(cfg, limits)
    raise ValueError(f"unknown agent kind {kind!r} (one of {', '.join(KINDS)})")


async def probe_agent(cfg: AgentConfig, kind: Optional[str] = None, timeout: float = 3.0) -> Tuple[bool, str]:
    """(answers, one line why) for `s2s-bridge --probe-agent` and /healthz."""
    agent = build_agent(cfg, kind)
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout + 1.0):
            await agent.probe() if agent.kind == "echo" else await agent.probe(timeout=timeout)  # type: ignore[call-arg]
        return True, f"{agent.kind} agent at {getattr(agent, 'url', 'built-in')} answers ({time.monotonic() - t0:.2f} s)"
    except AgentError as e:
        return False, f"{agent.kind} agent at {getattr(agent, 'url', '')}: {e.message}"
    except TimeoutError:
        return False, f"{agent.kind} agent at {getattr(agent, 'url', '')}: no answer within {timeout:g} s"
    finally:
        await agent.aclose()
