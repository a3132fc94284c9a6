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
s2s-models bundled --out "$S2S_MODELS" >/dev/null
s2s-speechd --check-config

pids=()
cleanup() {
  trap - INT TERM EXIT
  say "stopping"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait || true
}
trap cleanup INT TERM EXIT

s2s-speechd &
pids+=($!)
say "waiting for the speech daemon to load its models (pid ${pids[0]})"
s2s-ctl health --wait 300 >/dev/null || { say "speech daemon did not become ready"; exit 1; }
s2s-ctl health --table || true

agent_args=()
if ! s2s-bridge --probe-agent; then
  if python -c 'from daemon.config import load_config; import sys; sys.exit(0 if load_config().agent.fallback_echo else 1)'; then
    say "the configured agent does not answer: starting the bridge with the built-in echo agent"
    agent_args=(--agent echo)
  fi
fi
s2s-bridge "${agent_args[@]}" &
pids+=($!)
wait -n "${pids[@]}"
