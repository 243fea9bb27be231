# SPDX-License-Identifier: Apache-2.0
"""FP8-E4M3 conversions shared by the references: saturating rounding, and the dynamic per-token
(per-row) quantisation that ``rms_norm_fp8`` produces and the INT4 x FP8 GEMM consumes."""

from __future__ import annotations

import torch

from fastlayers._dtypes import FP8_E4M3_MAX

FP8 = torch.float8_e4m3fn


def to_fp8(t: torch.Tensor) -> torch.Tensor:
    """Round to FP8-E4M3 (nearest even), saturating at +-448 (torch's own cast gives NaN past it);
    NaN stays NaN."""
    return t.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8)


def div_rn(t: torch.Tensor, c: float) -> torch.Tensor:
    """``t / c`` rounded once, on every device, as the kernels divide. (PyTorch's CUDA division by
    a Python number multiplies by its rounded reciprocal instead: now and then an ulp off, so a
    scale computed on the GPU would differ in its last bit from the CPU's and the kernels'.)"""
    return t / torch.full((), c, dtype=t.dtype, device=t.device)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xq float8_e4m3fn [..., K], xs fp32 [..., 1])``: ``xs = max|x| / 448`` per row (1 for an
    all-zero row) and ``xq = fp8(clamp(x / xs, -448, 448))``, computed in fp32 (fp64 stays fp64)."""
    xf = x if x.dtype == torch.float64 else x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    xs = torch.where(amax > 0, div_rn(amax, FP8_E4M3_MAX), torch.ones_like(amax))
    return to_fp8(xf / xs), xs
