#!/usr/bin/env bash
# Start the whole stack without systemd: speech daemon, wait for READY, bridge, print the page URL.
# On a fresh clone it installs (scripts/install.sh) and assembles the bundled models first.
# Ctrl-C stops both. Honours the seed's env vars ASR_ENGINE, TTS_ENGINE, ASR_DEVICE, TTS_DEVICE
# and S2S_CONFIG (default: etc/s2s.yaml), S2S_MODELS (default: /var/lib/s2s/models when it
# exists, else ./.models).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export ASR_ENGINE="${ASR_ENGINE:-funasr}"   # "funasr" or "whisper"
export TTS_ENGINE="${TTS_ENGINE:-melo}"     # "melo" or "piper"
export ASR_DEVICE="${ASR_DEVICE:-cuda:1}"
export TTS_DEVICE="${TTS_DEVICE:-cuda:1}"
export S2S_CONFIG="${S2S_CONFIG:-$ROOT/etc/s2s.yaml}"
if [ -z "${S2S_MODELS:-}" ]; then
  if [ -d /var/lib/s2s/models ]; then S2S_MODELS=/var/lib/s2s/models; else S2S_MODELS=$ROOT/.models; fi
fi
export S2S_MODELS
export RUNTIME_DIRECTORY="${RUNTIME_DIRECTORY:-$ROOT/.run}"
export CUDA_DEVICE_ORDER=PCI_BUS_ID
say() { printf '\033[1m[s2s]\033[0m %s\n' "$*"; }

scripts/install.sh
# shellcheck disable=SC1091
. .venv/bin/activate
mkdir -p "$RUNTIME_DIRECTORY" && chmod 0750 "$RUNTIME_DIRECTORY"
say "models: $S2S_MODELS"
if ! s2s-models bundled --out "$S2S_MODELS" >/dev/null; then
  say "the models directory has broken components:"; s2s-models verify "$S2S_MODELS" || true; exit 1
fi
s2s-speechd --check-config

pids=()
rc=0
cleanup() {
  trap - INT TERM EXIT
  say "stopping"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    wait "$p" || rc=$?
  done
  if [ $rc = 0 ]; then say "stopped cleanly"; else say "a process exited with status $rc"; fi
  exit $rc
}
trap cleanup INT TERM EXIT

s2s-speechd &
daemon_pid=$!
pids+=("$daemon_pid")
say "waiting for the speech daemon to load its models (pid $daemon_pid)"
deadline=$((SECONDS + ${S2S_START_TIMEOUT:-300}))
until s2s-ctl --timeout 2 health >/dev/null 2>&1; do
  if ! kill -0 "$daemon_pid" 2>/dev/null; then
    say "the speech daemon exited during startup (see its log above)"; rc=1; exit 1
  fi
  if [ $SECONDS -ge $deadline ]; then
    say "the speech daemon did not become ready in time"; rc=1; exit 1
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
s2s-bridge "${agent_args[@]}" &
pids+=($!)
say "open http://$(python -c 'from daemon.config import load_config; b = load_config().bridge; print(f"{b.host}:{b.port}")')/  (Ctrl-C stops)"
# Returns when either process exits; the EXIT trap stops the other.
wait -n "${pids[@]}" || rc=$?
