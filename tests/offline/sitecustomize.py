"""Offline guard for every Python process the tests start (on PYTHONPATH via conftest).

Active when S2S_OFFLINE_GUARD=1: any connection or name lookup to a non-loopback address
raises OSError and is appended to $S2S_OFFLINE_LOG, which the test session checks at the end,
so a subprocess that swallowed the error still fails the suite loudly.
"""

import os

import socket

if os.environ.get("S2S_OFFLINE_GUARD") == "1" and not getattr(socket, "_s2s_offline_guard", False):
    import ipaddress
    import sys
    import traceback

    _LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}

    def _is_local(host) -> bool:
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        host = str(host).strip("[]")
        if host in _LOCAL_NAMES:
            return True
        try:
            return ipaddress.ip_address(host.split("%")[0]).is_loopback or host in ("0.0.0.0", "::")
        except ValueError:
            return False

    def _blocked(what: str, target) -> OSError:
        msg = f"s2s offline guard: {what} to non-loopback {target!r} blocked (pid {os.getpid()})"
        log = os.environ.get("S2S_OFFLINE_LOG")
        if log:
            with open(log, "a", encoding="utf-8") as f:
                f.write(msg + "\n" + "".join(traceback.format_stack(limit=12)) + "\n")
        sys.stderr.write(msg + "\n")
        return OSError(101, msg)

    _connect = socket.socket.connect
    _connect_ex = socket.socket.connect_ex
    _getaddrinfo = socket.getaddrinfo

    def _check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
            if not _is_local(address[0]):
                raise _blocked("connect", address)

    def connect(self, address):
        _check(self, address)
        return _connect(self, address)

    def connect_ex(self, address):
        _check(self, address)
        return _connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_local(host):
            raise socket.gaierror(socket.EAI_NONAME, str(_blocked("name lookup", host)))
        return _getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo
    socket._s2s_offline_guard = True
