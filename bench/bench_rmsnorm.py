#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""RMSNorm microbenchmark: fastlayers vs torch.nn.RMSNorm, the HF eager formula and torch.compile.

    python bench/bench_rmsnorm.py [--quick] [--device cpu|cuda] [--reps N] [--out bench/results]

The harness and the cases live in the package (fastlayers.benchmark) so that the installed CLI,
``python -m fastlayers bench``, runs the same code; results go to bench/results/<device>.md/.csv.
"""

import sys
from pathlib import Path

from fastlayers.__main__ import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", str(Path(__file__).resolve().parent / "results")]
    sys.exit(main(["bench", "--family", "rmsnorm", *args]))
