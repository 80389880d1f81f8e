#!/usr/bin/env bash
# The main job: builds the examples and compares every policy on a real llama2.c model.
#   ./compare.sh [compare_policies options]      (--help lists them; --models DIR points at the model files)
# Run ./test.sh once first on a fresh machine: it installs the Debian packages this needs.
set -euo pipefail
cd "$(dirname "$0")"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DKVTRIM_WERROR=ON >/dev/null  # fast when configured
echo "compare.sh: building compare_policies" >&2
cmake --build build -j"$(nproc)" --target compare_policies >/dev/null
exec build/examples/compare_policies "$@"
