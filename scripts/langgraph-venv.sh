#!/usr/bin/env bash
# Create or update ./.venv-langgraph: the REAL LangGraph server (`langgraph dev`, in-memory
# runtime, langgraph-api) that tests/test_langgraph_real.py runs the bridge's agent against.
# A venv of its own, so its many dependencies never touch ./.venv. Every version is pinned in
# tests/langgraph_server/requirements.txt. Idempotent like install.sh: when that file has not
# changed since the last successful run it only checks and exits.
#
#   scripts/langgraph-venv.sh            install / update
#   scripts/langgraph-venv.sh --force    reinstall even if nothing changed
#
# S2S_LANGGRAPH_VENV selects another path (the tests honour it too).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${S2S_LANGGRAPH_VENV:-$ROOT/.venv-langgraph}
PY=${PYTHON:-python3}
REQ=tests/langgraph_server/requirements.txt
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

step() { printf '\033[1m[langgraph-venv]\033[0m %s\n' "$*"; }

stamp="$VENV/.s2s-installed"
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ $FORCE = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/langgraph" ]; then
  step "up to date ($VENV)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  step "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
rm -f "$stamp"
step "installing the LangGraph server ($REQ; first run: about 80 packages from PyPI)"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VENV/bin/python" -m pip install -q -r "$REQ"; then
  echo "[langgraph-venv] could not install $REQ into $VENV (is PyPI reachable?);" \
       "tests/test_langgraph_real.py needs it" >&2
  exit 1
fi
"$VENV/bin/python" -c 'import langgraph_api, langgraph_runtime_inmem, langchain_core, langgraph_cli' \
  || { echo "[langgraph-venv] $VENV: the installed server does not import" >&2; exit 1; }
echo "$want" > "$stamp"
step "done: $VENV"
