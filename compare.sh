#!/usr/bin/env bash
# The main job: builds the examples and compares every policy on a real llama2.c model.
#   ./compare.sh [compare_policies options]      (--help lists them; --models DIR points at the model files)
set -euo pipefail
cd "$(dirname "$0")"
[ -d build ] || ./test.sh >/dev/null  # first run: install, build and test once
cmake --build build -j"$(nproc)" --target compare_policies
exec build/examples/compare_policies "$@"
