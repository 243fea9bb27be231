#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# On a lent GPU machine (the device tool runs this from the repository root): build fastlayers for the
# GPU's arch, run the CUDA tests, compute-sanitizer (memcheck, racecheck) on a subset, and the
# benchmark. Everything it writes lands in $OUT (or ./gpu-out), at most 8 files: copy the results into
# bench/results/ with the device and commit.
#
# The device machine reaches no package index, so nothing is pip-installed: the build uses the
# scikit-build-core / pybind11 / cmake / ninja already in its image, and falls back to a plain CMake
# build put on PYTHONPATH when pip cannot build (for example an older pybind11 there).
#
# Compiling there costs device time (the Hopper CUTLASS objects alone take minutes): run
# `scripts/prebuild_gpu.sh` here first (CPython 3.12, 90a, into prebuilt/), and the script uses that
# module when it was built from the same sources for the same arch and imports there. For the
# fallback build, the Hopper CUTLASS GEMM needs the CUTLASS headers, which that machine cannot
# download: run `python third_party/fetch_cutlass.py` here too. Carry ["COMMIT", "prebuilt",
# "third_party/cutlass"] (about 32 MB).
#
# usage: scripts/gpu_check.sh [pytest -k expression for the CUDA tests]
#   SANITIZE=0 skips compute-sanitizer; CPU_TESTS=0 skips the CPU tests (which exercise the AVX-512
#   kernels when the device's CPU has AVX-512); BENCH=0 skips the benchmarks; ROW_THREADS_AB=0 skips
#   the RMSNorm tests and benchmark rerun with FASTLAYERS_RMSNORM_ROW_THREADS=128 (part of BENCH). All of it takes more
#   than one 10-minute device command: run it in parts, e.g. first
#   `SANITIZE=0 BENCH=0 scripts/gpu_check.sh`, then `CPU_TESTS=0 scripts/gpu_check.sh "not cuda"`
#   on the still-warm machine (build/gpu-pip is kept between calls, so the second build is incremental).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
KEXPR=${1:-}
[ -f COMMIT ] && export FASTLAYERS_COMMIT=$(head -c 12 COMMIT)
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
log="$OUT/setup.txt"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -m pip show scikit-build-core pybind11 cmake ninja 2>/dev/null | grep -E '^(Name|Version)'
  nvcc --version | tail -2
  echo "commit $(cat COMMIT 2>/dev/null || git rev-parse HEAD 2>/dev/null)"
} >"$log" 2>&1
cat "$log"
arch=$(python3 -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}' + ('a' if (M, m) == (9, 0) else ''))")
export FASTLAYERS_CUDA=ON FASTLAYERS_CUDA_ARCHS="$arch" MAX_JOBS=16
if [ "$arch" = 90a ] && [ ! -f third_party/cutlass/include/cutlass/cutlass.h ]; then
  echo "WARNING: no third_party/cutlass (carry it): a build here would skip the Hopper CUTLASS GEMM" | tee -a "$log"
fi
start=$(date +%s)
prebuilt=0
pytag=$(python3 -c "import sys; print(f'{sys.version_info[0]}{sys.version_info[1]}')")
if [ -f prebuilt/SOURCE_HASH ] && [ "$(cat prebuilt/SOURCE_HASH)" = "$(scripts/source_hash.sh)" ] &&
   [ "$(cat prebuilt/ARCHS 2>/dev/null)" = "$arch" ] && ls prebuilt/_C.cpython-"$pytag"-*.so >/dev/null 2>&1; then
  # Built on the GPU-less machine by scripts/prebuild_gpu.sh from these very sources.
  cp prebuilt/_C.cpython-"$pytag"-*.so python/fastlayers/
  if PYTHONPATH=$PWD/python python3 -c "import fastlayers._C" >>"$log" 2>&1; then
    export PYTHONPATH=$PWD/python
    prebuilt=1
    echo "using prebuilt/ (sources $(cat prebuilt/SOURCE_HASH), $arch)" | tee -a "$log"
  else
    rm -f python/fastlayers/_C.cpython-*.so
    echo "prebuilt/ does not import here (see setup.txt): building" | tee -a "$log"
  fi
elif [ -d prebuilt ]; then
  echo "prebuilt/ is for other sources or archs: building" | tee -a "$log"
fi
if [ "$prebuilt" = 1 ]; then
  :
elif python3 -m pip install --no-build-isolation --no-deps --no-index -Cbuild-dir=build/gpu-pip . >>"$log" 2>&1; then
  echo "built with pip for $arch in $(( $(date +%s) - start )) s" | tee -a "$log"
