#!/usr/bin/env bash
# One entry point for a fresh machine (Python >= 3.10 and a C++ compiler):
#   bash scripts/dev.sh demo [args]   set up, then run the demo
#   bash scripts/dev.sh test [args]   set up, then run the test-suite
# It creates (or reuses) a virtualenv, installs torch (the pinned CPU build unless a
# torch is already importable there), installs hierfast with its extras (rebuilding
# the compiled core when csrc/ or setup.py changed), and runs.
# HIERFAST_VENV picks the virtualenv (default .venv); PYTHON the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo|test|setup) ;;
  *) echo "usage: bash scripts/dev.sh demo|test|setup [args...]" >&2; exit 2 ;;
esac
VENV=${HIERFAST_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[dev] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  echo "[dev] installing torch==2.13.0 (CPU build)"
  python -m pip install -q torch==2.13.0
fi
stamp="$VENV/.hierfast-installed"
if [ ! -f "$stamp" ] || [ -n "$(find setup.py pyproject.toml csrc -newer "$stamp" -print -quit)" ] \
   || ! python -c "import hierfast._C" 2>/dev/null; then
  echo "[dev] installing hierfast (editable) with extras test,plot"
  python -m pip install -q -e ".[test,plot]"
  touch "$stamp"
fi
case "$cmd" in
  demo) exec python -m hierfast demo "$@" ;;
  test) TRITON_INTERPRET=1 exec python -m pytest tests "$@" ;;
  setup) python -m hierfast info ;;
esac
