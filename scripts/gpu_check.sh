#!/usr/bin/env bash
# The whole GPU check in ONE command, sized for a lent H100/H200 (CUDA torch, nvcc, 16 cores, no
# network, peft/transformers/accelerate/pytest installed, bitsandbytes and liger-kernel carried as
# wheels in .whl/ by scripts/fetch_gpu_wheels.sh). With the device tool:
#
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# Every stage runs under its own `timeout` and writes its log to $OUT as it goes, and the bench
# rewrites its results after every row, so a run cut short still returns what finished. Files in
# $OUT (7, under the device tool's limit of 8): stages.tsv, setup.log (a + b), tests.log, bench.log,
# e2e_llama-3-8b_cuda.{json,md}, summary.md. Exit status: 0 when no stage failed.
#
# Stage budget on one H200, 8 minutes in all (GPU_CHECK_SECONDS=480), and how it was estimated:
#   a. wheels      ~0.2 min  pip --no-index --target of two wheels (44 MB): seconds here.
#   b. build       ~1.5 min  4 translation units in parallel (MAX_JOBS=16, sm_90 only); the CPU build of
#                            the 2 torch-header units takes ~1.3 min on 2 cores here, so the slowest unit
#                            bounds it. Time box 4 min.
#   c. CUDA tests  ~1 min    ~120 tests of small kernels (V up to 128,256) plus CUDA start-up and
#                            imports; the same files take ~40 s on the CPU here. Time box 2.5 min.
#   d. bench       ~4.5 min  all time left but 20 s. Building the random Llama-3-8B on the GPU and
#                            quantising it in memory: ~0.5 min (8e9 normal draws and 224 NF4 quantisations,
#                            no disk). A T = 2048 row is 1 warm-up + 4 steps of ~1 s (3.3e14 FLOP per step
#                            at ~300 TFLOP/s effective), ~6 s; T = 8192 ~4x longer. Rows run in priority
#                            order (bench_e2e.PRIORITY); a row predicted to end past the deadline is skipped.
#   e. summary     <0.1 min  summary.md from the stage table, the test log and the bench rows.
#
# --dry-run: the same stages on the CPU with a tiny model (what CI runs, tests/test_gpu_check.py):
# wheels only if .whl/ has some; the extension built out of place without CUDA (the CUDA assertion
# is skipped, and the summary says so); the CUDA tests collected (they skip without a GPU) plus a
# few CPU op tests; the bench's plumbing (in-memory 4-bit model, priority rows, deadline) on a tiny
# Llama. OUT defaults to a new temporary folder.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
WHEELS=${WHEEL_DIR:-.whl}
TOTAL=${GPU_CHECK_SECONDS:-480}
mkdir -p "$OUT"
START=$(date +%s)
STAGES="$OUT/stages.tsv"
printf 'stage\tstatus\tseconds\tnote\n' >"$STAGES"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
FAILED=0

left() { echo $((TOTAL - ($(date +%s) - START))); }

# record NAME STATUS SECONDS NOTE
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STAGES"
  echo "== stage $1: $2 (${3} s) $4"
  [ "$2" = failed ] || [ "$2" = timeout ] && FAILED=1
  return 0
}

# stage NAME SECONDS LOG NOTE -- COMMAND...: run COMMAND under `timeout` (SECONDS, or less if the
# whole check's time runs out first), appending to LOG.
stage() {
  local name=$1 secs=$2 log=$3 note=$4
  shift 5
  [ "$secs" -gt "$(left)" ] && secs=$(left)
  if [ "$secs" -lt 5 ]; then
    record "$name" skipped 0 "no time left"
    return 1
  fi
  echo "== stage $name (time box ${secs} s)" | tee -a "$log"
  local t0 rc status
  t0=$(date +%s)
  timeout -k 10 "$secs" "$@" >>"$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  [ $rc -ne 0 ] && note="$note (exit $rc)"
  record "$name" "$status" $(($(date +%s) - t0)) "$note"
  [ $rc -eq 0 ]
}

