# SPDX-License-Identifier: Apache-2.0
"""Quantization utilities beyond the linear layers: FireQ's RoPE-aware INT4 KV cache.

``compute_pre_rope_scales``, ``compute_post_rope_scales``, ``fold_pre_rope`` and the INT4 KV
quantization functions are plain PyTorch. The Hugging Face pieces (``Int4KVCache``,
``apply_rope_aware_kv``, ``calibrate_rope_aware_kv``) import ``transformers`` when first used.
"""

from fastlayers.quant.kv_cache import Int4KVStore
from fastlayers.quant.paged_cache import DecodeSplit, Int4PagedKVCache, PagedStep, plan_paged_step
from fastlayers.quant.rope_kv import (
    apply_rope,
    compute_post_rope_scales,
    compute_pre_rope_scales,
    dequantize_kv_int4,
    fold_pre_rope,
    quantize_kv_int4,
    quantize_q_fp8,
    rotate_pairs,
)

_HF = ("Int4KVCache", "apply_rope_aware_kv", "calibrate_rope_aware_kv", "remove_rope_aware_kv")


def __getattr__(name):
    if name in _HF:
        from fastlayers.quant import rope_kv_hf

        return getattr(rope_kv_hf, name)
    raise AttributeError(f"module 'fastlayers.quant' has no attribute {name!r}")


__all__ = [
    "Int4KVStore",
    "DecodeSplit",
    "Int4PagedKVCache",
    "PagedStep",
    "plan_paged_step",
    "apply_rope",
    "rotate_pairs",
    "compute_pre_rope_scales",
    "compute_post_rope_scales",
    "fold_pre_rope",
    "quantize_kv_int4",
    "dequantize_kv_int4",
    "quantize_q_fp8",
    *_HF,
]
