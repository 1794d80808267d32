#!/usr/bin/env bash
# GPU check: CUDA tests, then optimizer step times vs fused AdamW on a >= 100M byte-LM.
# Usage: benchmarks/gpu.sh [--json out.json] [--dry-run] [...]  (see benchmarks/gpu.py --help)
# PYTHON selects the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
exec env PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" benchmarks/gpu.py "$@"
