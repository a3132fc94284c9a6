"""What a browser connection needs from the bridge process, handed in as one small object
(instead of the connection reaching into the server)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from bridge.agents import Agent
from bridge.daemon_link import DaemonLink
from bridge.metrics import Metrics
from daemon.config import Config


@dataclass
class Context:
    cfg: Config
    agent: Agent
    daemon: DaemonLink
    metrics: Metrics
    # The agent as browsers may see it: kind, echo fallback, a notice (never its URL, model,
    # assistant id or key; /healthz detail has those, behind the token).
    public_agent: Dict[str, Any]