SETUP_LOG="$OUT/setup.log"
{ date -u; uname -a; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
} >"$SETUP_LOG" 2>&1

# --- a. wheels the machine lacks (bitsandbytes, liger-kernel), into a temporary site folder --------
SITE=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  stage wheels 60 "$SETUP_LOG" "$(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS" -- \
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$SITE"
elif [ $DRY = 1 ]; then
  record wheels skipped 0 "dry run: no wheels in $WHEELS (the installed packages are used)"
else
  record wheels failed 0 "no wheels in $WHEELS: run scripts/fetch_gpu_wheels.sh on a machine with network"
fi

# --- b. the extension -------------------------------------------------------------------------------
if [ $DRY = 0 ]; then
  stage build 240 "$SETUP_LOG" "CUDA extension in place" -- env SPARSEPO_LITE_CUDA=1 MAX_JOBS=16 \
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" "$PY" setup.py -q build_ext --inplace \
    && stage linked 30 "$SETUP_LOG" "the CUDA kernel is linked and used" -- "$PY" -c "
import sparsepo_lite as sp, sparsepo_lite._C as c
assert c.with_cuda, 'the extension was built without CUDA'
assert sp.HAVE_EXTENSION and sp.EXTENSION_HAS_CUDA, sp.EXTENSION_ERROR
print('extension with CUDA:', c.__file__)"
else
  # Out of place: the suite running this dry run has the in-tree extension loaded.
  BUILD=$(mktemp -d /tmp/gpu_check_build.XXXXXX)
  stage build 600 "$SETUP_LOG" "dry run: CPU build out of place (CUDA assertion skipped)" -- env SPARSEPO_LITE_CUDA=0 \
    MAX_JOBS=2 "$PY" setup.py -q build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/tmp" \
    && stage linked 60 "$SETUP_LOG" "dry run: the CPU build loads; no CUDA kernel to check" -- "$PY" -c "
import glob, importlib.util, torch
path = glob.glob('$BUILD/lib/sparsepo_lite/_C*.so')[0]
spec = importlib.util.spec_from_file_location('sparsepo_lite._C', path)
c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)
assert not c.with_cuda
print('CPU extension loads:', path)"
  rm -rf "$BUILD"
fi

# --- c. CUDA tests against the float64 oracle -----------------------------------------------------
TESTS=(tests/test_token_stats_cuda.py tests/test_token_stats.py)
if [ $DRY = 0 ]; then
  SELECT=(-k cuda)
else  # the CUDA tests skip without a GPU; a few CPU oracle tests exercise the pass/fail plumbing
  SELECT=(-k "cuda or (fp32 and cpu and exact)")
fi
budget=$(($(left) - 200))
[ $budget -gt 150 ] && budget=150
stage tests "$budget" "$OUT/tests.log" "${SELECT[*]}" -- \
  "$PY" -m pytest -q -rs -p no:cacheprovider "${TESTS[@]}" "${SELECT[@]}"

# --- d. end-to-end training steps -----------------------------------------------------------------
if [ $DRY = 0 ]; then
  MODEL=llama-3-8b
  BENCH=(--gpu-mem 24GB --rows priority)
else
  MODEL=tiny
  BENCH=(--one-process --steps 1 --rows op_tdpo2_online@48 op_sparsepo_online@48 op_dpo_cached@48 eager_tdpo2@48)
fi
budget=$(($(left) - 20))
stage bench "$budget" "$OUT/bench.log" "$MODEL, rows in priority order" -- \
  "$PY" bench/bench_e2e.py --model "$MODEL" "${BENCH[@]}" --deadline $((budget - 10)) \
  --out "$OUT/e2e_${MODEL}_$([ $DRY = 0 ] && echo cuda || echo cpu)"

# --- e. summary ---------------------------------------------------------------------------------------
stage summary 30 "$OUT/setup.log" "summary.md" -- "$PY" scripts/gpu_check_summary.py "$OUT" \
  $([ $DRY = 1 ] && echo --dry-run)
cat "$OUT/summary.md" 2>/dev/null
rm -rf "$SITE"
echo "results in $OUT"
exit $FAILED
