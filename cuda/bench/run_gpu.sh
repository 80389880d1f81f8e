#!/usr/bin/env bash
# The one command for a machine with an NVIDIA GPU: builds the CUDA tests and benchmarks, runs the tests,
# the GPU benchmarks and the PyTorch SDPA comparison, then compute-sanitizer on the backend tests.
#
#   cuda/bench/run_gpu.sh [OUT_DIR=out/gpu]
#
# Environment (all optional):
#   BUILD_DIR        build directory (default build-gpu, in the repository root)
#   JOBS             parallel build jobs (default 16)
#   CMAKE_ARGS       extra CMake arguments, e.g. "-DCMAKE_PREFIX_PATH=/deps -DCMAKE_CUDA_ARCHITECTURES=90"
#                    (the tests need Eigen3 >= 3.4 and Catch2 2.13 where CMake can find them)
#   SANITIZER_TIMEOUT seconds allowed for each compute-sanitizer run (default 120)
#   POLICY_ITERS     decode steps per policy measurement in bench_cuda_policies (default 200)
#   DECODE_ITERS     steps per measurement in bench_cuda_decode (default 50)
#   PYTHON           the Python with PyTorch for sdpa_compare.py (default python3)
#   STEPS            which steps run, of "build tests bench sdpa sanitize" (default all), e.g. STEPS="build tests"
#                    then STEPS="bench sdpa sanitize" to split the work over two commands of a time-limited
#                    machine (the second reuses BUILD_DIR)
#
# Order: build -> unit tests -> benchmarks -> SDPA comparison -> sanitizers, so that the figures exist even if a
# sanitizer run is slow. A failing build stops the script (set -e); a failing test, benchmark, comparison or
# sanitizer run is recorded and the script goes on, then exits 1 at the end naming every failed step. PyTorch
# or CUDA missing for the comparison (sdpa_compare.py's exit status 3) is reported as skipped, not failed.
# Everything printed is also in OUT_DIR/run_gpu.log; the benchmarks' tables and CSV files are in OUT_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT_DIR="${1:-out/gpu}"
BUILD_DIR="${BUILD_DIR:-build-gpu}"
JOBS="${JOBS:-16}"
SANITIZER_TIMEOUT="${SANITIZER_TIMEOUT:-120}"
POLICY_ITERS="${POLICY_ITERS:-200}"
DECODE_ITERS="${DECODE_ITERS:-50}"
PYTHON="${PYTHON:-python3}"
STEPS=" ${STEPS:-build tests bench sdpa sanitize} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
cd "$ROOT"
case "$BUILD_DIR" in /*) ;; *) BUILD_DIR="$ROOT/$BUILD_DIR" ;; esac
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$ROOT/$OUT_DIR" ;; esac
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/run_gpu.log") 2>&1

START=$SECONDS
FAILED=()
SKIPPED=()
section() { printf '\n==== %s (%ds)\n' "$*" $((SECONDS - START)); }
# Runs a step whose failure must not stop the script; records it.
keep_going() {
  local name="$1"
  shift
  local rc=0
  "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "run_gpu.sh: FAILED: $name (exit status $rc)"
    FAILED+=("$name")
  fi
  return 0
}
trap 'echo "run_gpu.sh: stopped at line $LINENO (exit status $?) after $((SECONDS - START)) s"' ERR

section "machine"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader ||
    echo "run_gpu.sh: warning: nvidia-smi failed"
else
  echo "run_gpu.sh: warning: nvidia-smi not found"
fi
NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then
  echo "run_gpu.sh: error: nvcc not found (neither on PATH nor at /usr/local/cuda/bin/nvcc)"
  exit 1
fi
"$NVCC" --version | tail -n 2
if REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)"; then
  if git -C "$ROOT" diff --quiet HEAD 2>/dev/null; then echo "repository: $ROOT at $REV"
  else echo "repository: $ROOT at $REV, with local changes"; fi
else
  echo "repository: $ROOT (not a git checkout)"
fi
echo "build: $BUILD_DIR; output: $OUT_DIR; $(nproc) CPUs"

if want build; then
section "configure"
# Eigen3 and Catch2 packed by cuda/bench/pack_gpu_deps.sh (for GPU machines without them) are used when present.
if [ -d "$ROOT/.gpu-deps" ]; then
  CMAKE_ARGS="-DCMAKE_PREFIX_PATH=$ROOT/.gpu-deps ${CMAKE_ARGS:-}"
  echo "using the packed dependencies in $ROOT/.gpu-deps"
fi
# shellcheck disable=SC2086  # CMAKE_ARGS is a list of arguments
if ! cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DKVTRIM_WERROR=ON -DKVTRIM_BUILD_EXAMPLES=OFF \
  -DKVTRIM_CUDA=ON -DKVTRIM_BUILD_TESTS=ON -DKVTRIM_BUILD_BENCHMARKS=OFF -DKVTRIM_BUILD_CUDA_BENCHMARKS=ON \
  -DCMAKE_CUDA_COMPILER="$NVCC" ${CMAKE_ARGS:-}; then
  echo "run_gpu.sh: error: CMake configuration failed (see above). The build needs Eigen3 >= 3.4 and Catch2 2.13;"
  echo "  if they are missing here, point CMake at them: CMAKE_ARGS='-DCMAKE_PREFIX_PATH=/path/to/prefix'"
  exit 1
fi

section "build"
cmake --build "$BUILD_DIR" -j "$JOBS" --target test_cuda_host test_cuda_backend bench_cuda_decode bench_cuda_policies
fi
BIN="$BUILD_DIR/tests/cuda"
for exe in test_cuda_host test_cuda_backend bench_cuda_decode bench_cuda_policies; do
  [ -x "$BIN/$exe" ] || { echo "run_gpu.sh: error: $BIN/$exe was not built"; exit 1; }
done

if want tests; then
section "tests"
# A failing test is recorded, not fatal: the benchmarks and sanitizers still run, so one GPU session yields
# every figure and every failure at once.
keep_going test_cuda_host "$BIN/test_cuda_host"
keep_going test_cuda_backend "$BIN/test_cuda_backend"
fi

if want bench; then
section "bench_cuda_decode (iterations $DECODE_ITERS)"
keep_going bench_cuda_decode bash -c "set -o pipefail; '$BIN/bench_cuda_decode' 8 4 128 '$DECODE_ITERS' \
  --csv '$OUT_DIR/decode.csv' | tee '$OUT_DIR/decode.txt'"

section "bench_cuda_policies (iterations $POLICY_ITERS)"
keep_going bench_cuda_policies bash -c "set -o pipefail; '$BIN/bench_cuda_policies' 8 4 128 '$POLICY_ITERS' \
  --csv '$OUT_DIR/policies.csv' | tee '$OUT_DIR/policies.txt'"

fi

if want sdpa; then
section "sdpa_compare.py"
if [ -s "$OUT_DIR/decode.csv" ]; then
  rc=0
  PYTHONUNBUFFERED=1 "$PYTHON" "$ROOT/cuda/bench/sdpa_compare.py" "$OUT_DIR/decode.csv" \
    --csv-out "$OUT_DIR/sdpa.csv" | tee "$OUT_DIR/sdpa.txt" || rc=$?
  if [ "$rc" -eq 3 ]; then
    echo "run_gpu.sh: SDPA comparison skipped (PyTorch or CUDA is missing for $PYTHON; message above)"
    SKIPPED+=("sdpa_compare.py")
  elif [ "$rc" -ne 0 ]; then
    echo "run_gpu.sh: FAILED: sdpa_compare.py (exit status $rc)"
    FAILED+=("sdpa_compare.py")
  fi
else
  echo "run_gpu.sh: FAILED: sdpa_compare.py has no input ($OUT_DIR/decode.csv is missing or empty)"
  FAILED+=("sdpa_compare.py")
fi

fi

if want sanitize; then
SAN="$(command -v compute-sanitizer || true)"
for candidate in "$(dirname "$NVCC")/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
  /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  if [ -z "$SAN" ] && [ -x "$candidate" ]; then SAN="$candidate"; fi
done
if [ -z "$SAN" ]; then
  echo "run_gpu.sh: FAILED: compute-sanitizer not found"
  FAILED+=("compute-sanitizer (not found)")
else
  section "compute-sanitizer memcheck: test_cuda_backend (limit ${SANITIZER_TIMEOUT}s)"
  keep_going "memcheck test_cuda_backend" timeout "$SANITIZER_TIMEOUT" \
    "$SAN" --tool memcheck --error-exitcode 99 "$BIN/test_cuda_backend"
  section "compute-sanitizer racecheck: test_cuda_backend [float] (limit ${SANITIZER_TIMEOUT}s)"
  keep_going "racecheck test_cuda_backend [float]" timeout "$SANITIZER_TIMEOUT" \
    "$SAN" --tool racecheck --error-exitcode 99 "$BIN/test_cuda_backend" "[float]"
fi

fi

section "summary"
echo "outputs in $OUT_DIR:"
ls -l "$OUT_DIR"
if [ "${#SKIPPED[@]}" -gt 0 ]; then echo "skipped: ${SKIPPED[*]}"; fi
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "run_gpu.sh: ${#FAILED[@]} step(s) failed:"
  printf '  - %s\n' "${FAILED[@]}"
  echo "(a timeout shows as exit status 124)"
  exit 1
fi
echo "run_gpu.sh: all steps passed in $((SECONDS - START)) s"
