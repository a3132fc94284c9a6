#!/usr/bin/env bash
# Start the whole stack without systemd: speech daemon, wait until it answers, bridge, print the
# page URL. On a fresh clone it installs (scripts/install.sh) and assembles the bundled models
# first. Ctrl-C (or SIGTERM) stops them all: the services run in sessions of their own (setsid), so
# the terminal's Ctrl-C reaches this script alone, which stops them in order and says so.
#
# Every setting comes from the config (S2S_CONFIG, default etc/s2s.yaml); the seed's env vars
# ASR_ENGINE, TTS_ENGINE, ASR_DEVICE, TTS_DEVICE override it there (daemon/config.py), not here.
# Also: S2S_MODELS (default /var/lib/s2s/models when it exists, else ./.models), S2S_VENV (default
# ./.venv), S2S_START_TIMEOUT (seconds to wait for the daemon, default 300).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${S2S_VENV:-$ROOT/.venv}
export S2S_CONFIG="${S2S_CONFIG:-$ROOT/etc/s2s.yaml}"
if [ -z "${S2S_MODELS:-}" ]; then
  if [ -d /var/lib/s2s/models ]; then S2S_MODELS=/var/lib/s2s/models; else S2S_MODELS=$ROOT/.models; fi
fi
export S2S_MODELS
export RUNTIME_DIRECTORY="${RUNTIME_DIRECTORY:-$ROOT/.run}"
export CUDA_DEVICE_ORDER=PCI_BUS_ID
# This checkout's code, even when the venv (S2S_VENV) was installed from another checkout.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
say() { printf '\033[1m[s2s]\033[0m %s\n' "$*"; }

S2S_VENV=$VENV scripts/install.sh
# shellcheck disable=SC1091
. "$VENV/bin/activate"
mkdir -p "$RUNTIME_DIRECTORY" && chmod 0750 "$RUNTIME_DIRECTORY"
say "models: $S2S_MODELS"
if ! s2s-models bundled --out "$S2S_MODELS" >/dev/null; then
  say "the models directory has broken components:"; s2s-models verify "$S2S_MODELS" || true; exit 1
fi
s2s-speechd --check-config

pids=()
rc=0
stopping=0
cleanup() {
  trap - INT TERM EXIT
  stopping=1
  say "stopping"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    st=0
    wait "$p" 2>/dev/null || st=$?
    # 143 = ended by our own SIGTERM (128 + 15): that is the clean stop we asked for.
    if [ "$st" != 0 ] && [ "$st" != 143 ] && [ "$rc" = 0 ]; then rc=$st; fi
  done
  if [ "$rc" = 0 ]; then say "stopped cleanly"; else say "stopped; a process exited with status $rc"; fi
  exit "$rc"
}
on_signal() { cleanup; }
trap on_signal INT TERM
trap cleanup EXIT

daemon_log="$RUNTIME_DIRECTORY/s2s-speechd.log"
: > "$daemon_log"
# The daemon logs to this terminal and to $daemon_log (shown again if startup fails).
# tee ignores SIGINT so that Ctrl-C (sent to the whole terminal group) still shows the daemon's
# shutdown lines; it ends when the daemon closes its output.
setsid s2s-speechd > >(trap '' INT; exec tee -a "$daemon_log") 2>&1 &
daemon_pid=$!
pids+=("$daemon_pid")
say "waiting for the speech daemon to load its models (pid $daemon_pid)"
deadline=$((SECONDS + ${S2S_START_TIMEOUT:-300}))
health_out=""
# Ready = both sockets answer (`s2s-ctl health` exit 0); fallbacks are reported, not failures.
until health_out=$(s2s-ctl --timeout 2 health --json 2>&1); do
  if ! kill -0 "$daemon_pid" 2>/dev/null; then
    st=0; wait "$daemon_pid" || st=$?
    say "the speech daemon exited during startup with status $st; its last log lines:"
    tail -n 20 "$daemon_log" >&2
    rc=1; exit 1
  fi
  if [ $SECONDS -ge $deadline ]; then
    say "the speech daemon did not answer within ${S2S_START_TIMEOUT:-300} s. Last health check:"
    printf '%s\n' "$health_out" | tail -n 12 >&2
    say "its last log lines ($daemon_log):"
    tail -n 20 "$daemon_log" >&2
    rc=1; exit 1
  fi
  sleep 1
done
s2s-ctl health || true

agent_args=()
if ! s2s-bridge --probe-agent; then
  if python -c 'from daemon.config import load_config; import sys; sys.exit(0 if load_config().agent.fallback_echo else 1)'; then
    say "the configured agent does not answer: starting the bridge with the built-in echo agent"
    agent_args=(--agent echo)
  fi
fi
setsid s2s-bridge "${agent_args[@]}" &
pids+=($!)
# The protocol adapters beside the bridge (config sections wyoming: and openai_api:), each when
# its ports are free (a wyoming-faster-whisper already on 10300 is left alone, and said so).
port_free() { python -c 'import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], int(sys.argv[2])))' "$1" "$2" 2>/dev/null; }
read -r wy_host wy_asr wy_tts oa_host oa_port < <(python -c 'from daemon.config import load_config; c = load_config(); w, o = c.wyoming, c.openai_api; print(w.host, w.asr_port, w.tts_port, o.host, o.port)')
if port_free "$wy_host" "$wy_asr" && { [ "$wy_tts" = "$wy_asr" ] || port_free "$wy_host" "$wy_tts"; }; then
  setsid s2s-wyoming &
  pids+=($!)
  if [ "$wy_tts" = "$wy_asr" ]; then
    say "Wyoming (Home Assistant): tcp://$wy_host:$wy_asr (speech recognition and synthesis)"
  else
    say "Wyoming (Home Assistant): tcp://$wy_host:$wy_asr (speech recognition), tcp://$wy_host:$wy_tts (speech synthesis)"
  fi
else
  say "Wyoming not started: port $wy_asr or $wy_tts on $wy_host is in use (wyoming: in $S2S_CONFIG)"
fi
if port_free "$oa_host" "$oa_port"; then
  setsid s2s-openai &
  pids+=($!)
  say "OpenAI audio API: http://$oa_host:$oa_port/v1"
else
  say "OpenAI audio API not started: port $oa_port on $oa_host is in use (openai_api: in $S2S_CONFIG)"
fi
say "open http://$(python -c 'from daemon.config import load_config; b = load_config().bridge; print(f"{b.host}:{b.port}")')/  (Ctrl-C stops)"
say "this daemon from another terminal: RUNTIME_DIRECTORY=$RUNTIME_DIRECTORY S2S_CONFIG=$S2S_CONFIG $VENV/bin/s2s-ctl health"
# Returns when either process exits (or a signal arrives); the traps stop the other.
st=0
wait -n "${pids[@]}" || st=$?
if [ "$stopping" = 0 ]; then
  say "a process exited on its own with status $st"
  rc=$st
  [ "$rc" = 0 ] && rc=1
fi
