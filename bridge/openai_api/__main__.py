"""s2s-openai: the OpenAI audio API in front of the speech daemon.

    s2s-openai [--config FILE] [-v]

Serves `openai_api.host`:`openai_api.port` and logs `serving http://HOST:PORT/v1` (the base URL
clients are given). Connects to the daemon's sockets like the bridge; the daemon may start
later or restart: requests meanwhile get 503. Refuses to listen beyond loopback without
`openai_api.api_key`. READY for systemd once listening; SIGTERM/SIGINT stop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import List, Optional

from bridge import entry
from daemon.config import Config

logger = logging.getLogger("bridge.openai_api")

STOP_TIMEOUT = 5.0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return entry.parser("s2s-openai", "OpenAI audio API (/v1/audio/...) for s2s").parse_args(argv)


async def serve(cfg: Config, stop: asyncio.Event) -> int:
    from aiohttp import web

    from bridge.daemon_pool import daemon_link
    from bridge.openai_api.handler import Api
    from daemon.serving.notify import Notifier

    link = daemon_link(cfg)
    await link.start()
    api = Api(cfg, link)
    await api.info.refresh(timeout=2.0, force=True)
    runner = web.AppRunner(api.app(), access_log=None, shutdown_timeout=STOP_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.openai_api.host, cfg.openai_api.port)
        await site.start()
        server = getattr(site, "_server", None)
        port = server.sockets[0].getsockname()[1] if server is not None and server.sockets else cfg.openai_api.port
        logger.info("serving http://%s:%d/v1", cfg.openai_api.host, port)
        Notifier().ready(f"serving http://{cfg.openai_api.host}:{port}/v1")
        await stop.wait()
        logger.info("stopping: %d request(s) in progress", api.active)
    finally:
        await runner.cleanup()
        await link.close()
        Notifier().stopping()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    cfg = entry.start("s2s-openai", parse_args(argv), "openai_api.host", "openai_api.api_key", "the daemon")
    if isinstance(cfg, int):
        return cfg
    return entry.serve("s2s-openai", f"{cfg.openai_api.host}:{cfg.openai_api.port}", lambda stop: serve(cfg, stop))


if __name__ == "__main__":
    sys.exit(main())
