# SPDX-License-Identifier: Apache-2.0
"""Dtype codes shared with ``csrc/common/dtype.h`` (``enum class DType``)."""

import torch

FLOAT32, FLOAT16, BFLOAT16, FLOAT8_E4M3, INT8, UINT8, INT32, INT64 = range(8)

CODES: dict[torch.dtype, int] = {
    torch.float32: FLOAT32,
    torch.float16: FLOAT16,
    torch.bfloat16: BFLOAT16,
    torch.float8_e4m3fn: FLOAT8_E4M3,
    torch.int8: INT8,
    torch.uint8: UINT8,
    torch.int32: INT32,
    torch.int64: INT64,
}

# Activations the kernels take.
FLOATING = (torch.float32, torch.float16, torch.bfloat16)
# Attention queries: the kernels' dtypes, and float64 (the reference runs it, on every route: a
# float64 oracle). No FP8 query: the ops quantize queries themselves, and their output has the
# query's dtype.
QUERIES = (*FLOATING, torch.float64)

FP8_E4M3_MAX = 448.0


def code(dtype: torch.dtype) -> int:
    return CODES[dtype]
