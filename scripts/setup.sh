#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install secondorder with its extras.
# torch is pinned to the CPU build through constraints.txt so no CUDA packages are pulled.
# Prints the command that puts `secondorder` on PATH (SETUP_QUIET=1: print nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -c constraints.txt torch==2.13.0
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[$EXTRAS]"
if [ "${SETUP_QUIET:-0}" != 1 ]; then
  case "$VENV" in /*) where=$VENV ;; *) where=$PWD/$VENV ;; esac
  cat <<MSG
secondorder is installed in $where (extras: $EXTRAS). Next, activate it:
  source $where/bin/activate
then e.g.  secondorder bench --list   (or, without activating: $where/bin/secondorder bench --list)
MSG
fi
