#!/usr/bin/env bash
# Install s2s on the reference host: P100 (compute 6.0) for ASR + TTS, CUDA 12.x driver.
#
#   sudo scripts/install-speech-p100.sh [--prefix /opt/s2s] [--models /var/lib/s2s/models]
#                                       [--no-fetch] [--no-units] [--dry-run]
#
# Steps (each is printed; --dry-run prints without doing; safe to re-run):
#  1. copy this checkout to PREFIX (unless it already is PREFIX) and create PREFIX/.venv
#  2. torch/torchaudio 2.9.1 from PyTorch's CUDA 12.6 wheel index: the last builds that still
#     carry sm_60 (Pascal) kernels; PyPI's default CUDA 12.8+ wheels have none (torch < 2.15)
#  3. the rest from requirements-speech.txt, MeloTTS --no-deps, s2s itself
#  4. check that sm_60 is in torch.cuda.get_arch_list() (and that the P100 is visible)
#  5. users s2s / s2s-bridge, /var/lib/s2s, /etc/s2s/s2s.yaml (kept if present), systemd units
#  6. s2s-models bundled + fetch (online) into MODELS, then verify
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/s2s
MODELS=/var/lib/s2s/models
TORCH_INDEX=https://download.pytorch.org/whl/cu126
DRY=0 FETCH=1 UNITS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=$2; shift 2 ;;
    --models) MODELS=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --no-fetch) FETCH=0; shift ;;
    --no-units) UNITS=0; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
VENV=$PREFIX/.venv
PIP="$VENV/bin/python -m pip"
# Each step is one shell string: printed, then run (unless --dry-run).
run() {
  printf '\033[1m+\033[0m %s\n' "$1"
  [ $DRY = 1 ] || eval "$1"
}
if [ $DRY = 0 ] && [ "$(id -u)" != 0 ] && [ $UNITS = 1 ]; then
  echo "run as root (creates users, /etc/s2s and systemd units), or use --no-units / --dry-run" >&2; exit 1
fi

echo "== 1. code and venv in $PREFIX"
if [ "$SRC" != "$PREFIX" ]; then
  run "mkdir -p '$PREFIX' && (cd '$SRC' && tar --exclude=./.venv --exclude=./.models --exclude=./.run --exclude=./.git --exclude=./tests -cf - .) | (cd '$PREFIX' && tar -xf -)"
fi
[ -x "$VENV/bin/python" ] || run "python3 -m venv '$VENV'"
run "$PIP install -q --upgrade pip setuptools wheel"

echo "== 2. torch + torchaudio 2.9.1 for CUDA 12.6 (sm_60 kernels)"
TORCH_PINS=$(grep -E '^(torch|torchaudio)==' "$SRC/requirements-speech.txt" | tr '\n' ' ')
run "$PIP install --index-url $TORCH_INDEX $TORCH_PINS"

echo "== 3. the pinned set"
run "$PIP install -r '$PREFIX/requirements-speech.txt'"
run "$PIP install --no-deps -r '$PREFIX/requirements-nodeps.txt'"
run "$PIP install -q --no-deps --no-build-isolation -e '$PREFIX'"

echo "== 4. check Pascal kernels"
run "$VENV/bin/python - <<'PY'
import sys, torch
arch = torch.cuda.get_arch_list()
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'arch', ' '.join(arch))
if 'sm_60' not in arch:
    sys.exit('sm_60 is missing from this torch build: the P100 would fall back to CPU')
if not torch.cuda.is_available():
    sys.exit('CUDA is not available (driver?)')
for i in range(torch.cuda.device_count()):
    print(f'cuda:{i}', torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
PY"

if [ $UNITS = 1 ]; then
  echo "== 5. users, directories, config, units"
  run "getent group s2s >/dev/null || groupadd --system s2s"
  run "id s2s >/dev/null 2>&1 || useradd --system --gid s2s --home-dir /var/lib/s2s --shell /usr/sbin/nologin s2s"
  run "for g in video render; do getent group \$g >/dev/null && usermod -aG \$g s2s; done; true"
  run "id s2s-bridge >/dev/null 2>&1 || useradd --system --user-group --no-create-home --shell /usr/sbin/nologin s2s-bridge"
  run "usermod -aG s2s s2s-bridge"
  run "install -d -o s2s -g s2s -m 0750 /var/lib/s2s '$MODELS'"
  run "[ -f /etc/s2s/s2s.yaml ] || install -D -m 0640 -g s2s '$PREFIX/etc/s2s.yaml' /etc/s2s/s2s.yaml"
  run "grep -q '^models_root: $MODELS\$' /etc/s2s/s2s.yaml || sed -i 's|^models_root:.*|models_root: $MODELS|' /etc/s2s/s2s.yaml"
  run "sed 's|/opt/s2s|$PREFIX|g' '$PREFIX/systemd/s2s-speechd.service' > /etc/systemd/system/s2s-speechd.service"
  run "sed 's|/opt/s2s|$PREFIX|g' '$PREFIX/systemd/s2s-bridge.service' > /etc/systemd/system/s2s-bridge.service"
  run "install -m 0644 '$PREFIX/systemd/s2s.target' /etc/systemd/system/s2s.target"
  run "systemctl daemon-reload"
fi

echo "== 6. models in $MODELS"
run "$VENV/bin/s2s-models bundled --out '$MODELS'"
if [ $FETCH = 1 ]; then
  run "$VENV/bin/s2s-models fetch --out '$MODELS'"
fi
run "$VENV/bin/s2s-models verify '$MODELS'"
[ $UNITS = 1 ] && run "chown -R s2s:s2s '$MODELS'"
run "S2S_CONFIG=/etc/s2s/s2s.yaml $VENV/bin/s2s-speechd --check-config"
echo "done. Start with: sudo systemctl enable --now s2s.target"
