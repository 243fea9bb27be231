# SPDX-License-Identifier: Apache-2.0
"""RMSNorm reference: fp32 arithmetic, rounding points as in Hugging Face Llama / Gemma.

With ``s`` the input (or ``x + residual`` rounded to the storage dtype) and
``r = 1 / sqrt(mean(s**2) + eps)`` in fp32:

* ``weight_offset == 0`` (Llama): ``y = round(round(s * r) * w)``: normalise, cast to the input
  dtype, multiply by the weight.
* ``weight_offset != 0`` (Gemma ``(1 + w)``), or ``round_once`` (``torch.nn.RMSNorm``, which
  multiplies in fp32 and rounds once): ``y = round((s * r) * (weight_offset + w))`` in fp32.
* FP8 output: ``y32 = (s * r) * w``, ``scale = max|y32| / 448`` per row (1 for an all-zero row),
  ``y = fp8_e4m3(clamp(y32 / scale, -448, 448))``.
"""

from __future__ import annotations

import torch

from fastlayers.reference.fp8 import quantize_fp8_per_token


def _acc(t: torch.Tensor) -> torch.Tensor:
    """fp32 arithmetic; float64 inputs stay float64 (the tests' exact oracle)."""
    return t if t.dtype == torch.float64 else t.float()


def _rstd(s: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)


def _normalize(
    s: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    weight_offset: float,
    out_dtype: torch.dtype,
    round_once: bool = False,
) -> torch.Tensor:
    sf = _acc(s)
    n = sf * _rstd(sf, eps)
    if weight_offset == 0.0 and not round_once:
        return (_acc(n.to(out_dtype)) * _acc(weight)).to(out_dtype)
    return (n * (weight_offset + _acc(weight))).to(out_dtype)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
    round_once: bool = False,
) -> torch.Tensor:
    """``y = rms_norm(x) * (weight_offset + weight)``; see the module docstring for rounding."""
    return _normalize(x, weight, eps, weight_offset, x.dtype, round_once)


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
    round_once: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_residual = x + residual`` (rounded to x's dtype); ``y = rms_norm(new_residual)``."""
    s = x + residual
    return _normalize(s, weight, eps, weight_offset, x.dtype, round_once), s


def rms_norm_fp8(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
):
    """FP8-E4M3 output with a dynamic per-row fp32 scale of shape ``x.shape[:-1] + (1,)``.

    Returns ``(y_fp8, scale)``, or ``(y_fp8, scale, new_residual)`` when ``residual`` is given.
    ``y_fp8.float() * scale`` approximates ``rms_norm(x) * weight`` computed in fp32.
    """
    s = x if residual is None else x + residual
    sf = _acc(s)
    y = (sf * _rstd(sf, eps)) * _acc(weight)
    q, scale = quantize_fp8_per_token(y)
    return (q, scale) if residual is None else (q, scale, s)


def rms_norm_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
    grad_residual: torch.Tensor | None = None,
    round_once: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`rms_norm` w.r.t. ``x`` and ``weight``, in fp32, cast to their dtypes.

    The rounding in the forward is treated as the identity (as autograd does for ``.to``), except
    that ``dweight`` uses the rounded normalised value the Llama form multiplies by.
    ``grad_residual`` (the gradient reaching ``new_residual`` of the fused add) is added to ``dx``.
    """
    sf = _acc(x)
    dy = _acc(grad_y)
    r = _rstd(sf, eps)
    g = dy * (weight_offset + _acc(weight))
    dx = r * g - sf * (r * r * r) * (g * sf).mean(-1, keepdim=True)
    if grad_residual is not None:
        dx = dx + _acc(grad_residual)
    n = sf * r
    if weight_offset == 0.0 and not round_once:
        n = _acc(n.to(x.dtype))
    dw = (dy * n).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)
