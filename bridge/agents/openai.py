"""The `openai` agent: any OpenAI-compatible ``/v1/chat/completions`` with ``stream: true`` (SSE
``data: {"choices":[{"delta":{"content":...}}]}`` ... ``data: [DONE]``); the history is kept here,
per conversation, bounded (MAX_HISTORY messages, each reply cut at AgentLimits.max_reply_chars)."""

from __future__ import annotations

import json
from typing import Any, AsyncGenerator, Dict, List, Optional

from bridge.agents.base import AgentError, AgentLimits, Conversation, HTTPAgent, check_event_stream, http_error
from bridge.agents.sse import iter_sse, sse_lines
from daemon.config import AgentConfig


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

    async def reply(self, text: str) -> AsyncGenerator[str, None]:
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
                check_event_stream(r)
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
            raise http_error(e, a.url) from None
        finally:
            # What the user heard is what the assistant said, also when cut short.
            if said:
                self.history.append({"role": "assistant", "content": "".join(said)[:a.limits.max_reply_chars]})


class OpenAIAgent(HTTPAgent):
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
