"""ZeroMQ CURVE between hosts: the key files, who may use plain tcp://, and the client side.

Layout of a keys directory (`s2s-ctl keys --dir DIR` makes it):

    DIR/server.key           the daemon's public key (every client needs it)
    DIR/server.key_secret    the daemon's secret key (the daemon only; mode 0600)
    DIR/clients/NAME.key     the public keys the daemon admits (one file per client)
    DIR/NAME.key[_secret]    a client's keypair (the front ends use cluster.curve_client)

Files are ZeroMQ's certificate format (zmq.auth). A secret key readable or writable by anyone
but its owner is refused with one line naming the file and its mode; so is a clients/
directory others may write to (whoever writes there decides who gets in).

The rule for tcp:// (one owner, used by the daemon's transport and by the clients):
CURVE when `cluster.curve_dir` is set; otherwise plain, which a non-loopback address gets
only with `cluster.allow_plain_tcp: true`. ipc:// never uses CURVE (its file mode guards it).

The clients learn the keys once per process (`configure_clients(cfg)`, called by the front
ends and s2s-ctl after loading the config); `secure_client(sock, endpoint)` then sets them on
each DEALER before it connects.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import zmq
import zmq.auth

from daemon.errors import ErrorCode, S2SError

if TYPE_CHECKING:
    from daemon.config import Config

logger = logging.getLogger(__name__)

SERVER = "server"
CLIENTS_DIR = "clients"
DEFAULT_DIR = "/etc/s2s/curve"


class CurveError(S2SError):
    """A key that cannot be used, or plain tcp:// where it is not allowed; one line saying why."""

    def __init__(self, message: str):
        super().__init__(message, ErrorCode.UNAVAILABLE)


def tcp_host(endpoint: str) -> Optional[str]:
    """The host part of a tcp:// endpoint (brackets of an IPv6 address removed), else None."""
    if not endpoint.startswith("tcp://"):
        return None
    rest = endpoint[len("tcp://"):]
    rest = rest.split(";")[-1]  # "tcp://src;dst": the address connected to or bound is the last
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(endpoint: str) -> bool:
    """True for tcp://127.x, tcp://localhost and tcp://[::1]; False for every other tcp address
    (a wildcard `*` or 0.0.0.0 listens on every interface)."""
    host = tcp_host(endpoint)
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_secret_mode(path: Path) -> None:
    try:
        st = path.stat()
    except OSError as e:
        raise CurveError(f"cannot read the CURVE secret key {path}: {e.strerror or e} "
                         f"(make the keys with `s2s-ctl keys --dir {path.parent}`)") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise CurveError(f"the CURVE secret key {path} is open to others (mode {mode:04o}): "
                         f"`chmod 600 {path}` (and chown it to the user that runs the service)")


def load_secret(path: Path) -> Tuple[bytes, bytes]:
    """(public, secret) from a `.key_secret` file, its mode checked first."""
    _check_secret_mode(path)
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise CurveError(f"cannot load the CURVE secret key {path}: {e}") from None
    if not secret:
        raise CurveError(f"{path} holds no secret key (is it a .key file?)")
    return public, secret


def load_public(path: Path) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise CurveError(f"cannot load the CURVE public key {path}: {e}") from None
    return public


def clients_dir(keys_dir: Path) -> Path:
    """DIR/clients, refused when it is missing or others may write to it."""
    d = keys_dir / CLIENTS_DIR
    try:
        mode = stat.S_IMODE(d.stat().st_mode)
    except OSError as e:
        raise CurveError(f"cannot read the allowed client keys in {d}: {e.strerror or e}") from None
    if mode & 0o022:
        raise CurveError(f"{d} may be written by others (mode {mode:04o}): whoever writes there decides who "
                         f"may connect; `chmod 755 {d}`")
    return d


