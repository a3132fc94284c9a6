"""The prologue every s2s entry point's main() shares (s2s-speechd here, s2s-bridge, s2s-wyoming
and s2s-openai through bridge/entry.py): the common arguments (`--config`, `-v`), the config
loaded or one `config error` line (exit 2), a setting that would expose a service refused the
same way, logging set up from the config, and an asyncio main that runs until SIGTERM or SIGINT
(a listen that fails: one line, exit 1)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Awaitable, Callable, Optional

from daemon.config import Config, ConfigError, load_config

logger = logging.getLogger(__name__)

CONFIG_HELP = "YAML config (default: $S2S_CONFIG, /etc/s2s/s2s.yaml, repo etc/s2s.yaml)"
CONFIG_ERROR = 2  # exit status of a config that cannot be used (systemd: do not restart in a loop)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An entry point's arguments: `--config` and `-v`; the caller adds its own."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def load(prog: str, args: argparse.Namespace) -> Optional[Config]:
    """The config `--config` names (or the default one); None after printing why not."""
    try:
        return load_config(args.config)
    except ConfigError as e:
        # before logging is set up (its level and format are in the config): one line on stderr
        sys.stderr.write(f"{prog}: config error: {e}\n")
        return None


def refuse(prog: str, cfg: Config, key: str, why: str) -> int:
    """A setting that would expose the service: one line, exit 2 (as a config error)."""
    sys.stderr.write(f"{prog}: config error: {cfg.source}: {key}: {why}\n")
    return CONFIG_ERROR


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


def serve(prog: str, where: str, serve: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """run_until_signal(serve); a socket that cannot be listened on (`where`): one line, exit 1."""
    try:
        return run_until_signal(serve)
    except OSError as e:
        logger.error("%s: cannot serve on %s: %s", prog, where, e)
        return 1
