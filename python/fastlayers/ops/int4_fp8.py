# SPDX-License-Identifier: Apache-2.0
"""INT4 x FP8 ops (FireQ): ``quantize_fp8_per_token`` and ``int4_fp8_gemm``, plus the weight
format's public helpers (:class:`QuantizedWeight`, :func:`quantize_int4`, :func:`dequantize_int4`).

Formats and semantics are those of :mod:`fastlayers.reference.int4_fp8` (the specification).
Inference ops: a backward through either raises (``Int4Fp8Linear`` gives its input a gradient,
straight through the FP8 step). CPU: fused kernels. CUDA (sm80+; compiled, not yet run
on a GPU): a GEMV kernel up to 16 rows, beyond that an FP8 dequantisation kernel and one fp32
GEMM. Hopper (sm90a; compiled, not yet run): the CUTLASS look-up-table GEMM on prepacked weights,
``int4_fp8_prepack_sm90`` + ``int4_fp8_gemm_sm90`` (what ``Int4Fp8Linear`` uses on an H100/H200).
"""

from __future__ import annotations

import dataclasses

import torch

from fastlayers import _dtypes, _ext
from fastlayers.ops._common import (
    LIB,
    check_activation,
    check_tensor,
    check_tensors,
    device_code,
    device_guard,
    direct_call_ok,
    empty,
    has_kernel,
    lean_cuda_stream,
    on_cuda,
    ptr,
    register_no_backward,
    row_stride,
    rows_view,
    stream_of,
)
from fastlayers.reference import int4_fp8 as ref

FP8 = torch.float8_e4m3fn
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

LIB.define("quantize_fp8_per_token(Tensor x) -> (Tensor, Tensor)")
LIB.define(
    "int4_fp8_gemm(Tensor xq, Tensor xs, Tensor qweight, Tensor group_scale, Tensor channel_scale,"
    " Tensor? bias, int group_size, ScalarType out_dtype) -> Tensor"
)
LIB.define(
    "int4_fp8_prepack_sm90(Tensor qweight, Tensor group_scale, int group_size) -> (Tensor, Tensor)"
)
LIB.define(
    "int4_fp8_gemm_sm90(Tensor xq, Tensor xs, Tensor packed_weight, Tensor lut_scale,"
    " Tensor channel_scale, Tensor? bias, int group_size, ScalarType out_dtype) -> Tensor"
)
register_no_backward(
    "quantize_fp8_per_token",
    "int4_fp8_gemm",
    "int4_fp8_gemm_sm90",
    "int4_fp8_prepack_sm90",
    hint=" (fastlayers.Int4Fp8Linear passes its input's gradient, straight through the FP8 step)",
)


