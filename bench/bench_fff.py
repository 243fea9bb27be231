#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""FFF microbenchmark: UltraFastFeedForward vs dense feedforwards (full and active width), the
PyTorch gather reference, torch.compile of it, and FastFeedForward vs the fastfeedforward package.

    python bench/bench_fff.py [--quick] [--device cpu|cuda] [--reps N] [--out bench/results]

The cases live in the package (fastlayers.benchmark.fff), so ``python -m fastlayers bench`` runs
the same code; results go to bench/results/<device>.md/.csv.
"""

import sys
from pathlib import Path

from fastlayers.__main__ import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", str(Path(__file__).resolve().parent / "results" / "fff")]
    sys.exit(main(["bench", "--family", "fff", *args]))
