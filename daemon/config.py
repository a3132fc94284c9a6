"""Configuration: commented YAML loaded into frozen dataclasses.

Validation is cheap and separate from model loading: `load_config()` checks types,
unknown keys, device strings and required model paths and raises `ConfigError` with
one line naming the file and the key. Nothing here imports torch or touches a model.

Environment overrides (the seed's, and no others): ASR_ENGINE, TTS_ENGINE, ASR_DEVICE,
TTS_DEVICE; S2S_CONFIG names the file; S2S_MODELS overrides `models_root`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import yaml

from daemon.config_frontends import AgentConfig, BridgeConfig, ClusterConfig, OpenAIAPIConfig, WyomingConfig
from daemon.errors import S2SError
from daemon.rules import LANGUAGES, SPOKEN_LANGUAGES, check_speed, clean_hotwords

DEFAULT_CONFIG_PATHS = ("/etc/s2s/s2s.yaml",)
REPO_CONFIG = Path(__file__).resolve().parent.parent / "etc" / "s2s.yaml"

_DEVICE_RE = re.compile(r"^(cpu|auto|cuda|cuda:\d+)$")
ENV_OVERRIDES = {
    "ASR_ENGINE": ("asr", "engine"),
    "TTS_ENGINE": ("tts", "engine"),
    "ASR_DEVICE": ("asr", "device"),
    "TTS_DEVICE": ("tts", "device"),
}


class ConfigError(ValueError):
    """A config file that cannot be used; the message is one line naming file and key."""

    def __init__(self, key: str, message: str, source: str = "<config>"):
        self.key = key
        self.source = source
        super().__init__(f"{source}: {key}: {message}")


def valid_device(value: str) -> bool:
    return bool(_DEVICE_RE.match(value))


# --- sections -------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonConfig:
    # Directory for the IPC socket files; systemd's RuntimeDirectory= sets
    # $RUNTIME_DIRECTORY, which wins when the file leaves this empty.
    runtime_dir: str = ""
    asr_endpoint: str = "ipc://{runtime_dir}/asr.sock"
    tts_endpoint: str = "ipc://{runtime_dir}/tts.sock"
    # Octal file mode for ipc:// socket files, as a string ("0660").
    socket_mode: str = "0660"
    drain_timeout: float = 5.0
    # Refuse to start instead of falling back to bundled models when weights are absent.
    strict: bool = False
    # High-water mark (messages) on each ROUTER socket.
    hwm: int = 1000

    @property
    def socket_mode_bits(self) -> int:
        return int(self.socket_mode.replace("0o", ""), 8)

    def resolved_runtime_dir(self) -> str:
        return self.runtime_dir or os.environ.get("RUNTIME_DIRECTORY", "") or "/run/s2s"

    def endpoint(self, which: str) -> str:
        template = self.asr_endpoint if which == "asr" else self.tts_endpoint
        return template.replace("{runtime_dir}", self.resolved_runtime_dir().split(":")[0])


@dataclass(frozen=True)
class FunASRModels:
    paraformer: str = "paraformer-large"
    vad: str = "fsmn-vad"
    punc: str = "ct-punc"
    # Optional: streaming Paraformer for 2-pass partials. Empty = no partials.
    streaming: str = ""
    quantize: str = "auto"  # full-size models on the CPU: auto int8 (as FunASR's CPU runtime), partials, off


@dataclass(frozen=True)
class WhisperModels:
    model: str = "whisper-base"
    compute_type: str = "int8"
    beam_size: int = 5  # measured best on s2s's Mandarin and English sets (BENCHMARKS.md)
    partial_interval: float = 1.0  # seconds of new speech between partial decodes; 0: none
    # fsmn-vad directory used for endpointing (same VAD as FunASR).
    vad: str = "fsmn-vad"


@dataclass(frozen=True)
class ASRConfig:
    engine: str = "funasr"
    device: str = "cuda:1"
    # auto: float16 on CUDA (never bfloat16 below compute 8.0), float32 on CPU.
    dtype: str = "auto"
    language: str = "zh"
    hotwords: Tuple[str, ...] = ()
    partials: bool = True
    # Seconds of speech between partials when a streaming model is configured.
    partial_interval: float = 0.6
    funasr: FunASRModels = field(default_factory=FunASRModels)
    whisper: WhisperModels = field(default_factory=WhisperModels)
    # Engine used when the selected engine's weights are absent (unless daemon.strict).
    fallback_engine: str = "whisper"
    # CPU threads for CPU inference; 0: each engine's measured best (daemon/devices.AUTO_THREADS).
    ncpu: int = 0


@dataclass(frozen=True)
class MeloModels:
    # config.json + checkpoint.pth
    model: str = "melo-zh"
    # HF_HOME holding the BERT tokenizers/models melo reaches for.
    hf_home: str = "hf"
    nltk_data: str = "nltk_data"


@dataclass(frozen=True)
class PiperModels:
    voice: str = "piper/en_US-joe-medium.onnx"


@dataclass(frozen=True)
class KokoroModels:
    # Directory with kokoro-v1.0.int8.onnx, vocab.json and voices.npz (s2s-models bundled).
    model: str = "kokoro"
    # A voice in voices.npz (s2s-models list; bundled: the Mandarin ones from npm kokoro-js, measured).
    voice: str = "zm_yunxi"
    # English words inside Mandarin: auto (am_adam / af_heart by gender), a voice, "" (the voice).
    english_voice: str = "auto"
    # The voice's own rate, multiplied by tts.speed or a request's speed.
    speed: float = 1.0
    threads: int = 0  # intra-op threads (onnxruntime, OpenVINO); 0 = one per CPU core, at most 4
    runtime: str = "auto"  # or onnxruntime, openvino: daemon/tts/kokoro_runtime.py says which runs where


@dataclass(frozen=True)
class TTSConfig:
    engine: str = "melo"
    device: str = "cuda:1"
    fallback_device: str = "cpu"
    language: str = "ZH"
    speed: float = 1.0
    sample_rate: int = 24000
    melo: MeloModels = field(default_factory=MeloModels)
    piper: PiperModels = field(default_factory=PiperModels)
    kokoro: KokoroModels = field(default_factory=KokoroModels)
    # kokoro+piper: Kokoro speaks Chinese and mixed text, Piper English-only text (per request).
    fallback_engine: str = "kokoro+piper"


@dataclass(frozen=True)
class TurnConfig:
    # Silence in an utterance before it is decoded so far (`tentative`); < the VAD's 0.8 s; 0 = never.
    early_silence: float = 0.3
    # The bridge starts the agent and the first sentence's synthesis on a tentative, held until the
    # final: released when the texts match, cancelled when they do not.
    speculate: bool = True
    # At that early silence, speech the punctuation model judges a whole sentence gets its final at
    # once; speech that stops mid-phrase waits for the VAD's end silence (tentative sessions).
    sentence_end: bool = True
    # The turn judge at that early silence (daemon/asr/turn_judge.py): Smart Turn, the engine's text
    # signal, the words; complete -> final now, unfinished -> wait up to max_silence, else the VAD.
    judge: bool = False
    smart_turn: str = "smart-turn/smart-turn-v3.2-cpu.onnx"
    max_silence: float = 2.0
    judge_complete: float = 0.99
    judge_with_text: float = 0.5
    judge_unfinished: float = 0.0
    judge_text_end: float = 0.45  # an engine's P(sentence ends) (Whisper, asr/end_mark.py): it ended
    judge_text_unfinished: float = 0.02  # ... under this: it goes on (held like unfinished words)


@dataclass(frozen=True)
class LimitsConfig:
    max_sessions: int = 32
    idle_timeout: float = 60.0
    max_utterance_seconds: float = 30.0
    max_text_chars: int = 2000
    max_tts_queue: int = 32
    # TTS requests one (peer, owner) may have queued; more get `busy` (that owner only).
    max_tts_queue_per_owner: int = 8
    # Streamed text (synthesize stream_text): chunks one request may take, chunks a second (its
    # burst is one second's worth), seconds without a chunk or audio before it is ended (timeout).
    max_text_chunks: int = 4096
    max_text_chunks_per_second: float = 100.0
    text_idle_timeout: float = 60.0
    # Longest audio accepted in one ASR `audio` message, in seconds.
    max_chunk_seconds: float = 2.0
    # ASR admission: `open` answers `busy` while any session is this many seconds behind real
    # time (the worker is past capacity; one more stream would make everyone later).
    max_asr_lag: float = 2.0
    # A session this far behind real time has its audio refused with `busy` (dropped) until it
    # is back within max_asr_lag, instead of queueing ever later finals.
    max_session_lag: float = 6.0
    # ASR admission by predicted cost: `busy` when one more real-time stream is predicted to load
    # the ASR worker past this fraction of its time (asr/load.py); 0: off (the lag rule holds).
    max_asr_load: float = 0.9
    # What one real-time stream is taken to cost (worker seconds per second) before the
    # daemon has measured any; measured figures replace it.
    asr_stream_cost: float = 0.0225


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    format: str = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class Config:
    models_root: str = "/var/lib/s2s/models"
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    asr: ASRConfig = field(default_factory=ASRConfig)
    tts: TTSConfig = field(default_factory=TTSConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    wyoming: WyomingConfig = field(default_factory=WyomingConfig)
    openai_api: OpenAIAPIConfig = field(default_factory=OpenAIAPIConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    turn: TurnConfig = field(default_factory=TurnConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "<defaults>"
    overrides: Tuple[str, ...] = ()

    def model_path(self, relative: str) -> Path:
        """Resolve a model path from the config: absolute stays, relative is under models_root."""
        p = Path(os.path.expanduser(relative))
        return p if p.is_absolute() else Path(self.models_root) / p


# --- allowed values -----------------------------------------------------------------

CHOICES = {
    "asr.engine": ("funasr", "whisper"),
    "asr.fallback_engine": ("whisper", "funasr", "none"),
    "asr.dtype": ("auto", "float16", "float32"),
    "asr.language": LANGUAGES,
    "asr.whisper.compute_type": ("int8", "int8_float16", "float16", "float32", "default"),
    "asr.funasr.quantize": ("auto", "partials", "off"),
    "tts.engine": ("melo", "kokoro", "piper", "kokoro+piper"),
    "tts.fallback_engine": ("kokoro+piper", "kokoro", "piper", "melo", "none"),
    "tts.kokoro.runtime": ("auto", "onnxruntime", "openvino"),
    "tts.language": tuple(lang.upper() for lang in SPOKEN_LANGUAGES),
    "agent.kind": ("langgraph", "openai", "echo"),
    "logging.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}
DEVICE_KEYS = ("asr.device", "tts.device", "tts.fallback_device")
POSITIVE = (
    "daemon.drain_timeout", "daemon.hwm", "asr.partial_interval",
    "tts.sample_rate", "bridge.max_connections", "bridge.max_message_bytes", "agent.timeout",
    "bridge.send_queue_bytes", "bridge.slow_client_timeout", "bridge.max_connections_per_ip",
    "bridge.login_timeout", "bridge.idle_timeout", "bridge.max_turns_per_minute", "bridge.max_reply_chars",
    "bridge.max_reply_tokens", "bridge.reply_timeout", "bridge.max_pending_logins",
    "bridge.audio_burst_seconds", "bridge.max_audio_speed",
    "limits.max_sessions", "limits.idle_timeout", "limits.max_utterance_seconds",
    "limits.max_text_chars", "limits.max_tts_queue", "limits.max_tts_queue_per_owner", "limits.max_chunk_seconds",
    "limits.max_text_chunks", "limits.max_text_chunks_per_second", "limits.text_idle_timeout",
    "limits.max_asr_lag", "limits.max_session_lag", "limits.asr_stream_cost",
    "wyoming.max_connections", "openai_api.max_upload_bytes", "openai_api.max_concurrent_requests",
    "asr.whisper.beam_size", "tts.kokoro.speed",
)


# Defaults of what a request may also carry: each passes the request's own rule (daemon/rules.py)
# and is stored as the rule returns it, so a bad default fails config load or SIGHUP, not every
# request that would have used it.
REQUEST_RULES: Dict[str, Callable[[Any], Any]] = {
    "tts.speed": check_speed,
    "asr.hotwords": lambda words: tuple(clean_hotwords(words)),
}


# --- loading ------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__}", source)
        return _build(tp, value, key, source)
    if origin in (tuple, Tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {type(value).__name__}", source)
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is typing.Union:  # Optional[...]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key, source)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}", source)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}", source)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}", source)
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}", source)
        return value
    raise ConfigError(key, f"unsupported type {_type_name(tp)}", source)  # pragma: no cover


def _build(cls: Any, data: Mapping[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name not in ("source", "overrides")}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(key, "unknown key", source)
        kwargs[k] = _coerce(v, hints[k], key, source)
    return cls(**kwargs)


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _apply_request_rules(cfg: Config) -> Config:
    for key, rule in REQUEST_RULES.items():
        section, name = key.split(".")
        try:
            value = rule(_get(cfg, key))
        except S2SError as e:
            raise ConfigError(key, e.message, cfg.source) from None
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
    return cfg


def _validate(cfg: Config) -> None:
    src = cfg.source
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(key, f"{value!r} is not one of {', '.join(choices)}", src)
    for key in DEVICE_KEYS:
        value = _get(cfg, key)
        if not valid_device(value):
            raise ConfigError(key, f"{value!r} is not a device (use cpu, auto, cuda or cuda:N)", src)
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(key, "must be greater than zero", src)
    if not re.match(r"^(0o?)?[0-7]{3}$", cfg.daemon.socket_mode):
        raise ConfigError("daemon.socket_mode", f"{cfg.daemon.socket_mode!r} is not an octal mode such as \"0660\"", src)
    if not 0 < cfg.bridge.port < 65536 and cfg.bridge.port != 0:
        raise ConfigError("bridge.port", "must be a TCP port", src)
    for key in ("wyoming.asr_port", "wyoming.tts_port", "openai_api.port"):
        if not 0 <= _get(cfg, key) < 65536:
            raise ConfigError(key, "must be a TCP port (0: any free port)", src)
    if cfg.bridge.max_audio_speed < 1.0:
        raise ConfigError("bridge.max_audio_speed", "must be at least 1 (real time)", src)
    if bool(cfg.bridge.tls_cert) != bool(cfg.bridge.tls_key):
        raise ConfigError("bridge.tls_key" if cfg.bridge.tls_cert else "bridge.tls_cert",
                          "tls_cert and tls_key go together (both set, or neither)", src)
    for which in ("asr", "tts"):
        ep = _get(cfg, f"daemon.{which}_endpoint")
        if not re.match(r"^(ipc|tcp|inproc)://.+", ep):
            raise ConfigError(f"daemon.{which}_endpoint", f"{ep!r} is not a ZeroMQ endpoint", src)
    bad = cfg.cluster.problem()
    if bad:
        raise ConfigError(bad[0], bad[1], src)
    if not 8000 <= cfg.tts.sample_rate <= 48000:
        raise ConfigError("tts.sample_rate", "must be between 8000 and 48000", src)
    if not 0 <= cfg.turn.early_silence < 0.8:
        raise ConfigError("turn.early_silence", "must be at least 0 and under the VAD's 0.8 s end silence", src)
    if not 0.8 <= cfg.turn.max_silence <= 10.0:
        raise ConfigError("turn.max_silence", "must be between the VAD's 0.8 s end silence and 10 s", src)
    t = cfg.turn
    if not 0.0 <= t.judge_unfinished <= t.judge_with_text <= t.judge_complete <= 1.0:
        raise ConfigError("turn.judge_complete", "need 0 <= judge_unfinished <= judge_with_text <= "
                          "judge_complete <= 1", src)
    if not 0.0 <= t.judge_text_unfinished <= t.judge_text_end <= 1.0:
        raise ConfigError("turn.judge_text_end", "need 0 <= judge_text_unfinished <= judge_text_end <= 1", src)
    if cfg.asr.whisper.partial_interval < 0:
        raise ConfigError("asr.whisper.partial_interval", "must be 0 (no partials) or more seconds", src)
    if cfg.asr.ncpu < 0:
        raise ConfigError("asr.ncpu", "must be 0 (auto) or a number of threads", src)
    if not 0.0 <= cfg.limits.max_asr_load <= 1.0:
        raise ConfigError("limits.max_asr_load", "must be between 0 (off) and 1", src)
    if cfg.limits.max_session_lag < cfg.limits.max_asr_lag:
        raise ConfigError("limits.max_session_lag", "must be at least limits.max_asr_lag", src)
    # The selected engine must name its model paths (existence is checked at load).
    required = {"funasr": ("asr.funasr.paraformer", "asr.funasr.vad"),
                "whisper": ("asr.whisper.model",)}[cfg.asr.engine]
    required += {"melo": ("tts.melo.model",), "piper": ("tts.piper.voice",), "kokoro": ("tts.kokoro.model",),
                 "kokoro+piper": ("tts.kokoro.model", "tts.piper.voice")}[cfg.tts.engine]
    if cfg.tts.kokoro.threads < 0:
        raise ConfigError("tts.kokoro.threads", "must be 0 (one per core) or more", src)
    if not cfg.tts.kokoro.voice:
        raise ConfigError("tts.kokoro.voice", "must name a voice", src)
    for key in required:
        if not _get(cfg, key):
            raise ConfigError(key, "required by the selected engine but empty", src)
    if not cfg.models_root:
        raise ConfigError("models_root", "must not be empty", src)


def _apply_env(data: dict, env: Mapping[str, str]) -> Tuple[str, ...]:
    applied = []
    for var, (section, key) in ENV_OVERRIDES.items():
        value = env.get(var)
        if value:
            data.setdefault(section, {})
            if not isinstance(data[section], dict):
                continue  # the type error is reported by _build
            data[section][key] = value
            applied.append(f"{var}={value} -> {section}.{key}")
    if env.get("S2S_MODELS"):
        data["models_root"] = env["S2S_MODELS"]
        applied.append(f"S2S_MODELS={env['S2S_MODELS']} -> models_root")
    return tuple(applied)


def find_config_path(explicit: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> Path:
    """--config wins, then $S2S_CONFIG, then /etc/s2s/s2s.yaml, then the repo's etc/s2s.yaml."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get("S2S_CONFIG"):
        return Path(env["S2S_CONFIG"])
    for p in DEFAULT_CONFIG_PATHS:
        if Path(p).exists():
            return Path(p)
    return REPO_CONFIG


