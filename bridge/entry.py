"""What the front ends' entry points share (s2s-bridge, s2s-wyoming, s2s-openai): the prologue of
every s2s entry point (daemon/serving/entry.py: arguments, the config or one `config error` line,
logging, serving until SIGTERM or SIGINT), plus what only clients of the daemon need: their CURVE
keys, and the refusal to listen beyond loopback without a secret."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Optional, Union

from daemon.config import Config
from daemon.serving import entry as common
from daemon.serving.entry import CONFIG_ERROR, parser, refuse, serve, setup_logging
from daemon.wire.curve import CurveError, configure_clients

__all__ = ["load", "parser", "refuse", "serve", "setup_logging", "start"]


def load(prog: str, args: argparse.Namespace) -> Optional[Config]:
    """The config `--config` names (or the default one), its CURVE client keys loaded
    (cluster.curve_dir, daemon/wire/curve.py); None after printing why not."""
    cfg = common.load(prog, args)
    if cfg is None:
        return None
    try:
        configure_clients(cfg)
    except CurveError as e:
        sys.stderr.write(f"{prog}: {e.message}\n")  # (logging is not set up yet: its config failed)
        return None
    return cfg


def start(prog: str, args: argparse.Namespace, host: str = "", secret: str = "",
          exposes: str = "") -> Union[Config, int]:
    """A front end's main() prologue: the config (`load`); with `secret` (a key such as
    bridge.token), a refusal to listen on `host` (a key such as bridge.host) beyond loopback
    without it, since anyone who could reach it would use `exposes`; logging set up. The config,
    or the exit status."""
    cfg = load(prog, args)
    if cfg is None:
        return CONFIG_ERROR
    if secret:
        from bridge.auth import open_to_network_without_token

        address = str(_value(cfg, host))
        if open_to_network_without_token(address, str(_value(cfg, secret))):
            return refuse(prog, cfg, secret, f"must be set when {host} ({address}) is not a loopback address: "
                                             f"anyone who can reach it would use {exposes}")
    setup_logging(cfg, args.verbose)
    return cfg


def _value(cfg: Config, key: str) -> object:
    return functools.reduce(getattr, key.split("."), cfg)
