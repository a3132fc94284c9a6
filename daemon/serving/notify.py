"""systemd notifications through `sdnotify`; a no-op without $NOTIFY_SOCKET.

    n = Notifier()
    n.status("loading ASR"); n.extend_timeout(60); n.ready(); n.watchdog(); n.stopping()

What sdnotify lacks is kept here: the watchdog interval (WATCHDOG_USEC, honoured only when
WATCHDOG_PID is unset or names this process), several KEY=VALUE lines in one datagram, and
UTF-8 (sdnotify encodes as Latin-1 and silently drops anything else, such as a STATUS line
naming a Chinese path: the text is handed over as UTF-8 bytes spelled in Latin-1).
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Optional

import sdnotify

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: Optional[Mapping[str, str]] = None):
        env = os.environ if env is None else env
        self._sd = sdnotify.SystemdNotifier() if env.get("NOTIFY_SOCKET") else None
        self._watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is meant for; a child must not ping.
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self._watchdog_usec = int(usec)

    def watchdog_interval(self) -> Optional[float]:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked for."""
        if not self._watchdog_usec:
            return None
        return self._watchdog_usec / 2e6

    def notify(self, *lines: str) -> bool:
        """Send KEY=VALUE lines in one datagram; never raises (a lost notify must not kill us)."""
        if self._sd is None or self._sd.socket is None:
            return False
        self._sd.notify("\n".join(lines).encode("utf-8", "replace").decode("latin-1"))
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_line(text)}")

    def extend_timeout(self, seconds: float) -> bool:
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={_line(status)}"] if status else []))


def _line(text: str) -> str:
    return text.replace("\n", " ")
