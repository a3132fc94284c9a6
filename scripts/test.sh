#!/usr/bin/env bash
# Run the test suite: installs the venvs if needed (scripts/install.sh --test, scripts/langgraph-venv.sh),
# builds the bundled and tiny models once (cached under .models/), then runs pytest. Extra
# arguments go to pytest.
#   scripts/test.sh                 the whole suite
#   scripts/test.sh tests/test_config.py -k env
#   S2S_SLOW=1 scripts/test.sh      include the long soak/load tests
#   S2S_TEST_WORKERS=0 scripts/test.sh   one process (default 2: pytest-xdist, each test file whole
#                                         in one worker; -s output then shows with -n 0 only)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test
# The real LangGraph server for tests/test_langgraph_real.py, in a venv of its own. If it cannot
# be installed, those tests fail and say why; the rest of the suite still runs.
scripts/langgraph-venv.sh || echo "[test] scripts/langgraph-venv.sh failed: tests/test_langgraph_real.py will fail" >&2
# shellcheck disable=SC1091
. "${S2S_VENV:-$PWD/.venv}/bin/activate"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export S2S_TEST_MODELS=${S2S_TEST_MODELS:-$PWD/.models}
s2s-models bundled --out "$S2S_TEST_MODELS" >/dev/null
s2s-models tiny --out "$S2S_TEST_MODELS" >/dev/null
exec python -m pytest -p no:cacheprovider -n "${S2S_TEST_WORKERS:-2}" --dist loadfile "$@"
