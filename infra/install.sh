#!/usr/bin/env bash
# Install lwq into ./.venv on a fresh machine (CPU).
#
# torch 2.13.0 goes first: on these machines pip takes its CPU build from a
# local file; installed after the project, a looser requirement could pull a
# CUDA build of several GB. On a CUDA machine, install the torch build you want
# first and run this script with LWQ_SKIP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LWQ_VENV:-.venv}
quiet() { # pip prints one warning per missing local index folder here: drop those
  "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
quiet "$VENV/bin/python" -m pip install -q --upgrade pip
if [ "${LWQ_SKIP_TORCH:-0}" != 1 ]; then
  quiet "$VENV/bin/python" -m pip install -q torch==2.13.0
fi
quiet "$VENV/bin/python" -m pip install -q -e '.[dev]'
"$VENV/bin/python" -c "import lwq, torch; print(f'lwq {lwq.__version__} installed in $VENV (torch {torch.__version__})')"
