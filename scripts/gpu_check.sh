#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# On a lent GPU machine (the device tool runs this from the repository root): build (or take the
# prebuilt) fastlayers for the GPU's arch, then run phases in order of priority, each under its own
# time cap and all of them under one deadline, so that one device command of fixed length returns
# whatever finished: the CUDA tests, the benchmark (one family at a time), compute-sanitizer memcheck
# and racecheck per test file, the RMSNorm row-threads A/B, the host overhead, the CPU tests.
# A phase that would get under 20 s is skipped and says so in phases.txt; the next call can run
# the rest (PHASES=...). Copy the results into bench/results/ with the device and commit.
#
# What comes back ($OUT, or ./gpu-out): setup.txt (device, versions, build, `fastlayers info`),
# phases.txt (each phase's exit status and seconds), pytest_cuda.txt (also inside results.tgz) and
# results.tgz (every phase's output; each bench family's table, .md and .csv).
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
# usage: [PHASES="tests bench memcheck racecheck rowthreads overhead cputests"] [DEADLINE=540]
#        [REPS=20] [FAMILIES=...] [COMPILE_FAMILIES=fff] scripts/gpu_check.sh [pytest -k expression]
#   DEADLINE: seconds from the start by which every phase has ended (keep it under the device
#   command's timeout_s); FAMILIES: the benchmark families, in order; COMPILE_FAMILIES: those
#   benchmarked against torch.compile too (seconds of compilation per shape; FFF's target is
#   against it); FAMILY_CAP: seconds per family (default 100).
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-$PWD/gpu-out}
R="$OUT/r"
mkdir -p "$R"
KEXPR=${1:-}
DEADLINE=${DEADLINE:-540}
PHASES=${PHASES:-tests bench memcheck racecheck rowthreads overhead}
FAMILIES=${FAMILIES:-rmsnorm int4_fp8 skip kv_int4 peer fff}
COMPILE_FAMILIES=${COMPILE_FAMILIES:-fff}
REPS=${REPS:-20}
[ -f COMMIT ] && export FASTLAYERS_COMMIT=$(head -c 12 COMMIT)
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

finish() {
  tar czf "$OUT/results.tgz" -C "$R" . && rm -rf "$R"
  echo "total $(( $(date +%s) - T0 )) s"
}
trap finish EXIT

# phase NAME CAP CMD...: runs CMD under min(CAP, time left before the deadline).
phase() {
  local name=$1 cap=$2
  shift 2
  local left=$(( DEADLINE - ($(date +%s) - T0) ))
  local t=$(( cap < left ? cap : left ))
  if [ "$left" -lt 20 ]; then
    echo "$name: skipped (${left} s left before the deadline)" | tee -a "$OUT/phases.txt"
    return 0
  fi
  local s=$(date +%s)
  timeout "$t" "$@"
  local rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - s )) s (cap $t s)" | tee -a "$OUT/phases.txt"
  return "$rc"
}
want() { [[ " $PHASES " == *" $1 "* ]]; }

