"""The built-in `echo` agent: answers with what it heard, in several deltas like a real agent.
Used when the configured agent does not answer (scripts/start-s2s.sh, agent.fallback_echo)."""

from __future__ import annotations

import asyncio
import re
from typing import AsyncGenerator

from bridge.agents.base import Agent, Conversation

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

    async def reply(self, text: str) -> AsyncGenerator[str, None]:
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
