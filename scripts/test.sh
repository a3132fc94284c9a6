#!/usr/bin/env bash
# Run the test suite: installs the venv if needed (scripts/install.sh), builds the bundled and
# tiny models once (cached under .models/), then runs pytest. Extra arguments go to pytest.
#   scripts/test.sh                 the whole suite
#   scripts/test.sh tests/test_config.py -k env
#   S2S_SLOW=1 scripts/test.sh      include the long soak/load tests
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
# shellcheck disable=SC1091
. "${S2S_VENV:-$PWD/.venv}/bin/activate"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export S2S_TEST_MODELS=${S2S_TEST_MODELS:-$PWD/.models}
s2s-models bundled --out "$S2S_TEST_MODELS" >/dev/null
s2s-models tiny --out "$S2S_TEST_MODELS" >/dev/null
exec python -m pytest -p no:cacheprovider "$@"
