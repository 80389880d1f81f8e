#!/usr/bin/env bash
# Installs what is missing (Debian packages), builds kvtrim with warnings as errors, and runs every test.
#   ./test.sh             Release build in build/, all tests, benchmarks and examples built
#   ./test.sh --sanitize  the tests again under AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/)
#   ./test.sh --tsan      the concurrency test (test_threads) under ThreadSanitizer (build-tsan/)
set -euo pipefail
cd "$(dirname "$0")"

packages=(cmake g++ make libeigen3-dev catch2 libbenchmark-dev gnuplot-nox)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "test.sh: installing ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

jobs=$(nproc)
if [ "${1:-}" = "--tsan" ]; then
  # Only test_threads is built and run: it is the test that runs kvtrim on several threads at once.
  cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVTRIM_WERROR=ON -DKVTRIM_CUDA=OFF \
        -DKVTRIM_BUILD_BENCHMARKS=OFF -DKVTRIM_BUILD_EXAMPLES=OFF \
        -DCMAKE_CXX_FLAGS=-fsanitize=thread -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread
  cmake --build build-tsan -j"$jobs" --target test_threads
  TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 ./build-tsan/tests/test_threads
elif [ "${1:-}" = "--sanitize" ]; then
  # -O1 -g1 (line tables for the reports): half the compile time of -O2 -g under ASan+UBSan (455 vs 867 s for one
  # registry-wide test file), and the optimisation level the sanitizers recommend.
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVTRIM_WERROR=ON -DKVTRIM_SANITIZE=ON \
        -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" \
        -DKVTRIM_CUDA=OFF -DKVTRIM_BUILD_BENCHMARKS=OFF -DKVTRIM_BUILD_EXAMPLES=OFF
  cmake --build build-asan -j"$jobs"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-asan --output-on-failure -j"$jobs" -E '^packaging\.'
else
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DKVTRIM_WERROR=ON
  cmake --build build -j"$jobs"
  ctest --test-dir build --output-on-failure -j"$jobs"
  # ---- Python (python/): `pip install .` into build-python/venv, then pytest; skips are listed with reasons.
  # torch (CPU use, PyPI's CUDA build) and transformers come through uv: the same PyPI wheels as pip, ~4x faster.
  # KVTRIM_SKIP_PYTHON=1 leaves this step out (it says so).
  if [ "${KVTRIM_SKIP_PYTHON:-0}" = "1" ]; then
    echo "test.sh: Python tests NOT run (KVTRIM_SKIP_PYTHON=1)"
  else
    python_start=$SECONDS
    if ! python3 -c 'import ensurepip, sysconfig, os; assert os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")' 2>/dev/null; then
      sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv python3-dev
    fi
    venv=build-python/venv
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check uv
    "$venv/bin/python" -m uv pip install -q --python "$venv/bin/python" numpy pytest torch 'transformers>=5,<6' matplotlib
    KVTRIM_WERROR=ON "$venv/bin/python" -m pip install -q --disable-pip-version-check .
    echo "test.sh: Python environment and kvtrim module ready in $((SECONDS - python_start)) s"
    KVTRIM_REFERENCE_BIN="$PWD/build/python/kvtrim_llama2_ref" KVTRIM_COMPARE_BIN="$PWD/build/examples/compare_policies" \
      "$venv/bin/python" -m pytest python/tests -rs -q -p no:cacheprovider
    echo "test.sh: Python step took $((SECONDS - python_start)) s"
  fi
fi
