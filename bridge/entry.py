"""What the front ends' entry points share (s2s-bridge, s2s-wyoming, s2s-openai): the config
loaded or one `config error` line, logging set up from it, and an asyncio main that runs until
SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Awaitable, Callable, Optional

from daemon.config import Config, ConfigError, load_config


def load(prog: str, args: argparse.Namespace) -> Optional[Config]:
    """The config `--config` names (or the default one); None after printing why not."""
    try:
        return load_config(args.config)
    except ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return None


def refuse(prog: str, cfg: Config, key: str, why: str) -> int:
    """A setting that would expose the service: one line, exit 2 (as a config error)."""
    print(f"{prog}: config error: {cfg.source}: {key}: {why}", file=sys.stderr)
    return 2


def setup_logging(cfg: Config, verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else getattr(logging, cfg.logging.level),
                        format=cfg.logging.format)


def run_until_signal(serve: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """asyncio.run(serve(stop)), `stop` set by SIGTERM or SIGINT."""

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await serve(stop)

    return asyncio.run(main())
