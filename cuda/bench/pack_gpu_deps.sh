#!/usr/bin/env bash
# Copies the build's header-only dependencies (Eigen3 and Catch2, with their CMake package files) from this
# machine into .gpu-deps/ in the repository root, a CMake prefix that run_gpu.sh uses when present. For GPU
# machines whose image lacks them: carry .gpu-deps (git-ignored, about 11 MB) along with the working tree.
#
#   cuda/bench/pack_gpu_deps.sh [PREFIX=/usr]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SRC="${1:-/usr}"
DST="$ROOT/.gpu-deps"
need() { [ -e "$SRC/$1" ] || { echo "pack_gpu_deps.sh: $SRC/$1 not found (install libeigen3-dev and catch2)"; exit 1; }; }
need include/eigen3
need share/eigen3/cmake
need include/catch2
need lib/cmake/Catch2
need lib/libCatch2WithMain.a  # Catch2's package file names this library (x86-64, like the GPU machines)
rm -rf "$DST"
mkdir -p "$DST/include" "$DST/share/eigen3" "$DST/lib/cmake"
cp -r "$SRC/include/eigen3" "$SRC/include/catch2" "$DST/include/"
cp -r "$SRC/share/eigen3/cmake" "$DST/share/eigen3/"
cp -r "$SRC/lib/cmake/Catch2" "$DST/lib/cmake/"
cp "$SRC/lib/libCatch2WithMain.a" "$DST/lib/"
echo "packed Eigen3 and Catch2 into $DST ($(du -sh "$DST" | cut -f1)); carry .gpu-deps to the GPU machine"