def make_keys(keys_dir: Path, clients: List[str], force: bool = False) -> List[Path]:
    """The server keypair (kept if present, unless `force`) and one keypair per client name,
    each client's public key copied to DIR/clients/. Secret keys 0600. Returns the files written."""
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    (keys_dir / CLIENTS_DIR).mkdir(exist_ok=True, mode=0o755)
    written: List[Path] = []
    for name in [SERVER, *clients]:
        secret = keys_dir / f"{name}.key_secret"
        if secret.exists() and not force:
            logger.info("%s exists: kept", secret)
        else:
            for f in (secret, keys_dir / f"{name}.key"):
                if f.exists():
                    f.unlink()
            old = os.umask(0o077)  # the secret is never readable by others, not even briefly
            try:
                zmq.auth.create_certificates(str(keys_dir), name)
            finally:
                os.umask(old)
            os.chmod(secret, 0o600)
            os.chmod(keys_dir / f"{name}.key", 0o644)
            written += [keys_dir / f"{name}.key", secret]
        if name != SERVER:
            allowed = keys_dir / CLIENTS_DIR / f"{name}.key"
            shutil.copyfile(keys_dir / f"{name}.key", allowed)
            os.chmod(allowed, 0o644)
            written.append(allowed)
    return written


# --- the client side ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientKeys:
    public: bytes
    secret: bytes
    server: bytes  # the daemon's public key (default; per endpoint in `ClientPolicy.servers`)


@dataclass(frozen=True)
class ClientPolicy:
    keys: Optional[ClientKeys] = None
    servers: Tuple[Tuple[str, bytes], ...] = ()  # (endpoint, server public key) overrides
    allow_plain_tcp: bool = False


_policy = ClientPolicy()


def client_policy(curve_dir: str, client: str, allow_plain_tcp: bool,
                  server_keys: Dict[str, str]) -> ClientPolicy:
    """The policy a config describes (keys loaded and checked now). `server_keys`: endpoint ->
    public key file for daemons whose key is not curve_dir/server.key."""
    keys = None
    if curve_dir:
        d = Path(curve_dir)
        public, secret = load_secret(d / f"{client}.key_secret")
        keys = ClientKeys(public, secret, load_public(d / f"{SERVER}.key"))
    servers = tuple((ep, load_public(Path(f))) for ep, f in server_keys.items() if f)
    return ClientPolicy(keys, servers, allow_plain_tcp)


def configure_clients(cfg: "Config") -> None:
    """Set this process's client policy from a loaded Config (its `cluster` section); CurveError
    when a key is missing or open to others."""
    c = cfg.cluster
    overrides: Dict[str, str] = {}
    for d in c.daemons:
        if d.server_key:
            overrides[d.asr] = overrides[d.tts] = d.server_key
    policy = client_policy(c.curve_dir, c.curve_client, c.allow_plain_tcp, overrides)
    endpoints = [ep for d in c.daemons for ep in (d.asr, d.tts)] or [cfg.daemon.endpoint(w) for w in ("asr", "tts")]
    for ep in endpoints:  # refused now, at start, rather than at the first connect
        _check_plain(policy, ep)
    set_policy(policy)


def set_policy(policy: ClientPolicy) -> None:
    global _policy
    _policy = policy


def _check_plain(p: ClientPolicy, endpoint: str) -> None:
    """CurveError for plain tcp:// to a non-loopback address that the policy does not allow."""
    if p.keys is None and endpoint.startswith("tcp://") and not is_loopback(endpoint) and not p.allow_plain_tcp:
        raise CurveError(f"plain tcp:// to {endpoint} (not loopback) is refused: set cluster.curve_dir "
                         "(keys from `s2s-ctl keys`) or, on a trusted network, cluster.allow_plain_tcp: true")


def secure_client(sock: zmq.Socket, endpoint: str) -> None:
    """Before `sock.connect(endpoint)`: CURVE keys on a tcp:// endpoint when configured;
    CurveError for plain tcp:// to a non-loopback address that is not allowed."""
    if not endpoint.startswith("tcp://"):
        return
    p = _policy
    if p.keys is None:
        _check_plain(p, endpoint)
        return
    server = dict(p.servers).get(endpoint, p.keys.server)
    sock.curve_serverkey = server
    sock.curve_publickey = p.keys.public
    sock.curve_secretkey = p.keys.secret
