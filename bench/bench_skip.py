#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""Layer-skip attention microbenchmark: fastlayers.varlen_attention over the tokens a router keeps
(capacity 12.5 / 25 / 50 / 100 %, position-causal among the selected) vs dense causal SDPA over all
tokens; GFLOP/s on the allowed pairs only.

    python bench/bench_skip.py [--quick] [--device cpu|cuda] [--reps N] [--out bench/results]

The cases live in the package (fastlayers.benchmark.skip), so ``python -m fastlayers bench`` runs
the same code; results go to bench/results/skip/<device>.md/.csv.
"""

import sys
from pathlib import Path

from fastlayers.__main__ import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", str(Path(__file__).resolve().parent / "results" / "skip")]
    sys.exit(main(["bench", "--family", "skip", *args]))
