"""Agent clients: what answers the user, behind one small interface (one module per kind).

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
import time
from typing import Optional, Tuple

from bridge.agents.base import (KINDS, Agent, AgentError, AgentLimits, Conversation, HTTPAgent, check_event_stream,
                                http_error, stream_reply)
from bridge.agents.echo import EchoAgent, EchoConversation, echo_text
from bridge.agents.langgraph import LangGraphAgent, LangGraphConversation, LangGraphStreamParser
from bridge.agents.openai import OpenAIAgent, OpenAIConversation, openai_delta
from bridge.agents.sse import MAX_SSE_LINE, iter_sse, sse_lines
from daemon.config import AgentConfig

__all__ = ["KINDS", "MAX_SSE_LINE", "Agent", "AgentError", "AgentLimits", "Conversation", "EchoAgent",
           "EchoConversation", "HTTPAgent", "LangGraphAgent", "LangGraphConversation", "LangGraphStreamParser",
           "OpenAIAgent", "OpenAIConversation", "build_agent", "check_event_stream", "echo_text", "http_error",
           "iter_sse", "openai_delta", "probe_agent", "sse_lines", "stream_reply"]


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