def parse_config(data: Any, source: str = "<config>", env: Optional[Mapping[str, str]] = None) -> Config:
    """Build a validated Config from parsed YAML (a mapping or None), applying env overrides."""
    env = os.environ if env is None else env
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("<top>", "the file must hold a mapping of sections", source)
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    overrides = _apply_env(data, env)
    cfg = _build(Config, data, "", source)
    cfg = _apply_request_rules(dataclasses.replace(cfg, source=source, overrides=overrides))
    _validate(cfg)
    return cfg


def load_config(path: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> Config:
    p = find_config_path(path, env)
    source = str(p)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("<file>", f"cannot read: {e.strerror or e}", source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "<yaml>"
        raise ConfigError(where, f"invalid YAML: {getattr(e, 'problem', e)}", source) from None
    return parse_config(data, source, env)


def as_dict(cfg: Config, redact: bool = True) -> dict:
    """The effective config as plain data; secrets redacted for logs and `describe`."""
    d = dataclasses.asdict(cfg)
    if redact:
        if d["bridge"]["token"]:
            d["bridge"]["token"] = "***"
        if d["agent"]["api_key"]:
            d["agent"]["api_key"] = "***"
        d["openai_api"]["api_key"] = "***" if d["openai_api"]["api_key"] else ""
    return d

