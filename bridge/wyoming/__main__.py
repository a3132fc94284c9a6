"""s2s-wyoming: Wyoming protocol server (Home Assistant) in front of the speech daemon.

    s2s-wyoming [--config FILE] [-v]

Serves `wyoming.asr_port` (speech recognition) and `wyoming.tts_port` (speech synthesis) on
`wyoming.host`, one port for both when the two are the same number, and logs
`serving tcp://HOST:PORT (asr, tts)` for each. Connects to the daemon's sockets like the bridge
(daemon.asr_endpoint / tts_endpoint); the daemon may start later or restart: requests meanwhile
get an `unavailable` error event. READY for systemd once listening; SIGTERM/SIGINT stop.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import sys
from functools import partial
from typing import Dict, FrozenSet, List, Optional, Set

from bridge import entry
from daemon.config import Config

logger = logging.getLogger("bridge.wyoming")

STOP_TIMEOUT = 5.0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return entry.parser("s2s-wyoming", "Wyoming protocol server (Home Assistant) for s2s").parse_args(argv)


def port_services(cfg: Config) -> Dict[int, FrozenSet[str]]:
    """Port -> the services it offers: asr and tts on their ports, both on one shared port."""
    w = cfg.wyoming
    if w.asr_port == w.tts_port:
        return {w.asr_port: frozenset({"asr", "tts"})}
    return {w.asr_port: frozenset({"asr"}), w.tts_port: frozenset({"tts"})}


async def serve(cfg: Config, stop: asyncio.Event) -> int:
    from bridge.daemon_pool import daemon_link
    from bridge.wyoming.handler import Catalog, Handler, max_event_bytes
    from daemon.serving.notify import Notifier
    from wyoming.error import Error
    from wyoming.event import async_write_event

    link = daemon_link(cfg)
    await link.start()
    from bridge.speech import DaemonInfo

    catalog = Catalog(cfg, DaemonInfo(link))
    await catalog.refresh(timeout=2.0, force=True)
    if catalog.describe is None:
        logger.warning("the speech daemon does not answer yet: info lists the configured engines until it does")
    tasks: Set["asyncio.Task[None]"] = set()
    ids = itertools.count(1)

    async def connection(services: FrozenSet[str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id = f"{next(ids)}"
        peer = writer.get_extra_info("peername")
        if len(tasks) >= cfg.wyoming.max_connections:
            logger.warning("conn %s from %s refused: %d connections (wyoming.max_connections)", conn_id, peer, len(tasks))
            try:
                await async_write_event(Error(text=f"busy: {len(tasks)} connections (wyoming.max_connections); "
                                                   "retry later", code="busy").event(), writer)
            except ConnectionError:
                pass
            writer.close()
            return
        logger.debug("conn %s from %s (%s)", conn_id, peer, ", ".join(sorted(services)))
        handler = Handler(reader, writer, cfg=cfg, link=link, catalog=catalog, services=services, conn_id=conn_id)
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler.run()
        finally:
            tasks.discard(task)

    servers = []
    try:
        for port, services in port_services(cfg).items():
            server = await asyncio.start_server(partial(connection, services), cfg.wyoming.host, port,
                                                limit=max_event_bytes(cfg))
            servers.append(server)
            bound = server.sockets[0].getsockname()[1]
            logger.info("serving tcp://%s:%d (%s)", cfg.wyoming.host, bound, ", ".join(sorted(services)))
        Notifier().ready(f"serving Wyoming on {cfg.wyoming.host} ports "
                         + ", ".join(str(s.sockets[0].getsockname()[1]) for s in servers))
        await stop.wait()
        logger.info("stopping: %d connection(s) open", len(tasks))
    finally:
        for server in servers:
            server.close()
        for t in list(tasks):
            t.cancel()
        if tasks:
            await asyncio.wait(list(tasks), timeout=STOP_TIMEOUT)
        await link.close()
        Notifier().stopping()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    cfg = entry.start("s2s-wyoming", parse_args(argv))
    if isinstance(cfg, int):
        return cfg
    from bridge.auth import is_loopback

    if not is_loopback(cfg.wyoming.host):
        logger.warning("listening on %s: Wyoming has no authentication, anyone who can reach these ports may use "
                       "the speech daemon (firewall them to the Home Assistant host)", cfg.wyoming.host)
    return entry.serve("s2s-wyoming", cfg.wyoming.host, lambda stop: serve(cfg, stop))


if __name__ == "__main__":
    sys.exit(main())
