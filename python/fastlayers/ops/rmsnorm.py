# SPDX-License-Identifier: Apache-2.0
"""Fused RMSNorm ops: ``rms_norm``, ``fused_add_rms_norm``, ``rms_norm_fp8`` and the backward.

Semantics and rounding are those of :mod:`fastlayers.reference.rmsnorm` (the specification).
"""

from __future__ import annotations

import torch

from fastlayers import _dtypes, _ext
from fastlayers import reference as ref
from fastlayers.ops._common import (
    LIB,
    check_activation,
    check_eps,
    check_like,
    check_no_alias,
    check_tensor,
    cuda_sm_count,
    device_code,
    device_guard,
    direct_call_ok,
    empty,
    has_kernel,
    on_cuda,
    ptr,
    register_no_backward,
    row_stride,
    rows_view,
    stream_of,
)

LIB.define(
    "rms_norm(Tensor x, Tensor weight, float eps, float weight_offset, bool round_once=False)"
    " -> Tensor"
)
LIB.define(
    "fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, float weight_offset,"
    " bool round_once=False) -> (Tensor, Tensor)"
)
LIB.define("rms_norm_fp8(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)")
LIB.define(
    "fused_add_rms_norm_fp8(Tensor x, Tensor residual, Tensor weight, float eps)"
    " -> (Tensor, Tensor, Tensor)"
)
LIB.define(
    "rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, float eps, float weight_offset,"
    " Tensor? grad_residual, bool round_once=False) -> (Tensor, Tensor)"
)
register_no_backward("rms_norm_fp8", "fused_add_rms_norm_fp8", "rms_norm_backward")

# Inference variants that write into the caller's buffers (FlashInfer's ``out=`` and in-place fused
# add): no allocation per call, which on CPU is a page-fault pass over every fresh output page.
LIB.define(
    "rms_norm_out(Tensor x, Tensor weight, float eps, float weight_offset, Tensor(a!) out,"
    " bool round_once=False) -> ()"
)
LIB.define(
    "fused_add_rms_norm_inplace(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps,"
    " float weight_offset, bool round_once=False) -> ()"
)

# CPU dw partials: a fixed number of row chunks, so the result does not depend on the thread count.
_CPU_DW_CHUNKS = 64


