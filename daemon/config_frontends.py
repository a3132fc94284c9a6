"""The front ends' sections of the one config file: `bridge` (the browser bridge), `wyoming`
(s2s-wyoming), `openai_api` (s2s-openai), `agent` (the LLM the bridge asks) and `cluster`
(several daemons, CURVE over tcp://). Plain frozen
dataclasses; daemon/config.py builds and validates them with the rest of the file, and
etc/s2s.yaml documents every key."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class BridgeConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    # Origins allowed to open the websocket; empty = same host as the page only.
    allowed_origins: Tuple[str, ...] = ()
    # Optional bearer token (query ?token= or the `start` message). Empty = no auth.
    token: str = ""
    max_connections: int = 16
    max_message_bytes: int = 1 << 20
    # Outgoing data queued per connection (bytes); a browser that leaves it full for
    # slow_client_timeout seconds is closed with 1008 "client too slow".
    send_queue_bytes: int = 4 << 20
    slow_client_timeout: float = 5.0
    # Edge limits (each is an `error` event the page shows and a /metrics counter).
    max_connections_per_ip: int = 8      # per network: an IPv4 address, an IPv6 /64, loopback as one
    login_timeout: float = 10.0          # seconds to send the token (when one is configured)
    max_pending_logins: int = 16         # connections not logged in yet (apart from max_connections)
    audio_burst_seconds: float = 10.0    # audio a connection may send ahead of real time, then at
    max_audio_speed: float = 2.0         # most this many times real time (the excess: `busy`)
    idle_timeout: float = 300.0          # seconds without a message from the browser
    max_turns_per_minute: int = 20       # agent turns (typed or spoken) per connection
    max_reply_chars: int = 4000          # agent reply cut here (agent_done truncated)
    max_reply_tokens: int = 1024         # `max_tokens` sent to an OpenAI-compatible agent
    reply_timeout: float = 120.0         # longest whole agent reply, seconds
    # https/wss when both are set (browsers give the microphone only to a secure context).
    tls_cert: str = ""
    tls_key: str = ""


@dataclass(frozen=True)
class WyomingConfig:
    # s2s-wyoming (bridge/wyoming); one port number for both serves ASR and TTS on one port.
    host: str = "127.0.0.1"
    asr_port: int = 10300
    tts_port: int = 10200
    max_connections: int = 16


@dataclass(frozen=True)
class OpenAIAPIConfig:
    # s2s-openai (bridge/openai_api); api_key: an optional bearer key, required off loopback.
    host: str = "127.0.0.1"
    port: int = 8766
    api_key: str = ""
    max_upload_bytes: int = 25 << 20  # OpenAI's own limit
    max_concurrent_requests: int = 16


@dataclass(frozen=True)
class AgentConfig:
    kind: str = "langgraph"
    url: str = "http://127.0.0.1:8000"
    assistant_id: str = "agent"
    # OpenAI-compatible only.
    model: str = ""
    api_key: str = ""
    timeout: float = 30.0
    # Used by scripts/start-s2s.sh: fall back to the built-in echo agent when the
    # configured one does not answer.
    fallback_echo: bool = True


@dataclass(frozen=True)
class DaemonEndpoints:
    # One speech daemon the front ends may place sessions on (a `cluster.daemons` entry).
    asr: str = ""
    tts: str = ""
    # Its CURVE public key file when it is not cluster.curve_dir's server.key (another host's).
    server_key: str = ""


@dataclass(frozen=True)
class ClusterConfig:
    # The daemons the front ends place sessions on; empty: daemon.asr_endpoint/tts_endpoint alone.
    daemons: Tuple[DaemonEndpoints, ...] = ()
    # Directory of CURVE keys made by `s2s-ctl keys` (daemon/wire/curve.py); empty: no CURVE.
    curve_dir: str = ""
    # The front ends' keypair in curve_dir (NAME.key, NAME.key_secret).
    curve_client: str = "client"
    # tcp:// on a non-loopback address without CURVE: refused unless true.
    allow_plain_tcp: bool = False

    def problem(self) -> "Tuple[str, str] | None":
        """(key, why) for the first invalid value, or None (daemon/config.py raises it)."""
        for i, d in enumerate(self.daemons):
            for which in ("asr", "tts"):
                ep = getattr(d, which)
                if not re.match(r"^(ipc|tcp)://.+", ep):
                    return f"cluster.daemons[{i}].{which}", f"{ep!r} is not an ipc:// or tcp:// endpoint"
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", self.curve_client):
            return "cluster.curve_client", f"{self.curve_client!r} is not a key name (letters, digits, _ . -)"
        return None
