"""What every agent kind shares: the interface (`Agent`, `Conversation`), its errors
(`AgentError`) and limits (`AgentLimits`), the deadlines around a reply (`stream_reply`), and the
HTTP agents' base (`HTTPAgent`: one httpx client, probes, errors mapped to AgentError codes)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncGenerator, Dict, Optional, Tuple

from daemon.config import AgentConfig

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


class Conversation:
    """One conversation (thread) with an agent: one per browser connection."""

    conversation_id: str = ""

    async def reply(self, text: str) -> AsyncGenerator[str, None]:  # pragma: no cover - interface
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
                       total: Optional[float] = None) -> AsyncGenerator[str, None]:
    """`conv.reply(text)` with `timeout` seconds for the first delta and between deltas, and
    `total` seconds for the whole reply.

    Heartbeats and empty chunks do not count as progress. The generator is closed when
    the consumer stops, which closes the HTTP stream.
    """
    gen = conv.reply(text)
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


def check_event_stream(r: Any) -> None:
    """AgentError(bad_reply) unless an HTTP answer is a server-sent event stream."""
    ctype = r.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "text/event-stream":
        raise AgentError("bad_reply", f"the agent answered {ctype or 'without a content type'}, "
                         "not an event stream")


def http_error(e: BaseException, url: str) -> AgentError:
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


class HTTPAgent(Agent):
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
                raise http_error(e, self.url) from None
            if r.status_code < 400:
                return
            last = httpx.HTTPStatusError("status", request=r.request, response=r)
        raise http_error(last, self.url) if last else AgentError("unavailable", "no answer")

    async def aclose(self) -> None:
        await self.client.aclose()