# ----------------------------------------------------------------------------------------------
# Checks (shared by the kernels and the fakes)
# ----------------------------------------------------------------------------------------------
def _check(x, weight, eps, residual=None) -> None:
    check_activation(x, "x")
    check_tensor(weight, "weight")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape ({x.shape[-1]},) to match x's hidden size, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype and weight.dtype != torch.float32:
        raise TypeError(f"weight must have x's dtype ({x.dtype}) or float32, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    check_eps(eps)
    if residual is not None:
        check_like(residual, "residual", x)


def _check_written(t, name: str, x: torch.Tensor) -> None:
    """A caller's buffer the kernel writes: x's shape, dtype and device, and contiguous."""
    check_like(t, name, x)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def _check_no_grad(name: str, *tensors) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(
            f"{name} writes into the caller's buffers and does not support autograd, but an input "
            "requires grad; call it under torch.no_grad() or use the allocating form"
        )


def _num_partials(device: torch.device, rows: int) -> int:
    cap = _CPU_DW_CHUNKS
    if on_cuda(device):
        # Two CTAs per SM keep every SM busy while the partials stay small ([2 * SMs, hidden]).
        cap = 2 * cuda_sm_count(device)
    return max(1, min(rows, cap))


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
def _launch_forward(
    x, residual, weight, eps, weight_offset, y, residual_out, scale, round_once=False, fresh=False
) -> None:
    """``fresh``: y (and residual_out) were just allocated for this call, not a caller's buffers
    (the CPU kernel then writes them with plain stores, see rmsnorm_cpu_kernels.cpp)."""
    n = x.shape[-1]
    x2 = rows_view(x)
    r2 = rows_view(residual) if residual is not None else None
    w = weight.contiguous()  # held here: a temporary inside the call would be freed before it runs
    with device_guard(x.device):
        _ext.C.rms_norm_fwd(
            device_code(x.device),
            ptr(x2), row_stride(x2),
            ptr(r2), row_stride(r2) if r2 is not None else 0,
            ptr(w),
            ptr(y), ptr(residual_out), ptr(scale),
            x2.shape[0], n,
            _dtypes.code(x.dtype), _dtypes.code(weight.dtype), _dtypes.code(y.dtype),
            eps, weight_offset, round_once, fresh,
            stream_of(x.device),
        )  # fmt: skip


def _rms_norm_kernel(x, weight, eps, weight_offset, round_once=False):
    _check(x, weight, eps)
    if not has_kernel(x.device, "rms_norm"):
        return ref.rms_norm(x, weight, eps, weight_offset, round_once)
    y = empty(x.shape, x.dtype, x.device)
    if x.numel() > 0:
        _launch_forward(x, None, weight, eps, weight_offset, y, None, None, round_once, fresh=True)
    return y


def _fused_add_rms_norm_kernel(x, residual, weight, eps, weight_offset, round_once=False):
    _check(x, weight, eps, residual)
    if not has_kernel(x.device, "fused_add_rms_norm"):
        return ref.fused_add_rms_norm(x, residual, weight, eps, weight_offset, round_once)
    y = empty(x.shape, x.dtype, x.device)
    new_residual = empty(x.shape, x.dtype, x.device)
    if x.numel() > 0:
        _launch_forward(
            x, residual, weight, eps, weight_offset, y, new_residual, None, round_once, fresh=True
        )
    return y, new_residual


def _rms_norm_out_kernel(x, weight, eps, weight_offset, out, round_once=False):
    _check(x, weight, eps)
    _check_written(out, "out", x)
    check_no_alias({"out": out}, {"x": x, "weight": weight}, {("out", "x")})
    if not has_kernel(x.device, "rms_norm"):
        out.copy_(ref.rms_norm(x, weight, eps, weight_offset, round_once))
    elif x.numel() > 0:
        _launch_forward(x, None, weight, eps, weight_offset, out, None, None, round_once)


def _fused_add_rms_norm_inplace_kernel(x, residual, weight, eps, weight_offset, round_once=False):
    _check(x, weight, eps, residual)
    _check_written(x, "x", x)
    _check_written(residual, "residual", x)
    check_no_alias({"x": x}, {"residual": residual, "weight": weight}, set())
    check_no_alias({"residual": residual}, {"weight": weight}, set())
    if not has_kernel(x.device, "fused_add_rms_norm"):
        _fused_add_rms_norm_inplace_reference(x, residual, weight, eps, weight_offset, round_once)
    elif x.numel() > 0:
        # The kernel reads x and residual at an element, then writes residual_out there; later it
        # reads residual_out back and writes y: in place is safe element by element.
        _launch_forward(x, residual, weight, eps, weight_offset, x, residual, None, round_once)


def _fp8_forward(x, residual, weight, eps):
    _check(x, weight, eps, residual)
    if not has_kernel(x.device, "rms_norm_fp8"):
        return ref.rms_norm_fp8(x, weight, eps, residual)
    y = empty(x.shape, torch.float8_e4m3fn, x.device)
    scale = empty(x.shape[:-1] + (1,), torch.float32, x.device)
    new_residual = empty(x.shape, x.dtype, x.device) if residual is not None else None
    if x.numel() > 0:
        _launch_forward(x, residual, weight, eps, 0.0, y, new_residual, scale)
    return (y, scale) if residual is None else (y, scale, new_residual)


def _rms_norm_fp8_kernel(x, weight, eps):
    return _fp8_forward(x, None, weight, eps)


def _fused_add_rms_norm_fp8_kernel(x, residual, weight, eps):
    return _fp8_forward(x, residual, weight, eps)


def _rms_norm_backward_kernel(
    grad_y, x, weight, eps, weight_offset, grad_residual, round_once=False
):
    _check(x, weight, eps)
    check_like(grad_y, "grad_y", x)
    if grad_residual is not None:
        check_like(grad_residual, "grad_residual", x)
    if not has_kernel(x.device, "rms_norm_backward"):
        return ref.rms_norm_backward(
            grad_y, x, weight, eps, weight_offset, grad_residual, round_once
        )
    n = x.shape[-1]
    rows = x.numel() // n
    dx = empty(x.shape, x.dtype, x.device)
    dw = empty(weight.shape, weight.dtype, weight.device)
    partials = _num_partials(x.device, rows)
    workspace = empty((partials, n), torch.float32, x.device)
    x2 = rows_view(x)
    dy2 = grad_y.contiguous().view(-1, n)
    dr2 = grad_residual.contiguous().view(-1, n) if grad_residual is not None else None
    w = weight.contiguous()  # held here: a temporary inside the call would be freed before it runs
    with device_guard(x.device):
        _ext.C.rms_norm_bwd(
            device_code(x.device),
            ptr(dy2), ptr(x2), row_stride(x2), ptr(w), ptr(dr2),
            ptr(dx), ptr(dw), ptr(workspace), partials,
            rows, n,
            _dtypes.code(x.dtype), _dtypes.code(weight.dtype),
            eps, weight_offset, round_once,
            stream_of(x.device),
        )  # fmt: skip
    return dx, dw


_KERNELS = {
    "rms_norm": _rms_norm_kernel,
    "fused_add_rms_norm": _fused_add_rms_norm_kernel,
    "rms_norm_fp8": _rms_norm_fp8_kernel,
    "fused_add_rms_norm_fp8": _fused_add_rms_norm_fp8_kernel,
    "rms_norm_backward": _rms_norm_backward_kernel,
}
_REFERENCES = {
    "rms_norm": ref.rms_norm,
    "fused_add_rms_norm": ref.fused_add_rms_norm,
    "rms_norm_fp8": ref.rms_norm_fp8,
    "fused_add_rms_norm_fp8": lambda x, residual, weight, eps: ref.rms_norm_fp8(
        x, weight, eps, residual
    ),
    "rms_norm_backward": ref.rms_norm_backward,
}


def _rms_norm_out_reference(x, weight, eps, weight_offset, out, round_once=False):
    out.copy_(ref.rms_norm(x, weight, eps, weight_offset, round_once))


def _fused_add_rms_norm_inplace_reference(
    x, residual, weight, eps, weight_offset, round_once=False
):
    y, new_residual = ref.fused_add_rms_norm(x, residual, weight, eps, weight_offset, round_once)
    x.copy_(y)
    residual.copy_(new_residual)


_KERNELS["rms_norm_out"] = _rms_norm_out_kernel
_KERNELS["fused_add_rms_norm_inplace"] = _fused_add_rms_norm_inplace_kernel
_REFERENCES["rms_norm_out"] = _rms_norm_out_reference
_REFERENCES["fused_add_rms_norm_inplace"] = _fused_add_rms_norm_inplace_reference
for _name, _fn in _KERNELS.items():
    LIB.impl(_name, _fn, "CPU")
    LIB.impl(_name, _fn, "CUDA")
    # Every other device (mps, xpu, ...) runs the reference.
    LIB.impl(_name, _REFERENCES[_name], "CompositeExplicitAutograd")


# ----------------------------------------------------------------------------------------------
# Fakes (shapes only) for torch.compile / meta tensors
# ----------------------------------------------------------------------------------------------
@torch.library.register_fake("fastlayers::rms_norm", lib=LIB)
def _rms_norm_fake(x, weight, eps, weight_offset, round_once=False):
    _check(x, weight, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastlayers::fused_add_rms_norm", lib=LIB)
def _fused_add_rms_norm_fake(x, residual, weight, eps, weight_offset, round_once=False):
    _check(x, weight, eps, residual)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    )


def _fp8_fake(x, residual, weight, eps):
    _check(x, weight, eps, residual)
    y = x.new_empty(x.shape, dtype=torch.float8_e4m3fn)
    scale = x.new_empty(x.shape[:-1] + (1,), dtype=torch.float32)
    return (y, scale) if residual is None else (y, scale, x.new_empty(x.shape))


@torch.library.register_fake("fastlayers::rms_norm_fp8", lib=LIB)
def _rms_norm_fp8_fake(x, weight, eps):
    return _fp8_fake(x, None, weight, eps)


@torch.library.register_fake("fastlayers::fused_add_rms_norm_fp8", lib=LIB)
def _fused_add_rms_norm_fp8_fake(x, residual, weight, eps):
    return _fp8_fake(x, residual, weight, eps)


@torch.library.register_fake("fastlayers::rms_norm_out", lib=LIB)
def _rms_norm_out_fake(x, weight, eps, weight_offset, out, round_once=False):
    _check(x, weight, eps)
    _check_written(out, "out", x)


@torch.library.register_fake("fastlayers::fused_add_rms_norm_inplace", lib=LIB)
def _fused_add_rms_norm_inplace_fake(x, residual, weight, eps, weight_offset, round_once=False):
    _check(x, weight, eps, residual)
    _check_written(x, "x", x)
    _check_written(residual, "residual", x)


@torch.library.register_fake("fastlayers::rms_norm_backward", lib=LIB)
def _rms_norm_backward_fake(grad_y, x, weight, eps, weight_offset, grad_residual, round_once=False):
    _check(x, weight, eps)
    check_like(grad_y, "grad_y", x)
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
def _setup_rms_norm(ctx, inputs, output):
    x, weight, eps, weight_offset, *rest = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.weight_offset, ctx.round_once = eps, weight_offset, bool(rest and rest[0])


def _backward_rms_norm(ctx, grad_y):
    x, weight = ctx.saved_tensors
    dx, dw = torch.ops.fastlayers.rms_norm_backward(
        grad_y, x, weight, ctx.eps, ctx.weight_offset, None, ctx.round_once
    )
    return dx, dw if ctx.needs_input_grad[1] else None, None, None, None


def _setup_fused_add(ctx, inputs, output):
    _, _, weight, eps, weight_offset, *rest = inputs
    ctx.save_for_backward(output[1], weight)  # the rounded sum is what was normalised
    ctx.eps, ctx.weight_offset, ctx.round_once = eps, weight_offset, bool(rest and rest[0])


def _backward_fused_add(ctx, grad_y, grad_residual):
    s, weight = ctx.saved_tensors
    ds, dw = torch.ops.fastlayers.rms_norm_backward(
        grad_y, s, weight, ctx.eps, ctx.weight_offset, grad_residual, ctx.round_once
    )
    return ds, ds, dw if ctx.needs_input_grad[2] else None, None, None, None


torch.library.register_autograd(
    "fastlayers::rms_norm", _backward_rms_norm, setup_context=_setup_rms_norm, lib=LIB
)
torch.library.register_autograd(
    "fastlayers::fused_add_rms_norm", _backward_fused_add, setup_context=_setup_fused_add, lib=LIB
)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
    *,
    out: torch.Tensor | None = None,
    round_once: bool = False,
) -> torch.Tensor:
    """Root-mean-square normalisation over the last dimension.

    Parameters
    ----------
    x : torch.Tensor
        ``[..., hidden]``, float32 / float16 / bfloat16, any strides.
    weight : torch.Tensor
        ``[hidden]``, x's dtype or float32, on x's device.
    eps : float
        Added to ``mean(x**2)`` inside the square root.
    weight_offset : float
        0 for the Llama form ``w * round(x * r)``; 1.0 for the Gemma form ``x * r * (1 + w)``
        computed in fp32.
    round_once : bool
        ``torch.nn.RMSNorm``'s rounding: ``x * r * (weight_offset + w)`` in fp32, rounded once
        (the Gemma form's arithmetic, with any offset, 0 included).

    out : torch.Tensor, optional
        Write the result here instead of allocating: x's shape and dtype, contiguous, on x's
        device; it may be ``x`` itself (in place) but may not otherwise share memory with ``x``
        or ``weight``. Inference only (no autograd).

    Returns
    -------
    torch.Tensor
        ``[..., hidden]`` in x's dtype, contiguous (``out`` when given). Differentiable w.r.t.
        ``x`` and ``weight`` (without ``out``).
    """
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    check_eps(eps)
    if out is not None:
        check_tensor(out, "out")
        _check_no_grad("rms_norm(out=...)", x, weight, out)
        if direct_call_ok(x, weight, out):
            _rms_norm_out_kernel(x, weight, float(eps), float(weight_offset), out, bool(round_once))
        else:
            torch.ops.fastlayers.rms_norm_out(
                x, weight, float(eps), float(weight_offset), out, bool(round_once)
            )
        return out
    if direct_call_ok(x, weight):
        return _rms_norm_kernel(x, weight, float(eps), float(weight_offset), bool(round_once))
    return torch.ops.fastlayers.rms_norm(
        x, weight, float(eps), float(weight_offset), bool(round_once)
    )


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
    *,
    round_once: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add and RMSNorm in one pass (the Hugging Face decoder-layer order).

    ``new_residual = x + residual`` rounded to x's dtype, ``y = rms_norm(new_residual, weight)``.
    ``residual`` must match x in shape, dtype and device. Returns ``(y, new_residual)``, both
    ``[..., hidden]`` and contiguous. Differentiable w.r.t. ``x``, ``residual`` and ``weight``.
    """
    check_tensor(x, "x")
    check_tensor(residual, "residual")
    check_tensor(weight, "weight")
    check_eps(eps)
    args = (x, residual, weight, float(eps), float(weight_offset), bool(round_once))
    if direct_call_ok(x, residual, weight):
        return _fused_add_rms_norm_kernel(*args)
    return torch.ops.fastlayers.fused_add_rms_norm(*args)


def fused_add_rms_norm_(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
    *,
    round_once: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place :func:`fused_add_rms_norm` (the FlashInfer / vLLM calling convention):
    ``residual`` becomes ``x + residual`` (rounded to x's dtype) and ``x`` becomes its RMSNorm.

    Both must be contiguous, of the same shape, dtype and device, and may not share memory with
    each other or with ``weight``. Inference only (no autograd). Returns ``(x, residual)``.
    """
    check_tensor(x, "x")
    check_tensor(residual, "residual")
    check_tensor(weight, "weight")
    check_eps(eps)
    _check_no_grad("fused_add_rms_norm_", x, residual, weight)
    args = (x, residual, weight, float(eps), float(weight_offset), bool(round_once))
    if direct_call_ok(x, residual, weight):
        _fused_add_rms_norm_inplace_kernel(*args)
    else:
        torch.ops.fastlayers.fused_add_rms_norm_inplace(*args)
    return x, residual


