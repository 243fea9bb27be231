#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""INT4 KV decode microbenchmark: decode attention over an INT4 KV cache (GQA 32/8, head dim 128)
vs bf16 SDPA over a bf16 cache; bandwidth on the INT4 cache bytes against the measured copy
roofline.

    python bench/bench_kv_int4.py [--quick] [--device cpu|cuda] [--reps N] [--out bench/results]

The cases live in the package (fastlayers.benchmark.kv_int4), so ``python -m fastlayers bench``
runs the same code; results go to bench/results/kv_int4/<device>.md/.csv.
"""

import sys
from pathlib import Path

from fastlayers.__main__ import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", str(Path(__file__).resolve().parent / "results" / "kv_int4")]
    sys.exit(main(["bench", "--family", "kv_int4", *args]))
