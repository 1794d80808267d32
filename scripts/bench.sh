#!/usr/bin/env bash
# The README's main-job command: set up the virtualenv and run `secondorder bench`.
# Arguments go to `secondorder bench` (no arguments: the quick default comparison).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=bench bash scripts/setup.sh
exec "$VENV/bin/secondorder" bench "$@"
