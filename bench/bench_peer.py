#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""PEER microbenchmark: fastlayers.PEER vs peer-pytorch (same weights), the PyTorch reference
path and dense feedforwards; forward, forward+backward (dense and sparse table gradients), peak
memory and bandwidth on the gathered expert bytes.

    python bench/bench_peer.py [--quick] [--device cpu|cuda] [--reps N] [--out bench/results]

The cases live in the package (fastlayers.benchmark.peer), so ``python -m fastlayers bench`` runs
the same code; results go to bench/results/<device>.md/.csv.
"""

import sys
from pathlib import Path

from fastlayers.__main__ import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", str(Path(__file__).resolve().parent / "results" / "peer")]
    sys.exit(main(["bench", "--family", "peer", *args]))
