#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Builds the extension module for the lent GPU machine on this GPU-less one, so that device time
# is not spent compiling (the Hopper CUTLASS objects alone take minutes): CPython 3.12 (the device
# image's python3), CUDA archs $ARCHS (default 90a: H100/H200), into prebuilt/ (ignored by git) with
# the hash of the sources (scripts/source_hash.sh) and the archs. scripts/gpu_check.sh uses it when
# the hash and the arch match the tree and the GPU it runs on and the module imports there, and
# builds there otherwise. Carry ["COMMIT", "prebuilt", "third_party/cutlass"] (CUTLASS only matters
# for the fallback build).
#
# usage: scripts/prebuild_gpu.sh        (PY=/path/to/python3.12 ARCHS="90a" to override)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-}
if [ -z "$PY" ]; then
  for c in "$(command -v python3.12 2>/dev/null || true)" "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if [ -n "$c" ] && [ -x "$c" ] && "$c" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then
      PY=$c
      break
    fi
  done
fi
[ -n "$PY" ] || { echo "no python3.12 found: set PY" >&2; exit 1; }
ARCHS=${ARCHS:-90a}
build=build/prebuilt-cp312
start=$(date +%s)
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTLAYERS_CUDA=ON \
  -DFASTLAYERS_CUDA_ARCHS="$ARCHS" -DPython_EXECUTABLE="$PY" \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DSKBUILD_PROJECT_VERSION=0.0.0 >/dev/null
cmake --build "$build" -j "$(nproc)"
rm -rf prebuilt
mkdir -p prebuilt
cp "$build"/_C.cpython-312-*.so prebuilt/
scripts/source_hash.sh >prebuilt/SOURCE_HASH
echo "$ARCHS" >prebuilt/ARCHS
git rev-parse HEAD >prebuilt/COMMIT 2>/dev/null || true
echo "prebuilt/ for $ARCHS, sources $(cat prebuilt/SOURCE_HASH), in $(( $(date +%s) - start )) s:"
ls -l prebuilt
