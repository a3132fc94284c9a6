"""s2s-ctl: talk to a running speech daemon.

    s2s-ctl [--config FILE | --asr EP --tts EP] health [--json] [--strict]   (every cluster.daemons entry)
    s2s-ctl transcribe FILE [--lang zh] [--stream] [--json]   (WAV, MP3, OGG, FLAC, ...: any PyAV reads)
    s2s-ctl speak TEXT -o out.wav [--lang zh] [--speed 1.0]
    s2s-ctl sessions   (every cluster.daemons entry's)
    s2s-ctl keys [--dir /etc/s2s/curve] [--client NAME ...] [--force]   (CURVE keys for tcp://)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from daemon.wire import protocol as P
from daemon.wire.client import ASRClient, DaemonError, TTSClient
from daemon.rules import LANGUAGES

DEFAULT_KEYS_DIR = "/etc/s2s/curve"
CHUNK_SECONDS = 0.1
# Without --stream, audio is sent ahead of the daemon by at most this much (ack flow control).
WINDOW_SECONDS = 10.0


def _daemons(args: argparse.Namespace) -> List[Dict[str, str]]:
    """The daemons to talk to, each {"asr": EP, "tts": EP}: --asr/--tts when given; else the
    config's `cluster.daemons` when it lists several, else its daemon.asr_endpoint/tts_endpoint."""
    found: List[Dict[str, str]] = [{}]
    if not (args.asr and args.tts):
        from daemon.config import ConfigError, load_config

        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            raise SystemExit(f"s2s-ctl: config error: {e}")
        found = ([{"asr": d.asr, "tts": d.tts} for d in cfg.cluster.daemons] if cfg.cluster.daemons
                 else [{"asr": cfg.daemon.endpoint("asr"), "tts": cfg.daemon.endpoint("tts")}])
        from daemon.wire.curve import CurveError, configure_clients

        try:
            configure_clients(cfg)  # CURVE keys for tcp:// daemons (cluster.curve_dir)
        except CurveError as e:
            raise SystemExit(f"s2s-ctl: {e.message}")
    if args.asr or args.tts:  # an endpoint on the command line names one daemon
        found = [{**found[0], **{k: v for k, v in (("asr", args.asr), ("tts", args.tts)) if v}}]
    return found


def _engine_lines(kind: str, raw: Any) -> List[str]:
    from daemon.engines import EngineInfo, SchemaError

    try:
        e = EngineInfo.from_dict(raw)
    except SchemaError as err:  # say what arrived rather than crash on it
        return [f"{kind:8s} (unexpected engine info: {err}) {json.dumps(raw, ensure_ascii=False, default=str)}"]
    caps = e.capabilities
    flags = [n for n in ("partials", "hotwords", "punctuation", "streaming") if getattr(caps, n)]
    lines = [f"{kind:8s} engine={e.engine}{' (FAKE, tests only)' if e.fake else ''} device={e.device} "
             f"(requested {e.requested_device}) dtype={e.dtype} rate={e.sample_rate} loaded={e.loaded}",
             f"{'':8s} capabilities: {' '.join(flags) or 'none'}; languages {','.join(caps.languages) or '-'}"]
    if kind == "asr":
        lines[-1] += f"; sessions {e.sessions}/{e.max_sessions or '-'}"
    for role, path in e.models.items():
        lines.append(f"{'':8s} model {role}: {path}")
    details = {k: v for k, v in e.details.items() if v is not None}
    if details:
        lines.append(f"{'':8s} " + " ".join(f"{k}={v}" for k, v in details.items()))
    for note in e.notes:
        lines.append(f"{'':8s} note: {note}")
    return lines


