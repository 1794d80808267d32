#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install secondorder with its extras.
# torch is pinned to the CPU build through constraints.txt so no CUDA packages are pulled.
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