log="$OUT/setup.txt"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,temperature.gpu --format=csv
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
# The Hopper GEMM first, alone under short caps: it runs CUTLASS's stream-K scheduler (data-parallel
# or split-K), never run on a GPU here before, which has hung mixed-input kernels in other
# configurations (NVIDIA/cutlass#1917). A data-parallel shape: if it fails or hangs, the later
# phases leave the sm90 GEMM out (its tests and the int4_fp8 benchmark). Then the split-K tests: if
# they fail or hang, the later phases run with FASTLAYERS_SM90_SPLIT_K=0 (data-parallel only). So
# one bad kernel does not eat the tests' and the benchmark's time.
MARK=cuda
if [ "$arch" = 90a ] && { want tests || want bench; }; then
  sm90_probe() {  # NAME CAP -k EXPRESSION
    phase "$1" "$2" python3 -m pytest tests/test_int4_fp8_sm90.py -m cuda -x -q -p no:cacheprovider -rfE \
      --tb=short -k "$3" >"$R/${1// /_}.txt" 2>&1
    local rc=$?
    tail -3 "$R/${1// /_}.txt"
    return "$rc"
  }
  if ! sm90_probe "sm90 data-parallel probe" 60 "gemm_matches_oracle and 300-128-256"; then
    MARK="cuda and not sm90"
    FAMILIES=${FAMILIES//int4_fp8/}
    echo "sm90 GEMM probe failed or timed out: its tests and benchmark left out" | tee -a "$OUT/phases.txt"
  elif ! sm90_probe "sm90 split-K probe" 90 "split_k"; then
    export FASTLAYERS_SM90_SPLIT_K=0
    echo "split-K probe failed or timed out: FASTLAYERS_SM90_SPLIT_K=0 from here" | tee -a "$OUT/phases.txt"
  fi
fi

if want tests; then
  phase tests 240 python3 -m pytest tests -m "$MARK" -q -p no:cacheprovider -rfE --tb=short \
    --durations=20 "${kargs[@]}" >"$R/pytest_cuda.txt" 2>&1
  cp "$R/pytest_cuda.txt" "$OUT/"
  grep -E "^(FAILED|ERROR)" "$R/pytest_cuda.txt" | head -40; tail -2 "$R/pytest_cuda.txt"
fi

if want bench; then
  for fam in $FAMILIES; do
    compile=(--no-compile)
    [[ " $COMPILE_FAMILIES " == *" $fam "* ]] && compile=()
    phase "bench $fam" "${FAMILY_CAP:-100}" python3 -m fastlayers bench --device cuda --family "$fam" \
      --reps "$REPS" "${compile[@]}" --out "$R/bench_$fam" >"$R/bench_$fam.txt" 2>&1
    sed -n '/^op  /,$p' "$R/bench_$fam.txt" | cut -c1-150 | head -16
  done
fi

# compute-sanitizer, one test file at a time under its own cap (SAN_FILE_CAP seconds, default 30),
# so that every family's kernels get checked: under memcheck a test takes 1-2 s (the H200 run of
# dd55068 got through 124 tests of one long list in 200 s, all of them RMSNorm and FFF).
san=(compute-sanitizer --error-exitcode 1 --print-limit 20)
san_files=(test_rmsnorm test_rmsnorm_backward test_fff test_peer test_int4_fp8 test_int4_fp8_sm90
           test_rope_kv test_kv_paged test_quant_attention test_skip)
if [ "$MARK" != cuda ]; then  # (the sm90 probe failed)
  keep=()
  for f in "${san_files[@]}"; do [ "$f" = test_int4_fp8_sm90 ] || keep+=("$f"); done
  san_files=("${keep[@]}")
fi
san_k="4096 or 769 or 5125 or fff or ultrafast or experts or retrieve or (gemm_matches and 33) or quantize_fp8 or int4_kv or kv_quantize or fused_rope or row_kernels or varlen or device_prepack or strided_and_unaligned or tensor_core or split_k_matches or splits_decode or plan_paged_step"
for tool in memcheck racecheck; do
  want "$tool" || continue
  # First the tensor-core attention tile (mma.sync, ldmatrix, cp.async; rewritten after the H200
  # run of dd55068 and checked only in the CPU emulation since), the tensor-core INT4 decode and
  # the tensor-core varlen backward, the head-dim-256 paths and the INT4 CUDA-core kernels' rows
  # narrower than 32 lanes' worth (head_dim 80 / 96; new since): later in their files, the per-file
  # caps would not reach them.
  PYTORCH_NO_CUDA_MEMORY_CACHING=$([ "$tool" = memcheck ] && echo 1 || echo 0) \
    phase "$tool tensor-core attention" "${SAN_FILE_CAP:-30}" "${san[@]}" --tool "$tool" python3 -m pytest \
    tests/test_skip.py tests/test_rope_kv.py -m cuda -q -p no:cacheprovider \
    -k "tensor_core_forward or tensor_core_backward or many_empty or tile_classes or tensor_core_prefill or decode_tensor_core or head_dim_256 or keys_wider or cuda_cores_take" \
    >"$R/${tool}_tc_attention.txt" 2>&1
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|Invalid|hazard" "$R/${tool}_tc_attention.txt" | head -5
  for f in "${san_files[@]}"; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=$([ "$tool" = memcheck ] && echo 1 || echo 0) \
      phase "$tool $f" "${SAN_FILE_CAP:-30}" "${san[@]}" --tool "$tool" python3 -m pytest "tests/$f.py" \
      -m cuda -q -p no:cacheprovider -k "$san_k" >"$R/${tool}_$f.txt" 2>&1
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|Invalid|hazard" "$R/${tool}_$f.txt" | head -5
    tail -c 300 "$R/${tool}_$f.txt" | tr -d '\n' | tail -c 120; echo
  done
done

# The RMSNorm row-threads A/B (row_threads_cap in csrc/rmsnorm/rmsnorm_cuda.cu, default 128): its
# CUDA tests and the RMSNorm benchmark again with rows over up to ROW_THREADS_ALT threads (default
# 512, the launch before f1bdcd3; compare the fractions of the copy bandwidth with bench_rmsnorm).
if want rowthreads; then
  alt=${ROW_THREADS_ALT:-512}
  FASTLAYERS_RMSNORM_ROW_THREADS=$alt phase "rowthreads $alt tests" 90 python3 -m pytest \
    tests/test_rmsnorm.py tests/test_rmsnorm_backward.py tests/test_nn_rmsnorm.py -m cuda -q \
    -p no:cacheprovider >"$R/rowthreads_pytest.txt" 2>&1
  tail -2 "$R/rowthreads_pytest.txt"
  FASTLAYERS_RMSNORM_ROW_THREADS=$alt phase "rowthreads $alt bench" 100 python3 -m fastlayers bench \
    --device cuda --family rmsnorm --reps "$REPS" --no-compile --out "$R/rowthreads" \
    >"$R/rowthreads_bench.txt" 2>&1
fi

if want overhead; then
  phase overhead 60 python3 -m pytest bench/bench_dispatch_overhead.py -q -p no:cacheprovider \
    --benchmark-columns=median,iqr,ops --benchmark-sort=name >"$R/overhead.txt" 2>&1
  grep -E "test_call_overhead" "$R/overhead.txt" | cut -c1-110
fi

if want cputests; then
  phase cputests 200 python3 -m pytest tests -m "not cuda" -q -p no:cacheprovider >"$R/pytest_cpu.txt" 2>&1
  tail -3 "$R/pytest_cpu.txt"
fi
