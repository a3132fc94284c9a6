"""s2s-bridge: browser page + websocket bridge between browsers, the speech daemon and an agent.

    s2s-bridge [--config FILE] [--agent langgraph|openai|echo] [--probe-agent] [-v]

--probe-agent   exit 0 when the configured agent (or --agent) answers within a few seconds,
                else 1, with one line saying why (scripts/start-s2s.sh uses it to fall back
                to --agent echo).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import List, Optional

from bridge import entry
from bridge.agents import KINDS

logger = logging.getLogger("bridge")

PROBE_TIMEOUT = 3.0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = entry.parser("s2s-bridge", "s2s browser bridge (websockets): page, /ws, /healthz")
    p.add_argument("--agent", choices=KINDS, help="agent kind (default: agent.kind from the config)")
    p.add_argument("--probe-agent", action="store_true", help="check that the agent answers, then exit 0 or 1")
    return p.parse_args(argv)


async def _serve(bridge, stop: asyncio.Event) -> int:
    from daemon.serving.notify import Notifier

    notifier = Notifier()

    def ready(b) -> None:
        notifier.ready(f"serving on port {b.port}, agent {b.agent.kind}")

    try:
        await bridge.serve(stop, on_ready=ready)
    finally:
        notifier.stopping()
    return 0


def probe(args: argparse.Namespace) -> int:
    """--probe-agent: one line (nothing logged), exit 0 when the agent answers, else 1."""
    cfg = entry.load("s2s-bridge", args)
    if cfg is None:
        return 2
    from bridge.agents import probe_agent

    ok, why = asyncio.run(probe_agent(cfg.agent, args.agent, timeout=PROBE_TIMEOUT))
    print(f"s2s-bridge: {why}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.probe_agent:
        return probe(args)
    cfg = entry.start("s2s-bridge", args, "bridge.host", "bridge.token", "the agent and the daemon")
    if isinstance(cfg, int):
        return cfg
    # httpx logs every request at INFO: one per agent turn is noise in the bridge's log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from bridge.server import Bridge

    bridge = Bridge(cfg, agent_kind=args.agent)
    if bridge.echo_fallback:
        logger.warning("%s", bridge.notice)
    return entry.serve("s2s-bridge", f"{cfg.bridge.host}:{cfg.bridge.port}", lambda stop: _serve(bridge, stop))


if __name__ == "__main__":
    sys.exit(main())
