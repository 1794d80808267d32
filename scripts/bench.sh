#!/usr/bin/env bash
# The README's main-job command: set up the virtualenv and run `secondorder bench`.
# Arguments go to `secondorder bench` (no arguments: the quick default comparison).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=bench SETUP_QUIET=1 bash scripts/setup.sh
set +e
"$VENV/bin/secondorder" bench "$@"
rc=$?
set -e
case "$VENV" in /*) where=$VENV ;; *) where=$PWD/$VENV ;; esac
echo "more runs: source $where/bin/activate, then secondorder bench --help" \
  "(or $where/bin/secondorder bench ... without activating)" >&2
exit "$rc"
