# SPDX-License-Identifier: Apache-2.0
"""Host-side call overhead of the ops on tiny inputs (pytest-benchmark; wall time).

On CUDA the calls only enqueue work, so the time is what the host spends per call, launch included.

    python -m pytest bench/bench_dispatch_overhead.py --benchmark-columns=median,ops

Not part of the test suite: speed is reported here, never asserted. Each benchmark still checks that
the call it timed returned the reference's result.
"""

import pytest
import torch

import fastlayers
from fastlayers import reference as ref

CASES = {
    "fastlayers.rms_norm": lambda x, w: fastlayers.rms_norm(x, w),
    "torch.ops.fastlayers.rms_norm": lambda x, w: torch.ops.fastlayers.rms_norm(x, w, 1e-6, 0.0),
    "torch.nn.functional.rms_norm": lambda x, w: torch.nn.functional.rms_norm(x, (8,), w, 1e-6),
    "reference.rms_norm": lambda x, w: ref.rms_norm(x, w),
}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_call_overhead(benchmark, name, device):
    x = torch.randn(1, 8, device=device)
    w = torch.randn(8, device=device)
    y = benchmark(CASES[name], x, w)
    torch.testing.assert_close(y, ref.rms_norm(x, w), rtol=1e-5, atol=1e-6)
