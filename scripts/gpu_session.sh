#!/usr/bin/env bash
# The GPU checks, for a session lent a GPU machine (the `device` tool: CUDA torch, nvcc, no
# network, 10 minutes a call, about 30 minutes in all). Run its steps in order:
#
#   scripts/gpu_session.sh build                # the CUDA extension, in place (about 2 min)
#   scripts/gpu_session.sh test                 # the CUDA tests against the float64 oracle
#   scripts/gpu_session.sh bench --seq-lens 1024 2048    # bench_e2e at Llama-3-8B, 24 GB cap
#   scripts/gpu_session.sh bench --seq-lens 4096 8192    # more rows, merged into the same table
#
# bitsandbytes is not on those machines: carry its wheel in `.whl/` (ignored by git), made here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# Logs and results are copied to $OUT, which the device tool brings back.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sparsepo_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
step=${1:?usage: scripts/gpu_session.sh build|test|bench [bench_e2e args]}
shift
case "$step" in
  build)
    # build_ext --inplace needs neither pip nor network; the .so lands in sparsepo_lite/.
    SPARSEPO_LITE_CUDA=1 python3 setup.py -q build_ext --inplace 2>&1 | tee "$OUT/build.log"
    python3 -c "import sparsepo_lite._C as c; assert c.with_cuda, 'built without CUDA'; print('extension with CUDA')"
    ;;
  test)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/tests.log"
    python3 -m pytest -q -rs tests/test_token_stats_cuda.py tests/test_token_stats.py tests/test_trainer.py -k cuda "$@" 2>&1 | tee -a "$OUT/tests.log"
    ;;
  bench)
    python3 bench/bench_e2e.py --gpu-mem 24GB --merge "$@" 2>&1 | grep -v Warning | tee "$OUT/bench_e2e.log"
    cp bench/results/e2e_*_cuda.json bench/results/e2e_*_cuda.md "$OUT/"
    ;;
  *)
    echo "unknown step: $step (build, test or bench)" >&2
    exit 2
    ;;
esac
