#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# On a lent GPU machine (the device tool runs this from the repository root): build fastlayers for the
# GPU's arch, run the CUDA tests, compute-sanitizer on them, and the benchmark. Everything it writes
# lands in $OUT (or ./gpu-out): copy the results into bench/results/ with the device and commit.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null || cat COMMIT 2>/dev/null
} | tee "$OUT/env.txt"
arch=$(python -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}' + ('a' if (M, m) == (9, 0) else ''))")
export FASTLAYERS_CUDA=ON FASTLAYERS_CUDA_ARCHS="$arch" MAX_JOBS=16
pip install --quiet "scikit-build-core>=1.0" "pybind11>=3.0" "cmake>=3.26" ninja pytest hypothesis 2>&1 | tail -2
pip install --no-build-isolation --no-deps . 2>&1 | tail -3 | tee "$OUT/build.txt"
export FASTLAYERS_REQUIRE_EXTENSION=1
python -m fastlayers info | tee "$OUT/info.txt"
python -m pytest tests -m cuda -q -x 2>&1 | tail -30 | tee "$OUT/pytest_cuda.txt"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
  python -m pytest tests/test_rmsnorm.py tests/test_rmsnorm_backward.py -m cuda -q -x -k "4096 or 769 or 5125" \
  2>&1 | tail -30 | tee "$OUT/memcheck.txt"
python -m fastlayers bench --device cuda --out "$OUT" 2>&1 | tail -40 | tee "$OUT/bench.txt"
