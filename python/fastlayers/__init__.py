# SPDX-License-Identifier: Apache-2.0
"""fastlayers: hand-written C++/CUDA kernels for transformer layers, as drop-in torch.nn modules.

Every op has a pure-PyTorch reference in :mod:`fastlayers.reference`; without the compiled part
(``fastlayers._C``) every op runs it, and :func:`info` says so.
"""

from fastlayers import nn, quant, reference
from fastlayers._info import info
from fastlayers.nn import (
    PEER,
    FastFeedForward,
    Int4Fp8Linear,
    RMSNorm,
    RopeAwareQuantAttention,
    RoutedSelfAttention,
    UltraFastFeedForward,
)
from fastlayers.ops import (
    QuantizedWeight,
    dequantize_int4,
    fff_hard,
    fused_add_rms_norm,
    fused_add_rms_norm_,
    gather_rows,
    int4_fp8_gemm,
    peer_experts,
    peer_retrieve,
    quantize_fp8_per_token,
    quantize_int4,
    rms_norm,
    rms_norm_backward,
    rms_norm_fp8,
    route_threshold,
    route_topk,
    scatter_add_gated,
    ultrafast_ff,
    varlen_attention,
)
from fastlayers.patch import PatchReport, patch_model, unpatch_model
from fastlayers.quantize import QuantizeConfig, QuantizeReport, quantize_
from fastlayers.skip_plan import (
    LayerPlan,
    LayerSkipCache,
    SkipPlan,
    apply_skip_plan,
    remove_skip_plan,
    self_speculative_generate,
)
from fastlayers.version import __version__

__all__ = [
    "__version__",
    "info",
    "nn",
    "quant",
    "reference",
    "RMSNorm",
    "rms_norm",
    "fused_add_rms_norm",
    "fused_add_rms_norm_",
    "rms_norm_fp8",
    "rms_norm_backward",
    "FastFeedForward",
    "UltraFastFeedForward",
    "ultrafast_ff",
    "fff_hard",
    "PEER",
    "peer_retrieve",
    "peer_experts",
    "Int4Fp8Linear",
    "QuantizedWeight",
    "quantize_int4",
    "dequantize_int4",
    "quantize_fp8_per_token",
    "int4_fp8_gemm",
    "RoutedSelfAttention",
    "RopeAwareQuantAttention",
    "route_topk",
    "route_threshold",
    "varlen_attention",
    "gather_rows",
    "scatter_add_gated",
    "patch_model",
    "unpatch_model",
    "PatchReport",
    "SkipPlan",
    "LayerPlan",
    "LayerSkipCache",
    "apply_skip_plan",
    "remove_skip_plan",
    "self_speculative_generate",
    "quantize_",
    "QuantizeConfig",
    "QuantizeReport",
]