else
  echo "pip build failed (see setup.txt); plain CMake build" | tee -a "$log"
  cmake -S . -B build/gpu -G Ninja -DFASTLAYERS_CUDA=ON -DFASTLAYERS_CUDA_ARCHS="$arch" \
    -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DSKBUILD_PROJECT_VERSION=0.0.0 >>"$log" 2>&1 &&
    cmake --build build/gpu -j 16 >>"$log" 2>&1 || { tail -40 "$log"; exit 1; }
  cp build/gpu/_C*.so python/fastlayers/
  export PYTHONPATH=$PWD/python
  echo "built with CMake for $arch in $(( $(date +%s) - start )) s" | tee -a "$log"
fi
export FASTLAYERS_REQUIRE_EXTENSION=1
python3 -m fastlayers info 2>&1 | tee -a "$log"

kargs=()
[ -n "$KEXPR" ] && kargs=(-k "$KEXPR")
timeout 300 python3 -m pytest tests -m cuda -q -p no:cacheprovider "${kargs[@]}" >"$OUT/pytest_cuda.txt" 2>&1
echo "pytest rc=$?"; tail -25 "$OUT/pytest_cuda.txt"

if [ "${CPU_TESTS:-1}" = 1 ]; then
  timeout 200 python3 -m pytest tests -m "not cuda" -q -p no:cacheprovider >"$OUT/pytest_cpu.txt" 2>&1
  echo "cpu pytest rc=$?"; tail -3 "$OUT/pytest_cpu.txt"
fi

if [ "${SANITIZE:-1}" = 1 ]; then
san=(compute-sanitizer --error-exitcode 1 --print-limit 20)
sub=(python3 -m pytest tests/test_rmsnorm.py tests/test_rmsnorm_backward.py tests/test_fff.py tests/test_peer.py tests/test_int4_fp8.py tests/test_int4_fp8_sm90.py tests/test_rope_kv.py tests/test_quant_attention.py tests/test_skip.py -m cuda -q -x -p no:cacheprovider
     -k "4096 or 769 or 5125 or fff or ultrafast or experts or retrieve or (gemm_matches and 33) or quantize_fp8 or int4_kv or kv_quantize or fused_rope or row_kernels or varlen or device_prepack or strided_and_unaligned or tensor_core")
{
  echo "== memcheck"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 200 "${san[@]}" --tool memcheck "${sub[@]}" 2>&1 | tail -15
  echo "memcheck rc=${PIPESTATUS[0]}"
  echo "== racecheck"
  timeout 150 "${san[@]}" --tool racecheck "${sub[@]}" 2>&1 | tail -15
  echo "racecheck rc=${PIPESTATUS[0]}"
} >"$OUT/sanitizer.txt" 2>&1
grep -E "rc=|ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitizer.txt"
fi

if [ "${BENCH:-1}" = 1 ]; then
timeout 100 python3 -m pytest bench/bench_dispatch_overhead.py -q -p no:cacheprovider \
  --benchmark-columns=median,iqr,ops --benchmark-sort=name >"$OUT/overhead.txt" 2>&1
echo "overhead rc=$?"; grep -E "test_call_overhead" "$OUT/overhead.txt" | cut -c1-110

timeout 250 python3 -m fastlayers bench --device cuda --reps ${REPS:-30} --out "$OUT" >"$OUT/bench.txt" 2>&1
echo "bench rc=$?"; tail -40 "$OUT/bench.txt"

# The RMSNorm row-threads candidate (row_threads_cap in csrc/rmsnorm/rmsnorm_cuda.cu): the CUDA
# RMSNorm tests and the RMSNorm benchmark again with a row over at most 128 threads, appended to
# pytest_cuda.txt and bench.txt (compare its fractions of the copy bandwidth with the run above).
if [ "${ROW_THREADS_AB:-1}" = 1 ]; then
  export FASTLAYERS_RMSNORM_ROW_THREADS=128
  { echo "== FASTLAYERS_RMSNORM_ROW_THREADS=128"
    timeout 120 python3 -m pytest tests/test_rmsnorm.py tests/test_rmsnorm_backward.py tests/test_nn_rmsnorm.py \
      -m cuda -q -p no:cacheprovider 2>&1 | tail -5; } >>"$OUT/pytest_cuda.txt"
  { echo "== FASTLAYERS_RMSNORM_ROW_THREADS=128"
    timeout 150 python3 -m fastlayers bench --device cuda --family rmsnorm --reps ${REPS:-30} 2>&1; } >>"$OUT/bench.txt"
  unset FASTLAYERS_RMSNORM_ROW_THREADS
  echo "row threads 128:"; grep -A3 "ROW_THREADS=128" "$OUT/pytest_cuda.txt" | tail -3
fi
fi
