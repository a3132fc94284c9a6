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
    p = argparse.ArgumentParser(prog="s2s-bridge", description="s2s browser bridge (websockets): page, /ws, /healthz")
    p.add_argument("--config", help="YAML config (default: $S2S_CONFIG, /etc/s2s/s2s.yaml, repo etc/s2s.yaml)")
    p.add_argument("--agent", choices=KINDS, help="agent kind (default: agent.kind from the config)")
    p.add_argument("--probe-agent", action="store_true", help="check that the agent answers, then exit 0 or 1")
    p.add_argument("-v", "--verbose", action="store_true")
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


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cfg = entry.load("s2s-bridge", args)
    if cfg is None:
        return 2
    if args.probe_agent:
        from bridge.agents import probe_agent

        ok, why = asyncio.run(probe_agent(cfg.agent, args.agent, timeout=PROBE_TIMEOUT))
        print(f"s2s-bridge: {why}", file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    from bridge.auth import open_to_network_without_token

    if open_to_network_without_token(cfg.bridge.host, cfg.bridge.token):
        return entry.refuse("s2s-bridge", cfg, "bridge.token",
                            f"must be set when bridge.host ({cfg.bridge.host}) is not a loopback address: anyone "
                            f"who can reach it would use the agent and the daemon")
    entry.setup_logging(cfg, args.verbose)
    # httpx logs every request at INFO: one per agent turn is noise in the bridge's log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from bridge.server import Bridge

    bridge = Bridge(cfg, agent_kind=args.agent)
    if bridge.echo_fallback:
        logger.warning("%s", bridge.notice)
    try:
        return entry.run_until_signal(lambda stop: _serve(bridge, stop))
    except OSError as e:
        logger.error("s2s-bridge: cannot serve on %s:%d: %s", cfg.bridge.host, cfg.bridge.port, e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