def _table(info: Dict[str, Any]) -> str:
    """The daemon's describe() as text. Never raises on an unexpected shape: shows it instead."""
    from daemon.engines import Fallback, SchemaError

    raw = info.get("daemon")
    d: Dict[str, Any] = raw if isinstance(raw, dict) else {}
    uptime = d.get("uptime")
    lines = [f"daemon   v{d.get('version')} protocol {d.get('protocol')} pid {d.get('pid')} "
             f"uptime {uptime:.0f}s healthy={d.get('healthy')}" if isinstance(uptime, (int, float))
             else f"daemon   {json.dumps(d, ensure_ascii=False, default=str)}"]
    for kind in ("asr", "tts"):
        lines += _engine_lines(kind, info.get(kind))
    for name, label in (("capabilities", "caps"), ("queues", "queues")):
        v = info.get(name)
        if isinstance(v, dict):
            lines.append(f"{label:8s} " + " ".join(f"{k}={v2}" for k, v2 in v.items()))
    fbs = info.get("fallbacks") or []
    if not fbs:
        lines.append("fallback none")
    for raw in fbs if isinstance(fbs, list) else [fbs]:
        try:
            lines.append("fallback " + Fallback.from_dict(raw).line())
        except SchemaError as err:
            lines.append(f"fallback (unexpected shape: {err}) {json.dumps(raw, ensure_ascii=False, default=str)}")
    return "\n".join(lines)


def fallback_count(info: Dict[str, Any]) -> int:
    fbs = info.get("fallbacks")
    return len(fbs) if isinstance(fbs, list) else 0


def _health_one(eps: Dict[str, str], timeout: float) -> Dict[str, Any]:
    """Ping and describe one daemon's two sockets: {"asr": {...}, "tts": {...}}."""
    out: Dict[str, Any] = {}
    for kind in ("asr", "tts"):
        with (ASRClient if kind == "asr" else TTSClient)(eps[kind], timeout=timeout) as c:
            try:
                rtt = c.ping()
                out[kind] = {"endpoint": eps[kind], "rtt_ms": round(rtt * 1000, 2), "info": c.describe()}
            except DaemonError as e:
                out[kind] = {"endpoint": eps[kind], "error": e.code.value, "message": str(e)}
    return out


def cmd_health(args: argparse.Namespace, daemons: List[Dict[str, str]]) -> int:
    """Exit 0 when both sockets of every daemon answer (fallbacks are reported, not failures); 1
    when one does not; with --strict, 1 as well when any fallback was taken. Several daemons
    (cluster.daemons): each one in turn, and the JSON is {"daemons": [one daemon's answer, ...]}."""
    answers = [_health_one(eps, args.timeout) for eps in daemons]
    rc, fallbacks = 0, 0
    for out in answers:
        if any("error" in out[k] for k in ("asr", "tts")):
            rc = 1
        info = next((out[k]["info"] for k in ("asr", "tts") if "info" in out[k]), None)
        fallbacks += fallback_count(info) if isinstance(info, dict) else 0
    if args.strict and fallbacks and rc == 0:
        rc = 1
    if args.json:
        print(json.dumps(answers[0] if len(answers) == 1 else {"daemons": answers}, ensure_ascii=False, indent=2))
        return rc
    for i, out in enumerate(answers):
        if len(answers) > 1:
            print(f"== daemon {i} (cluster.daemons[{i}])")
        for kind in ("asr", "tts"):
            o = out[kind]
            if "error" in o:
                print(f"{kind}: {o['endpoint']}: {o['error']}: {o['message']}")
            else:
                print(f"{kind}: {o['endpoint']} (ping {o['rtt_ms']} ms)")
        info = next((out[k]["info"] for k in ("asr", "tts") if "info" in out[k]), None)
        if isinstance(info, dict):
            print(_table(info))
    if len(answers) > 1:
        up = sum(all("error" not in out[k] for k in ("asr", "tts")) for out in answers)
        print(f"{up} of {len(answers)} daemons answer")
    if args.strict and fallbacks:
        sys.stderr.write(f"s2s-ctl: --strict: {fallbacks} fallback(s) taken\n")
    return rc


