#!/usr/bin/env bash
# The main job: builds the examples and compares every policy on a real llama2.c model.
#   ./compare.sh [compare_policies options]      (--help lists them; --models DIR points at the model files)
# Paths in the options (--out, --models, --model, --text, ...) are relative to the directory you run it from;
# results go to out/compare there (--quick: out/compare-quick), and the program prints their absolute paths.
# Run ./test.sh once first on a fresh machine: it installs the Debian packages this needs.
set -euo pipefail
repo="$(cd "$(dirname "$0")" && pwd)"
cmake -S "$repo" -B "$repo/build" -DCMAKE_BUILD_TYPE=Release -DKVTRIM_WERROR=ON >/dev/null  # fast when configured
echo "compare.sh: building compare_policies" >&2
cmake --build "$repo/build" -j"$(nproc)" --target compare_policies >/dev/null
exec "$repo/build/examples/compare_policies" "$@"
