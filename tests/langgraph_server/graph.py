"""The graph the REAL LangGraph server (`langgraph dev`, in-memory runtime) serves in the tests
(tests/helpers/langgraph_real.py). Runs in .venv-langgraph, never in the project venv.

One node, ``agent``, whose model is langchain_core's `GenericFakeChatModel`: no network, no
weights. The reply is deterministic and says what the model saw:

    "Answer {n} to {c} characters. It has a second sentence."

``n`` is the number of user messages in the thread's state (so a rolled-back turn does not
count), ``c`` the length of the last one; when that says "long", 38 more sentences follow (a
reply that takes seconds, for barge-in); when it says "raise", the node raises (the server's
`error` event). English, so the tests' Piper voice can speak it.
The reply streams word by word (GenericFakeChatModel splits on whitespace) with
``S2S_FAKE_LLM_DELAY`` seconds (default 0.03) before each chunk, so a run can be cancelled
in the middle of its reply.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.outputs import ChatGenerationChunk
from langgraph.graph import END, START, MessagesState, StateGraph

DELAY = float(os.environ.get("S2S_FAKE_LLM_DELAY", "0.03"))


class SlowFakeChatModel(GenericFakeChatModel):
    """GenericFakeChatModel with a pause before each streamed chunk (its own async path, so a
    cancelled run stops between two chunks)."""

    delay: float = 0.0

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        for chunk in self._stream(messages, stop=stop, **kwargs):
            await asyncio.sleep(self.delay)
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def reply_for(messages: list[BaseMessage]) -> str:
    users = [m for m in messages if isinstance(m, HumanMessage)]
    last = users[-1].text if users else ""
    reply = f"Answer {len(users)} to {len(last)} characters. It has a second sentence."
    if "long" in last.lower():
        reply += "".join(f" This is sentence {i} of a long answer." for i in range(3, 41))
    return reply


async def agent(state: MessagesState) -> dict:
    if state["messages"] and "raise" in state["messages"][-1].text.lower():
        raise RuntimeError("the graph failed on purpose")
    model = SlowFakeChatModel(messages=iter([reply_for(state["messages"])]), delay=DELAY)
    return {"messages": [await model.ainvoke(state["messages"])]}


graph = StateGraph(MessagesState).add_node("agent", agent).add_edge(START, "agent").add_edge("agent", END).compile()
