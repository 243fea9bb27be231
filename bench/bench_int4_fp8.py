#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""INT4 x FP8 microbenchmark: fastlayers.Int4Fp8Linear (FP8 per-token quantisation + the INT4 x
FP8 GEMM) on Llama-class layer shapes vs F.linear in float32 and bfloat16 (and, on CUDA,
torch._scaled_mm FP8 x FP8), weights read cold, bandwidth against the measured copy roofline.

    python bench/bench_int4_fp8.py [--quick] [--device cpu|cuda] [--reps N] [--out bench/results]

The cases live in the package (fastlayers.benchmark.int4_fp8), so ``python -m fastlayers bench``
runs the same code; results go to bench/results/int4_fp8/<device>.md/.csv.
"""

import sys
from pathlib import Path

from fastlayers.__main__ import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", str(Path(__file__).resolve().parent / "results" / "int4_fp8")]
    sys.exit(main(["bench", "--family", "int4_fp8", *args]))
