"""systemd notify protocol in a few stdlib lines; a no-op without $NOTIFY_SOCKET.

    n = Notifier()
    n.status("loading ASR"); n.extend_timeout(60); n.ready(); n.watchdog(); n.stopping()
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping, Optional

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: Optional[Mapping[str, str]] = None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr: Optional[str] = None
        if addr:
            # "@name" is a socket in the abstract namespace.
            self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        self._sock: Optional[socket.socket] = None
        self._watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is meant for; a child must not ping.
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self._watchdog_usec = int(usec)

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def watchdog_interval(self) -> Optional[float]:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked for."""
        if not self._watchdog_usec:
            return None
        return self._watchdog_usec / 2e6

    def notify(self, *lines: str) -> bool:
        """Send KEY=VALUE lines in one datagram; never raises (a lost notify must not kill us)."""
        if self._addr is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode("utf-8"), self._addr)
            return True
        except OSError as e:
            logger.debug("sd_notify %r failed: %s", lines, e)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text.replace(chr(10), ' ')}")

    def extend_timeout(self, seconds: float) -> bool:
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