def _fmt(m: P.Message) -> Optional[str]:
    if isinstance(m, P.Final):
        return f"final   {m.start:7.2f} {m.end:7.2f}  {m.text}" if m.text else None
    if isinstance(m, P.Partial):
        return f"partial {m.start:7.2f} {m.end:7.2f}  {m.text}"
    if isinstance(m, P.Error):
        return f"error   {m.code}: {m.message}"
    return None


def cmd_transcribe(args: argparse.Namespace, eps: Dict[str, str]) -> int:
    from daemon.audio import float_to_pcm16, read_audio
    from daemon.errors import AudioError

    sr = P.ASR_SAMPLE_RATE
    try:
        x = read_audio(args.file, sr)
    except AudioError as e:  # one line: the file and the problem
        print(f"s2s-ctl: transcribe: {e}", file=sys.stderr)
        return 2
    pcm = float_to_pcm16(x)
    step = int(sr * CHUNK_SECONDS) * 2
    events: List[P.Message] = []

    def show(ms: List[P.Message]) -> None:
        for m in ms:
            events.append(m)
            line = None if args.json else _fmt(m)
            if line and (args.stream or not isinstance(m, P.Partial)):
                print(line, flush=True)

    c = ASRClient(eps["asr"], timeout=args.timeout)
    with c:
        try:
            s = c.open(language=args.lang, sample_rate=sr, partials=args.stream)
        except DaemonError as e:
            print(f"s2s-ctl: open failed: {e.code.value}: {e}", file=sys.stderr)
            return 1
        t0 = time.monotonic()
        window = max(1, int(WINDOW_SECONDS / CHUNK_SECONDS))
        acked = -1
        for i, off in enumerate(range(0, len(pcm), step)):
            if args.stream:
                # Real time: chunk i is due at i * 100 ms.
                delay = t0 + i * CHUNK_SECONDS - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            want_ack = not args.stream and i % 10 == 9
            seq = s.send(pcm[off:off + step], ack=want_ack)
            if want_ack and seq - window > acked:
                # Far enough ahead: wait for an older chunk's ack before sending more.
                show(s.wait_ack(seq - window // 2, timeout=args.timeout))
                acked = seq - window // 2
            show(s.poll(0))
        try:
            show(s.finalize(timeout=args.timeout))
        except DaemonError as e:
            print(f"s2s-ctl: {e.code.value}: {e}", file=sys.stderr)
            return 1
    finals = [m for m in events if isinstance(m, P.Final) and m.text]
    if args.json:
        print(json.dumps([m.header() for m in events if not isinstance(m, P.Ack)], ensure_ascii=False, indent=1))
    errors = [m for m in events if isinstance(m, P.Error)]
    return 1 if errors and not finals else 0


def cmd_speak(args: argparse.Namespace, eps: Dict[str, str]) -> int:
    from daemon.audio import write_wav

    c = TTSClient(eps["tts"], timeout=args.timeout)
    with c:
        try:
            t0 = time.monotonic()
            first = None
            chunks, rate = [], 24000
            for chunk in c.synthesize(args.text, language=args.lang, speed=args.speed):
                first = first if first is not None else time.monotonic() - t0
                chunks.append(chunk.pcm)
                rate = chunk.sample_rate
        except DaemonError as e:
            print(f"s2s-ctl: {e.code.value}: {e}", file=sys.stderr)
            return 1
    pcm = b"".join(chunks)
    write_wav(args.output, pcm, rate)
    print(f"wrote {args.output}: {len(pcm) / 2 / rate:.2f} s at {rate} Hz, first audio after "
          f"{(first or 0) * 1000:.0f} ms, total {(time.monotonic() - t0) * 1000:.0f} ms")
    return 0


def cmd_sessions(args: argparse.Namespace, daemons: List[Dict[str, str]]) -> int:
    """Every daemon's live ASR sessions (with several daemons, each row says which)."""
    rows: List[Dict[str, Any]] = []
    rc = 0
    for i, eps in enumerate(daemons):
        with ASRClient(eps["asr"], timeout=args.timeout) as c:
            try:
                info = c.describe()
            except DaemonError as e:
                sys.stderr.write(f"s2s-ctl: {eps['asr']}: {e.code.value}: {e}\n")
                rc = 1
                continue
        rows += [{**s, "daemon": eps["asr"]} if len(daemons) > 1 else s for s in info.get("sessions", [])]
    if rc and not rows:
        return rc
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return rc
    print(f"{len(rows)} session(s)")
    for s in rows:
        where = f" on {s['daemon']}" if "daemon" in s else ""
        print(f"{s['session_id']:34s} lang={s['language']} rate={s['sample_rate']} age={s['age']:.1f}s "
              f"idle={s['idle']:.1f}s backlog={s['backlog_seconds']:.1f}s{where}")
    return rc


def cmd_keys(args: argparse.Namespace) -> int:
    """The CURVE keys of daemon/wire/curve.py: the daemon's keypair (kept when present) and one
    keypair per client, its public key admitted in DIR/clients/."""
    from daemon.wire.curve import make_keys

    written = make_keys(Path(args.dir), args.client or ["client"], force=args.force)
    for f in written:
        print(f"wrote {f}")
    print(f"daemon: cluster.curve_dir: {args.dir} (reads server.key_secret, admits clients/*.key; "
          f"chown the secret to the daemon's user). Front ends: the same directory with server.key and "
          f"their NAME.key + NAME.key_secret (cluster.curve_client).")
    return 0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="s2s-ctl", description="talk to a running s2s speech daemon")
    p.add_argument("--config", help="config file naming the endpoints (default: as s2s-speechd)")
    p.add_argument("--asr", help="ASR endpoint, e.g. ipc:///run/s2s/asr.sock (overrides the config)")
    p.add_argument("--tts", help="TTS endpoint (overrides the config)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a reply")
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("health", help="ping both sockets and print the daemon's info")
    h.add_argument("--json", action="store_true")
    h.add_argument("--strict", action="store_true", help="exit 1 when the daemon runs on any fallback")
    t = sub.add_parser("transcribe", help="transcribe an audio file (WAV, MP3, OGG, FLAC, Opus, M4A, ...: "
                                          "decoded by PyAV, sent as 16 kHz mono); exit 2 if it cannot be read")
    t.add_argument("file")
    t.add_argument("--lang", choices=LANGUAGES, default=None)
    t.add_argument("--stream", action="store_true", help="send in real time and show partials")
    t.add_argument("--json", action="store_true", help="print every event as JSON")
    s = sub.add_parser("speak", help="synthesise TEXT into a WAV file")
    s.add_argument("text")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--lang", default=None)
    s.add_argument("--speed", type=float, default=None)
    ss = sub.add_parser("sessions", help="list live ASR sessions")
    ss.add_argument("--json", action="store_true")
    k = sub.add_parser("keys", help="make CURVE keys for tcp:// daemons (cluster.curve_dir)")
    k.add_argument("--dir", default=DEFAULT_KEYS_DIR, help=f"keys directory (default {DEFAULT_KEYS_DIR})")
    k.add_argument("--client", action="append", help="a client keypair to make and admit (default: client); "
                                                      "repeatable")
    k.add_argument("--force", action="store_true", help="replace existing keypairs (clients must get the new ones)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.cmd == "keys":
        return cmd_keys(args)
    daemons = _daemons(args)
    if args.cmd == "health":
        return cmd_health(args, daemons)
    if args.cmd == "sessions":
        return cmd_sessions(args, daemons)
    # one request: the first daemon (with several, placement is the front ends' job)
    return {"transcribe": cmd_transcribe, "speak": cmd_speak}[args.cmd](args, daemons[0])


if __name__ == "__main__":
    sys.exit(main())
