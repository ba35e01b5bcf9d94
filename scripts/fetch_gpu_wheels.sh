#!/usr/bin/env bash
# Run on a development machine with network: download the wheels the lent GPU machine lacks
# (bitsandbytes for the 4-bit policies, liger-kernel for the loss-stage comparisons) for its
# Python 3.12 on manylinux x86_64, into the git-ignored .whl/ that scripts/gpu_check.sh installs
# from. Everything that travels to the GPU machine (the working tree plus .whl/) must stay under
# the device tool's 64 MiB; this script checks that.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The versions the CPU suite is tested with; bitsandbytes 0.50.2 ships a CUDA 13.0 library (the
# GPU machine's torch is cu130).
PACKAGES=(bitsandbytes==0.50.2 liger-kernel==0.8.5)
LIMIT=$((64 << 20))
mkdir -p .whl
rm -f .whl/*.whl  # one version of each: two would stop the install there
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${PACKAGES[@]}"
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r du -cb 2>/dev/null \
  | awk '$2 == "total" {s += $1} END {print s + 0}')
ls -l .whl
total=$((wheels + tree))
awk -v w="$wheels" -v t="$tree" -v l="$LIMIT" 'BEGIN {
  printf "wheels %.1f MiB + working tree %.1f MiB = %.1f MiB of %d MiB\n", w / 2^20, t / 2^20, (w + t) / 2^20, l / 2^20 }'
if [ "$total" -ge "$LIMIT" ]; then
  echo "too large for the device tool's 64 MiB: remove untracked files or drop a wheel" >&2
  exit 1
fi
