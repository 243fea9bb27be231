# SPDX-License-Identifier: Apache-2.0
"""Op schemas (``torch.ops.fastlayers.*``) and the public functions that call them.

Pattern for every op (see ``rmsnorm.py``): a schema with ``LIB.define``; CPU and CUDA kernels that
call ``_C`` (the reference when ``_C`` or its CUDA part is missing); the reference for every other
device; a fake (meta) implementation; autograd where the op trains. Argument checks live in one
function per op, called by the kernels and the fake alike, so eager and ``torch.compile`` raise the
same errors.
"""

from fastlayers.ops._common import poison_outputs_enabled, set_poison_outputs
from fastlayers.ops.fff import fff_hard, ultrafast_ff
from fastlayers.ops.int4_fp8 import (
    QuantizedWeight,
    dequantize_int4,
    int4_fp8_gemm,
    quantize_fp8_per_token,
    quantize_int4,
)
from fastlayers.ops.kvint4 import (
    int4_kv_attention,
    int4_kv_decode,
    kv_cache_write,
    kv_quantize,
    q_quantize,
)
from fastlayers.ops.kvint4_paged import (
    int4_kv_attention_paged,
    int4_kv_attention_paged_planned,
    int4_kv_attention_paged_varlen,
    int4_kv_decode_paged,
    kv_cache_write_paged,
    kv_cache_write_paged_planned,
)
from fastlayers.ops.peer import peer_experts, peer_retrieve
from fastlayers.ops.rmsnorm import (
    fused_add_rms_norm,
    fused_add_rms_norm_,
    rms_norm,
    rms_norm_backward,
    rms_norm_fp8,
)
from fastlayers.ops.skip import (
    gather_rows,
    route_threshold,
    route_topk,
    scatter_add_gated,
    varlen_attention,
)

__all__ = [
    "rms_norm",
    "fused_add_rms_norm",
    "fused_add_rms_norm_",
    "rms_norm_fp8",
    "rms_norm_backward",
    "ultrafast_ff",
    "fff_hard",
    "peer_retrieve",
    "peer_experts",
    "QuantizedWeight",
    "quantize_int4",
    "dequantize_int4",
    "quantize_fp8_per_token",
    "int4_fp8_gemm",
    "route_topk",
    "route_threshold",
    "varlen_attention",
    "gather_rows",
    "scatter_add_gated",
    "int4_kv_decode",
    "int4_kv_decode_paged",
    "int4_kv_attention",
    "int4_kv_attention_paged",
    "int4_kv_attention_paged_varlen",
    "int4_kv_attention_paged_planned",
    "kv_quantize",
    "kv_cache_write",
    "kv_cache_write_paged",
    "kv_cache_write_paged_planned",
    "q_quantize",
    "set_poison_outputs",
    "poison_outputs_enabled",
]
