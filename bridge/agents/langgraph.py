"""The `langgraph` agent: the LangGraph server API. ``POST /threads`` once per conversation, then
``POST /threads/{id}/runs/stream`` per user message, reading the SSE stream in ``messages-tuple``
mode (``LangGraphStreamParser``; the legacy ``messages`` mode is understood too). The server keeps
the history in its thread; a speculative reply is discarded through its API (rollback, or delete)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, AsyncGenerator, Dict, List

from bridge.agents.base import AgentError, Conversation, HTTPAgent, check_event_stream, http_error
from bridge.agents.sse import iter_sse, sse_lines

logger = logging.getLogger(__name__)


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

    async def reply(self, text: str) -> AsyncGenerator[str, None]:
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
                check_event_stream(r)
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
            raise http_error(e, a.url) from None

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


class LangGraphAgent(HTTPAgent):
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
