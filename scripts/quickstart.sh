#!/usr/bin/env bash
# The README's first command: set up a fresh CPU (or GPU) machine and run the quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install torch==2.13.0
"$PY" -m pip install setuptools wheel ninja
"$PY" -m pip install --no-build-isolation -e ".[dev]"
"$PY" examples/token_stats_quickstart.py "$@"
