# SPDX-License-Identifier: Apache-2.0
"""Pure-PyTorch implementations of every fastlayers op.

They are the specification: the tests compare the kernels with them, the benchmarks use them as a
baseline, and ops fall back to them where no kernel runs (no ``_C``, or a device without kernels).
"""

from fastlayers.reference.fff import (
    fff_hard,
    fff_soft,
    ultrafast_ff,
    ultrafast_ff_backward,
)
from fastlayers.reference.int4_fp8 import (
    dequantize_int4,
    int4_fp8_gemm,
    quantize_fp8_per_token,
    quantize_int4,
)
from fastlayers.reference.peer import (
    peer_experts,
    peer_experts_backward,
    peer_retrieve,
    peer_retrieve_backward,
)
from fastlayers.reference.rmsnorm import (
    fused_add_rms_norm,
    rms_norm,
    rms_norm_backward,
    rms_norm_fp8,
)
from fastlayers.reference.skip import (
    gather_rows,
    route_threshold,
    route_topk,
    scatter_add_gated,
    varlen_attention,
)

__all__ = [
    "rms_norm",
    "fused_add_rms_norm",
    "rms_norm_fp8",
    "rms_norm_backward",
    "ultrafast_ff",
    "ultrafast_ff_backward",
    "fff_hard",
    "fff_soft",
    "peer_retrieve",
    "peer_experts",
    "peer_experts_backward",
    "peer_retrieve_backward",
    "quantize_int4",
    "dequantize_int4",
    "quantize_fp8_per_token",
    "int4_fp8_gemm",
    "route_topk",
    "route_threshold",
    "varlen_attention",
    "gather_rows",
    "scatter_add_gated",
]
