# SPDX-License-Identifier: Apache-2.0
"""Loads the compiled module ``fastlayers._C``; importing fastlayers never fails without it.

``FASTLAYERS_NO_EXTENSION=1`` skips loading it (every op then runs its PyTorch reference): the
tests use it to check the pure-Python path on a machine where ``_C`` is built.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

C: ModuleType | None = None
LOAD_ERROR: str | None = None

if os.environ.get("FASTLAYERS_NO_EXTENSION", "") == "1":
    LOAD_ERROR = "disabled by FASTLAYERS_NO_EXTENSION=1"
else:
    try:
        from fastlayers import _C as C  # type: ignore[attr-defined,no-redef]
    except ImportError as e:  # a source checkout without a build, or a broken build
        LOAD_ERROR = f"{type(e).__name__}: {e}"
        warnings.warn(
            f"fastlayers: the compiled kernels (_C) did not load ({LOAD_ERROR}); every op runs its "
            "PyTorch reference. fastlayers.info() shows the state.",
            RuntimeWarning,
            stacklevel=2,
        )


def has_cpu_kernels() -> bool:
    return C is not None


def has_cuda_kernels() -> bool:
    return C is not None and bool(C.has_cuda())


# The ops whose CUDA launchers exist (csrc/*/..._cuda.cu); the others run the reference on CUDA.
CUDA_OPS = frozenset(
    {
        "rms_norm",
        "fused_add_rms_norm",
        "rms_norm_fp8",
        "rms_norm_backward",
        "ultrafast_ff",
        "ultrafast_ff_backward",
        "fff_hard",
        "peer_retrieve",
        "gather_rows",
        "varlen_attention",
        "scatter_add_gated",
        "int4_kv_decode",
        "int4_kv_decode_paged",
        "int4_kv_attention",
        "int4_kv_attention_paged",
        "int4_kv_attention_paged_varlen",
        "kv_quantize",
        "kv_cache_write",
        "kv_cache_write_paged",
        "q_quantize",
        "peer_experts",
        "peer_experts_backward",
        "quantize_fp8_per_token",
        "int4_fp8_gemm",
    }
)


# Hopper-only ops: kernels exist when the build has the 90a CUTLASS objects (run on sm90 GPUs).
SM90_OPS = frozenset({"int4_fp8_gemm_sm90"})


def has_sm90_gemm() -> bool:
    return has_cuda_kernels() and bool(C.has_sm90_gemm())


def has_cuda_kernel(op: str) -> bool:
    if op in SM90_OPS:
        return has_sm90_gemm()
    return has_cuda_kernels() and op in CUDA_OPS


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """One warning per key per process: for fallbacks that would otherwise repeat every call."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
