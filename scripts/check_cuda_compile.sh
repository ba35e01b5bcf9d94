#!/usr/bin/env bash
# Compile-check every CUDA source with plain nvcc (no GPU, no CUDA torch needed).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "nvcc not found: cannot compile-check csrc/cuda/*.cu" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for f in csrc/cuda/*.cu; do
  for arch in 80 86 89 90; do
    nvcc -c -std=c++17 -O3 -Werror all-warnings -arch=sm_$arch "$f" -o "$out/$(basename "$f").sm_$arch.o"
    echo "nvcc ok: $f sm_$arch"
  done
done