def rms_norm_fp8(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
):
    """RMSNorm with FP8-E4M3 output and a dynamic per-token scale (inference only).

    ``y32 = rms_norm(s) * weight`` in fp32 (``s = x`` or ``x + residual`` rounded to x's dtype),
    ``scale = max|y32| / 448`` per row (1 for an all-zero row), ``y = fp8(y32 / scale)``.

    Returns
    -------
    (y, scale) or (y, scale, new_residual)
        ``y``: ``[..., hidden]`` ``torch.float8_e4m3fn``; ``scale``: ``[..., 1]`` float32, so that
        ``y.float() * scale`` dequantises; ``new_residual`` when ``residual`` is given.
    """
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    check_eps(eps)
    if residual is not None:
        check_tensor(residual, "residual")
    if direct_call_ok(x, weight, residual):  # FP8 output is inference only: no autograd to skip
        return _fp8_forward(x, residual, weight, float(eps))
    if residual is None:
        return torch.ops.fastlayers.rms_norm_fp8(x, weight, float(eps))
    return torch.ops.fastlayers.fused_add_rms_norm_fp8(x, residual, weight, float(eps))


def rms_norm_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
    grad_residual: torch.Tensor | None = None,
    *,
    round_once: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)`` of :func:`rms_norm` (autograd calls this; exposed for fused callers).

    fp32 accumulation; ``dweight`` is reduced over rows in a fixed order (deterministic).
    ``grad_residual``, when given, is added to ``dx`` (the fused-add backward).
    """
    for t, name in ((grad_y, "grad_y"), (x, "x"), (weight, "weight")):
        check_tensor(t, name)
    check_eps(eps)
    return torch.ops.fastlayers.rms_norm_backward(
        grad_y, x, weight, float(eps), float(weight_offset), grad_residual, bool(round_once)
    )