# ----------------------------------------------------------------------------------------------
# Checks (shared by the kernels and the fakes)
# ----------------------------------------------------------------------------------------------
def _check_gemm(xq, xs, qweight, group_scale, channel_scale, bias, group_size, out_dtype) -> None:
    """Checks the GEMM's arguments; ``group_scale=None`` skips it (the prepacked sm90 op)."""
    for t, name in (
        (xq, "xq"),
        (xs, "xs"),
        (qweight, "qweight"),
        (group_scale, "group_scale"),
        (channel_scale, "channel_scale"),
    ):
        if t is not None or name != "group_scale":
            check_tensor(t, name)
    if xq.dtype != FP8:
        raise TypeError(
            f"xq must be torch.float8_e4m3fn (see quantize_fp8_per_token), got {xq.dtype}"
        )
    if xq.dim() == 0:
        raise ValueError("xq must have at least one dimension (the in-features)")
    if xs.dtype != torch.float32:
        raise TypeError(f"xs must be float32, got {xs.dtype}")
    rows_shape = tuple(xq.shape[:-1])
    if tuple(xs.shape) not in (rows_shape, rows_shape + (1,)):
        raise ValueError(
            f"xs must have shape {rows_shape + (1,)} (one scale per row of xq), "
            f"got {tuple(xs.shape)}"
        )
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError(
            f"qweight must be uint8 [out_features, in_features / 2], got {qweight.dtype} "
            f"{tuple(qweight.shape)}"
        )
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if xq.shape[-1] != k:
        raise ValueError(
            f"xq has {xq.shape[-1]} in-features but qweight {tuple(qweight.shape)} holds {k}"
        )
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if group_size % 2:
        raise ValueError(f"group_size must be even, got {group_size}")
    groups = -(-k // group_size)
    if group_scale is not None and (
        group_scale.dtype != FP8 or tuple(group_scale.shape) != (n, groups)
    ):
        raise ValueError(
            f"group_scale must be float8_e4m3fn of shape ({n}, {groups}) for {k} in-features in "
            f"groups of {group_size}, got {group_scale.dtype} {tuple(group_scale.shape)}"
        )
    if channel_scale.dtype != torch.float32 or tuple(channel_scale.shape) != (n,):
        raise ValueError(
            f"channel_scale must be float32 of shape ({n},), got {channel_scale.dtype} "
            f"{tuple(channel_scale.shape)}"
        )
    if bias is not None:
        check_tensor(bias, "bias")
        if bias.dtype not in _dtypes.FLOATING or tuple(bias.shape) != (n,):
            raise ValueError(
                f"bias must be float32/float16/bfloat16 of shape ({n},), got {bias.dtype} "
                f"{tuple(bias.shape)}"
            )
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    for t, name in (
        (xs, "xs"),
        (qweight, "qweight"),
        (group_scale, "group_scale"),
        (channel_scale, "channel_scale"),
        (bias, "bias"),
    ):
        if t is not None and t.device != xq.device:
            raise ValueError(f"{name} is on {t.device} but xq is on {xq.device}")


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
def _reference_gemm(xq, xs, qweight, group_scale, channel_scale, bias, group_size, out_dtype):
    xs = xs.reshape(*xq.shape[:-1], 1)
    return ref.int4_fp8_gemm(
        xq, xs, qweight, group_scale, channel_scale, group_size, bias, out_dtype
    )


# CUDA: the GEMV kernel up to this many rows; beyond, dequantise to FP8 and multiply in fp32.
_CUDA_GEMV_MAX_ROWS = 16


def _gemm_kernel(xq, xs, qweight, group_scale, channel_scale, bias, group_size, out_dtype):
    _check_gemm(xq, xs, qweight, group_scale, channel_scale, bias, group_size, out_dtype)
    if not has_kernel(xq.device, "int4_fp8_gemm"):
        return _reference_gemm(
            xq, xs, qweight, group_scale, channel_scale, bias, group_size, out_dtype
        )
    n, k = qweight.shape[0], xq.shape[-1]
    x2 = rows_view(xq)
    m = x2.shape[0]
    # Held in variables: temporaries inside the call would be freed before the kernel runs.
    xs1 = xs.reshape(m).contiguous()
    qw, gs, cs = qweight.contiguous(), group_scale.contiguous(), channel_scale.contiguous()
    b = bias.contiguous() if bias is not None else None
    if on_cuda(xq.device) and m > _CUDA_GEMV_MAX_ROWS:
        return _dequantize_matmul(x2, xs1, qw, gs, cs, b, group_size, out_dtype, xq.shape)
    y = empty((*xq.shape[:-1], n), out_dtype, xq.device)
    if m == 0:
        return y
    with device_guard(xq.device):
        _ext.C.int4_fp8_gemm(
            device_code(xq.device),
            ptr(x2), row_stride(x2), ptr(xs1),
            ptr(qw), ptr(gs), ptr(cs),
            ptr(b), _dtypes.code(b.dtype) if b is not None else 0,
            ptr(y), _dtypes.code(out_dtype),
            m, n, k, group_size, stream_of(xq.device),
        )  # fmt: skip
    return y


def _dequantize_matmul(x2, xs1, qw, gs, cs, b, group_size, out_dtype, shape):
    """CUDA, many rows: the table values fp8(q * s8) as an FP8 weight (a kernel), one fp32 GEMM
    (products of FP8 values are exact in fp32), then the scales. No host synchronisation."""
    n, k = qw.shape[0], x2.shape[1]
    w8 = empty((n, k), FP8, x2.device)
    with device_guard(x2.device):
        _ext.C.int4_fp8_dequantize(ptr(qw), ptr(gs), ptr(w8), n, k, group_size,
                                   stream_of(x2.device))  # fmt: skip
    # (the shape taken before the scales: the result is a tensor of its own, not a view, which
    # an autograd Function around the layer (Int4Fp8Linear's input gradient) may not return when
    # the caller adds into it in place: Falcon's ``mlp_output += attention_output``)
    acc = (x2.float() @ w8.float().t()).reshape(*shape[:-1], n)
    y = acc * xs1.reshape(*shape[:-1], 1) * cs
    if b is not None:
        y = y + b.float()
    return y.to(out_dtype)


def _quantize_kernel(x):
    check_activation(x, "x")
    if not has_kernel(x.device, "quantize_fp8_per_token"):
        return ref.quantize_fp8_per_token(x)
    xq = empty(x.shape, FP8, x.device)
    xs = empty((*x.shape[:-1], 1), torch.float32, x.device)
    x2 = rows_view(x)
    if x2.shape[0] > 0:
        with device_guard(x.device):
            _ext.C.quantize_fp8_per_token(
                device_code(x.device), ptr(x2), row_stride(x2), ptr(xq), ptr(xs),
                x2.shape[0], x2.shape[1], _dtypes.code(x.dtype), stream_of(x.device),
            )  # fmt: skip
    return xq, xs


def _quantize_reference(x):
    check_activation(x, "x")
    return ref.quantize_fp8_per_token(x)


def _gemm_reference(xq, xs, qweight, group_scale, channel_scale, bias, group_size, out_dtype):
    _check_gemm(xq, xs, qweight, group_scale, channel_scale, bias, group_size, out_dtype)
    return _reference_gemm(xq, xs, qweight, group_scale, channel_scale, bias, group_size, out_dtype)


for _name, _kernel, _reference in (
    ("quantize_fp8_per_token", _quantize_kernel, _quantize_reference),
    ("int4_fp8_gemm", _gemm_kernel, _gemm_reference),
):
    LIB.impl(_name, _kernel, "CPU")
    LIB.impl(_name, _kernel, "CUDA")
    LIB.impl(_name, _reference, "CompositeExplicitAutograd")


@torch.library.register_fake("fastlayers::quantize_fp8_per_token", lib=LIB)
def _quantize_fake(x):
    check_activation(x, "x")
    return x.new_empty(x.shape, dtype=FP8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.register_fake("fastlayers::int4_fp8_gemm", lib=LIB)
def _gemm_fake(xq, xs, qweight, group_scale, channel_scale, bias, group_size, out_dtype):
    _check_gemm(xq, xs, qweight, group_scale, channel_scale, bias, group_size, out_dtype)
    return xq.new_empty((*xq.shape[:-1], qweight.shape[0]), dtype=out_dtype)


# ----------------------------------------------------------------------------------------------
# Hopper (sm90a) CUTLASS GEMM on prepacked weights
# ----------------------------------------------------------------------------------------------
SM90_OUT_DTYPES = (torch.bfloat16, torch.float16)


def sm90_platform_reason(device: torch.device) -> str | None:
    """Why ``device`` cannot run the Hopper GEMM at all (None when it can): this build must have the
    90a kernels and ``device`` must be an sm90 GPU."""
    if not _ext.has_sm90_gemm():
        return "this build has no Hopper (90a) CUTLASS kernels"
    if device.type != "cuda":
        return f"the Hopper GEMM runs on CUDA devices, not {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap != (9, 0):
        return f"the Hopper GEMM needs an sm90 GPU (H100/H200), this one is sm{cap[0]}{cap[1]}"
    return None


def sm90_unsupported_reason(
    device: torch.device, out_features: int, in_features: int, group_size: int, out_dtype
) -> str | None:
    """Why the Hopper GEMM cannot run this layer on ``device`` (None when it can): the platform
    (:func:`sm90_platform_reason`), then ``out_features % 16 == 0``, ``in_features % 32 == 0``,
    ``group_size`` a multiple of 128 (or equal to ``in_features``) and a bf16/fp16 output."""
    reason = sm90_platform_reason(device)
    if reason is not None:
        return reason
    if out_dtype not in SM90_OUT_DTYPES:
        return f"the Hopper GEMM writes bfloat16 or float16, not {out_dtype}"
    return _ext.C.int4_fp8_sm90_unsupported(
        out_features, in_features, group_size, _dtypes.code(out_dtype)
    )


def sm90_padded_shape(
    out_features: int, in_features: int, group_size: int
) -> tuple[int, int, int] | None:
    """``(out_features, in_features, group_size)`` of the layer the Hopper GEMM runs in place of
    this one: ``out_features`` rounded up to 16 and ``in_features`` to 32 (the extra weights are
    zero, so the padded layer computes the same sums; see :func:`sm90_pad_weight`). A single
    group becomes the padded width; several groups keep their size, which must then be a multiple of
    128 (rounding ``in_features`` up to 32 never adds a group). None when no padding helps: several
    groups of another size."""
    n_p, k_p = -(-out_features // 16) * 16, -(-in_features // 32) * 32
    if group_size >= in_features:  # one group: it spans the padded width as well
        return n_p, k_p, k_p
    if group_size % 128:
        return None
    return n_p, k_p, group_size


def sm90_pad_weight(
    weight: QuantizedWeight, bias: torch.Tensor | None, out_features: int, in_features: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(qweight, group_scale, channel_scale, bias)`` zero-padded to ``[out_features,
    in_features]`` (from :func:`sm90_padded_shape`): zero INT4 values in the new columns and rows,
    group scale 1 and channel scale 0 in the new rows, bias 0 (fp32). Tensor ops only, on the
    weight's device (no synchronisation). Unpadded tensors are returned as they are."""
    n, k = weight.out_features, weight.in_features
    dn, dk = out_features - n, in_features - k
    if dn < 0 or dk < 0 or dk % 2:
        raise ValueError(
            f"cannot pad a {n} x {k} weight to {out_features} x {in_features} (padding only grows "
            "it, by an even number of columns)"
        )
    pad = torch.nn.functional.pad
    qweight = pad(weight.qweight, (0, dk // 2, 0, dn)) if dn or dk else weight.qweight
    group_scale, channel_scale = weight.group_scale, weight.channel_scale
    if dn:
        one = int(torch.tensor(1.0).to(FP8).view(torch.uint8))
        group_scale = pad(group_scale.view(torch.uint8), (0, 0, 0, dn), value=one).view(FP8)
        channel_scale = pad(channel_scale, (0, dn))
    b = bias.float() if bias is not None else None
    if dn and b is not None:
        b = pad(b, (0, dn))
    return qweight, group_scale, channel_scale, b


def sm90_pad_activations(xq: torch.Tensor, in_features: int) -> torch.Tensor:
    """FP8 activations ``[..., k]`` with zero columns appended up to ``in_features`` (a copy; ``xq``
    itself when nothing is missing)."""
    dk = in_features - xq.shape[-1]
    if dk == 0:
        return xq
    return torch.nn.functional.pad(xq.view(torch.uint8), (0, dk)).view(FP8)


def _check_prepack(qweight, group_scale, group_size):
    check_tensor(qweight, "qweight")
    check_tensor(group_scale, "group_scale")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError(
            f"qweight must be uint8 [out_features, in_features / 2], got {qweight.dtype}"
        )
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even int, got {group_size!r}")
    groups = -(-k // group_size)
    if group_scale.dtype != FP8 or tuple(group_scale.shape) != (n, groups):
        raise ValueError(
            f"group_scale must be float8_e4m3fn of shape ({n}, {groups}), got "
            f"{group_scale.dtype} {tuple(group_scale.shape)}"
        )
    if group_scale.device != qweight.device:
        raise ValueError(f"group_scale is on {group_scale.device} but qweight on {qweight.device}")
    if n % 16 or k % 32 or (group_size != k and group_size % 128):
        raise ValueError(
            "the sm90 layout needs out_features % 16 == 0, in_features % 32 == 0 and group_size "
            f"a multiple of 128 or equal to in_features; got {n} x {k}, group_size {group_size}"
        )
    return n, k, groups


def _prepack_kernel(qweight, group_scale, group_size):
    n, k, groups = _check_prepack(qweight, group_scale, group_size)
    C = _ext.C
    if C is None or not C.has_sm90_gemm():
        return ref.prepack_sm90(qweight, group_scale, group_size)
    packed = empty((n, k // 2), torch.uint8, qweight.device)
    lut = empty((groups, n, 8), torch.uint8, qweight.device)
    qw, gs = qweight.contiguous(), group_scale.contiguous()
    with device_guard(qweight.device):
        C.int4_fp8_prepack_sm90(
            device_code(qweight.device), ptr(qw), ptr(gs), ptr(packed), ptr(lut), n, k,
            group_size, stream_of(qweight.device),
        )  # fmt: skip
    return packed, lut


def _prepack_reference(qweight, group_scale, group_size):
    _check_prepack(qweight, group_scale, group_size)
    return ref.prepack_sm90(qweight, group_scale, group_size)


def _check_gemm_sm90(xq, xs, packed_weight, lut_scale, channel_scale, bias, group_size, out_dtype):
    for t, name in ((packed_weight, "packed_weight"), (lut_scale, "lut_scale")):
        check_tensor(t, name)
        if t.dtype != torch.uint8:
            raise TypeError(f"{name} must be uint8 (from int4_fp8_prepack_sm90), got {t.dtype}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    n, k = packed_weight.shape[0], 2 * packed_weight.shape[-1]
    groups = -(-k // group_size)
    if packed_weight.dim() != 2 or tuple(lut_scale.shape) != (groups, n, 8):
        raise ValueError(
            f"packed_weight [n, k / 2] and lut_scale [groups, n, 8] from int4_fp8_prepack_sm90 "
            f"expected; got {tuple(packed_weight.shape)} and {tuple(lut_scale.shape)}"
        )
    # The rest as for the unpacked GEMM (packed_weight has qweight's shape and dtype).
    _check_gemm(xq, xs, packed_weight, None, channel_scale, bias, group_size, out_dtype)
    if out_dtype not in SM90_OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {SM90_OUT_DTYPES}, got {out_dtype}")
    return n, k


def _gemm_sm90_cuda(xq, xs, packed_weight, lut_scale, channel_scale, bias, group_size, out_dtype):
    n, k = _check_gemm_sm90(
        xq, xs, packed_weight, lut_scale, channel_scale, bias, group_size, out_dtype
    )
    reason = sm90_unsupported_reason(xq.device, n, k, group_size, out_dtype)
    if reason is not None:
        raise ValueError(f"int4_fp8_gemm_sm90: {reason}")
    x2 = rows_view(xq)
    m = x2.shape[0]
    if row_stride(x2) % 16 or x2.data_ptr() % 16:  # TMA: 16-byte aligned base and rows
        x2 = x2.clone(memory_format=torch.contiguous_format)
    # Held in variables: temporaries inside the call would be freed before the kernel runs.
    xs1 = xs.reshape(m).contiguous()
    cs = channel_scale.contiguous()
    pw, lut = packed_weight.contiguous(), lut_scale.contiguous()
    b = bias.float().contiguous() if bias is not None else None
    y = empty((*xq.shape[:-1], n), out_dtype, xq.device)
    if m == 0:
        return y
    C, dev = _ext.C, xq.device
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    out_code = _dtypes.code(out_dtype)
    ws_bytes = C.int4_fp8_sm90_workspace(index, m, n, k, group_size, out_code)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=dev) if ws_bytes > 0 else None
    with device_guard(dev):
        C.int4_fp8_gemm_sm90(
            index, ptr(x2), row_stride(x2), ptr(xs1), ptr(pw), ptr(lut), ptr(cs), ptr(b), ptr(y),
            out_code, m, n, k, group_size,
            ptr(ws), ws_bytes, stream_of(dev),
        )  # fmt: skip
    return y


def _gemm_sm90_reference(
    xq, xs, packed_weight, lut_scale, channel_scale, bias, group_size, out_dtype
):
    """Any device: undo the prepack and run the reference GEMM (the specification)."""
    _check_gemm_sm90(xq, xs, packed_weight, lut_scale, channel_scale, bias, group_size, out_dtype)
    qweight, group_scale = ref.unprepack_sm90(packed_weight, lut_scale)
    return _reference_gemm(xq, xs, qweight, group_scale, channel_scale, bias, group_size, out_dtype)


LIB.impl("int4_fp8_prepack_sm90", _prepack_kernel, "CPU")
LIB.impl("int4_fp8_prepack_sm90", _prepack_kernel, "CUDA")
LIB.impl("int4_fp8_prepack_sm90", _prepack_reference, "CompositeExplicitAutograd")
LIB.impl("int4_fp8_gemm_sm90", _gemm_sm90_cuda, "CUDA")
LIB.impl("int4_fp8_gemm_sm90", _gemm_sm90_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("fastlayers::int4_fp8_prepack_sm90", lib=LIB)
def _prepack_fake(qweight, group_scale, group_size):
    n, k, groups = _check_prepack(qweight, group_scale, group_size)
    return (
        qweight.new_empty((n, k // 2), dtype=torch.uint8),
        qweight.new_empty((groups, n, 8), dtype=torch.uint8),
    )


@torch.library.register_fake("fastlayers::int4_fp8_gemm_sm90", lib=LIB)
def _gemm_sm90_fake(xq, xs, packed_weight, lut_scale, channel_scale, bias, group_size, out_dtype):
    n, _ = _check_gemm_sm90(
        xq, xs, packed_weight, lut_scale, channel_scale, bias, group_size, out_dtype
    )
    return xq.new_empty((*xq.shape[:-1], n), dtype=out_dtype)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """An INT4 weight in the FireQ format (what ``Int4Fp8Linear`` stores).

    ``qweight``: uint8 ``[out_features, in_features / 2]``, two INT4 values per byte (even k in the
    low nibble, two's complement); ``group_scale``: float8_e4m3fn
    ``[out_features, ceil(in_features / group_size)]``; ``channel_scale``: float32
    ``[out_features]``. The weight the GEMM multiplies by is
    ``channel_scale[n] * fp8(q[n, k] * group_scale[n, k // group_size])``.
    """

    qweight: torch.Tensor
    group_scale: torch.Tensor
    channel_scale: torch.Tensor
    group_size: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return 2 * self.qweight.shape[1]

    def dequantize(self, round_lut: bool = True) -> torch.Tensor:
        """The float32 weight ``[out_features, in_features]`` the GEMM computes with."""
        return dequantize_int4(self, round_lut)

    def to(self, device) -> QuantizedWeight:
        return QuantizedWeight(
            self.qweight.to(device),
            self.group_scale.to(device),
            self.channel_scale.to(device),
            self.group_size,
        )


def quantize_int4(
    weight: torch.Tensor, group_size: int = 128, channel_scale: str = "per_channel"
) -> QuantizedWeight:
    """Quantizes ``weight [out_features, in_features]`` (in_features even) to the FireQ INT4 format.

    ``channel_scale``: ``"per_channel"`` (default; keeps every look-up-table entry within FP8
    range and the group scales clear of FP8 underflow), ``"per_tensor_pow2"`` (FireQ's power-of-two
    search) or ``"none"`` (shows the underflow the others prevent). Formulas:
    :mod:`fastlayers.reference.int4_fp8`.
    """
    check_tensor(weight, "weight")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    with torch.no_grad():
        qweight, group_scale, c = ref.quantize_int4(weight.detach(), group_size, channel_scale)
    return QuantizedWeight(qweight, group_scale, c, group_size)


def dequantize_int4(weight: QuantizedWeight, round_lut: bool = True) -> torch.Tensor:
    """The float32 weight ``[out_features, in_features]`` of a :class:`QuantizedWeight`:
    ``channel_scale * fp8(q * group_scale)`` (``round_lut=False``: without the FP8 rounding)."""
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(f"weight must be a QuantizedWeight, got {type(weight).__name__}")
    return ref.dequantize_int4(
        weight.qweight, weight.group_scale, weight.channel_scale, weight.group_size, round_lut
    )


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8-E4M3 quantisation of ``x [..., K]`` (float32/float16/bfloat16).

    Returns ``(xq, xs)``: ``xq`` float8_e4m3fn ``[..., K]`` and ``xs`` float32 ``[..., 1]`` with
    ``xs = max|x| / 448`` per row (1 for an all-zero row or a row with a NaN) and
    ``xq = fp8(clamp(x / xs, -448, 448))``, so ``xq.float() * xs`` dequantises. The same format
    :func:`fastlayers.rms_norm_fp8` produces.
    """
    check_tensor(x, "x")
    if direct_call_ok(x):
        return _quantize_kernel(x)
    return torch.ops.fastlayers.quantize_fp8_per_token(x)


def int4_fp8_gemm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    weight: QuantizedWeight,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``y [..., N] = out_dtype(xs * c * (xq @ fp8(q * s8).T) + bias)``, fp32 accumulation.

    ``xq``, ``xs``: FP8 activations and their per-row scales (:func:`quantize_fp8_per_token` or
    :func:`fastlayers.rms_norm_fp8`); ``weight``: a :class:`QuantizedWeight`; ``bias``: ``[N]``
    or None; ``out_dtype``: bfloat16 (default), float16 or float32. The raw op is
    ``torch.ops.fastlayers.int4_fp8_gemm(xq, xs, qweight, group_scale, channel_scale, bias,
    group_size, out_dtype)``.
    """
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(f"weight must be a QuantizedWeight, got {type(weight).__name__}")
    check_tensors(("bias",), xq=xq, xs=xs, bias=bias)
    args = (
        xq, xs, weight.qweight, weight.group_scale, weight.channel_scale, bias,
        weight.group_size, out_dtype,
    )  # fmt: skip
    if direct_call_ok(xq, xs, bias):
        return _gemm_kernel(*args)
    if out_dtype not in OUT_DTYPES:  # (before the op's schema, which would raise RuntimeError)
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    return torch.ops.fastlayers.int4_fp8_gemm(*args)


# ----------------------------------------------------------------------------------------------
# The lean inference route (Int4Fp8Linear on CPU)
# ----------------------------------------------------------------------------------------------
class LinearInferPlan:
    """An Int4Fp8Linear's weight, checked once for :func:`linear_infer` (the module rebuilds it
    when a buffer's address, dtype or shape, the group size or ``out_dtype`` changes), so a
    decode step checks only ``x``: at small widths the two ops' checks, dispatch and argument
    handling cost more than their kernels."""

    __slots__ = ("key", "ok", "n", "k", "group_size", "out_dtype", "out_code", "args")

    def __init__(self, key, qweight, group_scale, channel_scale, bias, group_size, out_dtype):
        self.key, self.ok = key, False  # not ok: the ops' route (and its errors)
        if not _ext.has_cpu_kernels():
            return
        tensors = (qweight, group_scale, channel_scale) + (() if bias is None else (bias,))
        if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
            return
        if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
            return
        if qweight.dtype != torch.uint8 or qweight.dim() != 2:
            return
        n, k = qweight.shape[0], 2 * qweight.shape[1]
        try:
            _check_gemm(torch.empty((1, k), dtype=FP8), torch.empty((1, 1)), qweight,
                        group_scale, channel_scale, bias, group_size, out_dtype)  # fmt: skip
        except (TypeError, ValueError):
            return
        self.ok, self.n, self.k, self.group_size = True, n, k, group_size
        self.out_dtype, self.out_code = out_dtype, _dtypes.code(out_dtype)
        # _ext.C.int4_fp8_gemm's weight arguments, in order
        self.args = (
            ptr(qweight), ptr(group_scale), ptr(channel_scale), ptr(bias),
            _dtypes.code(bias.dtype) if bias is not None else 0,
        )  # fmt: skip


def _lean_rows(x, k: int) -> tuple[torch.Tensor, int, int]:
    """``(x2, rows, row stride)`` of ``x [..., k]`` for a lean kernel call: ``x`` itself when
    contiguous (no view: each torch call costs microseconds here), else its rows view (a copy
    where the rows are not evenly spaced: hold ``x2`` until the kernel has read it)."""
    if x.is_contiguous():
        return x, x.numel() // k, k
    x2 = rows_view(x)
    return x2, x2.shape[0], row_stride(x2)


def linear_infer(x, plan: LinearInferPlan) -> torch.Tensor | None:
    """``int4_fp8_gemm(*quantize_fp8_per_token(x), weight, bias, out_dtype)`` by the leanest route
    (the same values): the two CPU kernels called straight away. The caller has checked that
    nothing intercepts calls (:func:`~fastlayers.ops._common.no_dispatch_modes`) and that no
    gradient is wanted; this checks ``x`` (a plain CPU float tensor with the plan's in-features,
    at least one row). Returns None when a precondition does not hold: the caller then runs the
    ops, which give the same ``y`` or the clear error."""
    if (
        not plan.ok
        or type(x) is not torch.Tensor
        or not x.is_cpu
        or x.dtype not in _dtypes.FLOATING
        or x.dim() == 0
        or x.shape[-1] != plan.k
    ):
        return None
    k = plan.k
    x2, m, stride = _lean_rows(x, k)
    if m == 0:
        return None
    # one scratch buffer, every byte used written: the FP8 rows, then the fp32 row scales (both
    # 64-byte aligned, as separate tensors would be)
    at = (m * k + 63) // 64 * 64
    scratch = torch.empty(at + 4 * m, dtype=torch.uint8)
    xq, xs = scratch.data_ptr(), scratch.data_ptr() + at
    _ext.C.quantize_fp8_per_token(0, x2.data_ptr(), stride, xq, xs, m, k, _dtypes.code(x.dtype), 0)
    y = empty((*x.shape[:-1], plan.n), plan.out_dtype, x.device)
    _ext.C.int4_fp8_gemm(0, xq, k, xs, *plan.args, y.data_ptr(), plan.out_code, m, plan.n, k,
                         plan.group_size, 0)  # fmt: skip
    return y


# ----------------------------------------------------------------------------------------------
# The lean inference route on Hopper (Int4Fp8Linear's prepacked sm90 layouts)
# ----------------------------------------------------------------------------------------------
class Sm90InferPlan:
    """An Int4Fp8Linear's prepacked Hopper buffers, checked once for :func:`sm90_linear_infer`
    (the module rebuilds it when a buffer's address, dtype, shape or version, the group size or
    ``out_dtype`` changes), with what the GEMM's per-call route computed each time: the fp32 bias,
    the support checks, the workspace size per token count. A decode step then checks only ``x``
    (on the H200, dd55068, the ops' route held 1-16-token calls at ~27 us whatever the weight's
    size: argument handling, not the kernels). Only unpadded layers (``out_features % 16 == 0``,
    ``in_features % 32 == 0``: the rest keep the ops' route, which pads). ``group_size``: the
    layouts' (``Int4Fp8Linear.sm90_gemm_shape()``: the width when one group spans it)."""

    __slots__ = ("key", "ok", "n", "k", "group_size", "out_dtype", "out_code", "index", "args",
                 "bias32", "ws_bytes")  # fmt: skip

    def __init__(self, key, packed, lut, channel_scale, bias, group_size, in_features,
                 out_features, out_dtype):  # fmt: skip
        self.key, self.ok = key, False  # not ok: the ops' route (and its errors)
        device = packed.device
        if device.type != "cuda" or device.index is None:
            return
        n, k = packed.shape[0], 2 * packed.shape[1]
        if n != out_features or k != in_features:
            return
        tensors = (packed, lut, channel_scale) + (() if bias is None else (bias,))
        if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
            return
        if any(t.device != device for t in tensors):
            return
        try:
            xq = torch.empty((1, k), dtype=FP8, device=device)
            xs = torch.empty((1, 1), dtype=torch.float32, device=device)
            _check_gemm_sm90(xq, xs, packed, lut, channel_scale, bias, group_size, out_dtype)
        except (TypeError, ValueError):
            return
        if sm90_unsupported_reason(device, n, k, group_size, out_dtype) is not None:
            return
        self.ok, self.n, self.k, self.group_size, self.index = True, n, k, group_size, device.index
        self.out_dtype, self.out_code = out_dtype, _dtypes.code(out_dtype)
        # the kernel reads these: the plan holds the contiguous / fp32 copies it made
        pw, lt, cs = packed.contiguous(), lut.contiguous(), channel_scale.contiguous()
        self.bias32 = bias.float().contiguous() if bias is not None else None
        self.args = (pw, lt, cs, self.bias32)
        self.ws_bytes = {}  # tokens -> workspace bytes


def sm90_linear_infer(x, plan: Sm90InferPlan) -> torch.Tensor | None:
    """``y`` of an Int4Fp8Linear with the Hopper GEMM by the leanest route (the same values as the
    ops' route): the activation quantisation and the GEMM kernels called straight away, with one
    scratch allocation for the FP8 rows and their scales. The caller has checked that nothing
    intercepts calls (:func:`~fastlayers.ops._common.no_dispatch_modes`) and that no gradient is
    wanted; this checks ``x`` (a plain float tensor on the plan's device, which is the current
    one, with the plan's in-features, at least one row). Returns None when a precondition does not
    hold: the caller then takes the ops' route, which gives the same ``y`` or the clear error."""
    if (
        not plan.ok
        or type(x) is not torch.Tensor
        or x.dtype not in _dtypes.FLOATING
        or x.dim() == 0
        or x.shape[-1] != plan.k
        or x.get_device() != plan.index
    ):
        return None
    stream = lean_cuda_stream(plan.index)
    if stream is None:
        return None
    k = plan.k
    x2, m, stride = _lean_rows(x, k)
    if m == 0:
        return None
    C = _ext.C
    ws_bytes = plan.ws_bytes.get(m)
    if ws_bytes is None:
        ws_bytes = C.int4_fp8_sm90_workspace(plan.index, m, plan.n, k, plan.group_size,
                                             plan.out_code)  # fmt: skip
        if len(plan.ws_bytes) < 256:
            plan.ws_bytes[m] = ws_bytes
    # one scratch buffer: the FP8 rows (k % 32 == 0: 16-byte aligned rows, as TMA needs), then the
    # fp32 row scales, then the GEMM's workspace (each 256-byte aligned)
    at_xs = (m * k + 255) // 256 * 256
    at_ws = at_xs + (4 * m + 255) // 256 * 256
    scratch = torch.empty(at_ws + ws_bytes, dtype=torch.uint8, device=x.device)
    base = scratch.data_ptr()
    C.quantize_fp8_per_token(
        1, x2.data_ptr(), stride, base, base + at_xs, m, k, _dtypes.code(x.dtype), stream
    )
    y = empty((*x.shape[:-1], plan.n), plan.out_dtype, x.device)
    pw, lut, cs, bias = plan.args
    C.int4_fp8_gemm_sm90(
        plan.index, base, k, base + at_xs, pw.data_ptr(), lut.data_ptr(), cs.data_ptr(),
        ptr(bias), y.data_ptr(), plan.out_code, m, plan.n, k, plan.group_size,
        base + at_ws if ws_bytes > 0 else 0, ws_bytes, stream,
    )  # fmt: skip
    return y
