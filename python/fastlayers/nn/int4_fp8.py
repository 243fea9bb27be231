# SPDX-License-Identifier: Apache-2.0
"""``Int4Fp8Linear``: an ``nn.Linear`` replacement with FireQ INT4 weights and FP8 activations."""

from __future__ import annotations

import numbers

import torch

from fastlayers import _ext
from fastlayers.nn._fixed_dtypes import apply_keeping_dtypes, float_cast_of
from fastlayers.ops._common import direct_call_ok, no_dispatch_modes
from fastlayers.ops.int4_fp8 import (
    FP8,
    OUT_DTYPES,
    LinearInferPlan,
    QuantizedWeight,
    Sm90InferPlan,
    _gemm_sm90_cuda,
    int4_fp8_gemm,
    linear_infer,
    quantize_fp8_per_token,
    quantize_int4,
    sm90_linear_infer,
    sm90_pad_activations,
    sm90_pad_weight,
    sm90_padded_shape,
    sm90_platform_reason,
    sm90_unsupported_reason,
)
from fastlayers.reference.int4_fp8 import FORMAT_VERSION


class _InputGradient(torch.autograd.Function):
    """The layer with a gradient for its input (frozen quantized weights, as QLoRA trains around
    them): ``dx = dy @ W``, ``W`` the dequantized weight the GEMM computes with; the FP8 rounding
    of ``x`` passes the gradient straight through. The weight tensors are inputs so that autograd
    refuses a backward after they were changed in place."""

    @staticmethod
    def forward(ctx, x, layer, qweight, group_scale, channel_scale):
        ctx.save_for_backward(qweight, group_scale, channel_scale)
        ctx.group_size, ctx.x_dtype = layer.group_size, x.dtype
        with torch.no_grad():
            return layer._forward(x)

    @staticmethod
    def backward(ctx, grad_y):
        qweight, group_scale, channel_scale = ctx.saved_tensors
        w = QuantizedWeight(qweight, group_scale, channel_scale, ctx.group_size).dequantize()
        grad_x = (grad_y.reshape(-1, w.shape[0]).float() @ w).to(ctx.x_dtype)
        return grad_x.reshape(*grad_y.shape[:-1], w.shape[1]), None, None, None, None


class Int4Fp8Linear(torch.nn.Module):
    """``y = x @ W.T + bias`` with ``W`` in the FireQ INT4 format and ``x`` quantised to FP8-E4M3
    per token on the fly. The weights are frozen buffers; an input that requires grad gets
    ``dy @ W`` (``W`` dequantized; the FP8 rounding of ``x`` passes the gradient straight
    through), so that layers before it and adapters around it train (QLoRA-style).

    Parameters
    ----------
    in_features, out_features : int
        As ``nn.Linear``; ``in_features`` must be even (two INT4 values per byte).
    bias : bool
        Whether the layer has a bias (stored in ``out_dtype``, or the source layer's dtype with
        :meth:`from_linear`).
    group_size : int
        INT4 values sharing one FP8 group scale along ``in_features`` (default 128, even; a last
        partial group is allowed).
    out_dtype : torch.dtype
        bfloat16 (default), float16 or float32.

    ``forward(x)`` takes ``[..., in_features]`` float32/float16/bfloat16, or the pair
    ``(y_fp8, scale)`` that :func:`fastlayers.rms_norm_fp8` returns (so norm -> GEMM moves FP8),
    and returns ``[..., out_features]`` in ``out_dtype``.

    State dict (all tensors, so ``safetensors`` saves it as is): ``qweight`` uint8
    ``[out, in / 2]``, ``group_scale`` float8_e4m3fn ``[out, ceil(in / group_size)]``,
    ``channel_scale`` float32 ``[out]``, optional ``bias``, and ``quant_format`` int32
    ``[format version, group size]``. A fresh layer holds zeros: fill it with :meth:`from_linear`
    or ``load_state_dict``.

    On an sm90 GPU (H100/H200) with a build that has the Hopper kernels, :meth:`prepack` builds the
    CUTLASS look-up-table GEMM's layouts as non-persistent buffers (``sm90_weight``,
    ``sm90_lut_scale``, ``sm90_channel_scale``, ``sm90_bias``); ``forward`` then runs that GEMM.
    They are rebuilt after ``load_state_dict`` and device moves; call :meth:`prepack` yourself after
    changing ``qweight``/``group_scale``/``channel_scale``/``bias`` in place. Layers whose
    ``out_features`` is not a multiple of 16 or ``in_features`` not a multiple of 32 are padded at
    prepack with zero weights (see :func:`fastlayers.ops.int4_fp8.sm90_padded_shape`); each call
    then pads the FP8 activations with zero columns and copies the output columns it keeps (one
    extra pass over each, on those shapes only). Other devices, several groups of a size that is
    not a multiple of 128, and a float32 ``out_dtype`` (the Hopper GEMM writes bf16 or fp16) use the
    generic kernels. The Hopper GEMM accumulates in the FP8 tensor cores over all of K, at about 13
    mantissa bits (as ``torch._scaled_mm`` with fast accumulation): its error grows with
    ``in_features`` (on an H200, about 2^-10.6 of ``sum_k |x_k w_k|`` at K = 1024), below the FP8
    rounding of the activations but above the rounding of an fp16 output.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 128,
        out_dtype: torch.dtype = torch.bfloat16,
        device=None,
    ) -> None:
        super().__init__()
        for value, name in ((in_features, "in_features"), (out_features, "out_features")):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if in_features % 2:
            raise ValueError(
                f"in_features must be even (two INT4 values per byte), got {in_features}"
            )
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if group_size % 2:
            raise ValueError(f"group_size must be even, got {group_size}")
        if out_dtype not in OUT_DTYPES:
            raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.group_size, self.out_dtype = group_size, out_dtype
        self._infer_plan: LinearInferPlan | None = None  # the checked weight for CPU inference
        self._sm90_plan: Sm90InferPlan | None = None  # the checked Hopper layouts, likewise
        groups = -(-self.in_features // group_size)
        self.register_buffer(
            "qweight",
            torch.zeros(self.out_features, self.in_features // 2, dtype=torch.uint8, device=device),
        )
        self.register_buffer(
            "group_scale", torch.ones(self.out_features, groups, device=device).to(FP8)
        )
        self.register_buffer("channel_scale", torch.ones(self.out_features, device=device))
        self.register_buffer(
            "bias", torch.zeros(self.out_features, dtype=out_dtype, device=device) if bias else None
        )
        self.register_buffer(
            "quant_format",
            torch.tensor([FORMAT_VERSION, group_size], dtype=torch.int32, device=device),
        )
        for name in self._SM90_BUFFERS:
            self.register_buffer(name, None, persistent=False)

    @classmethod
    def from_linear(
        cls,
        linear: torch.nn.Linear,
        group_size: int = 128,
        channel_scale: str = "per_channel",
        out_dtype: torch.dtype | None = None,
    ) -> Int4Fp8Linear:
        """Quantizes an ``nn.Linear`` (FireQ formats; ``channel_scale`` as in
        :func:`fastlayers.quantize_int4`). ``out_dtype`` defaults to the layer's dtype, so the
        replacement returns what the original returned (bfloat16 for other dtypes)."""
        weight = getattr(linear, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(
                f"linear must be an nn.Linear (a 2-D weight), got {type(linear).__name__}"
            )
        if out_dtype is None:
            out_dtype = weight.dtype if weight.dtype in OUT_DTYPES else torch.bfloat16
        q = quantize_int4(weight, group_size, channel_scale)
        return cls.from_quantized(q, getattr(linear, "bias", None), out_dtype)

    @classmethod
    def from_quantized(
        cls,
        weight: QuantizedWeight,
        bias: torch.Tensor | None = None,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> Int4Fp8Linear:
        """A layer holding an already quantised weight (e.g. from :func:`fastlayers.quantize_`'s
        GPTQ path or :func:`fastlayers.quantize_int4`)."""
        if not isinstance(weight, QuantizedWeight):
            raise TypeError(f"weight must be a QuantizedWeight, got {type(weight).__name__}")
        layer = cls(
            weight.in_features, weight.out_features, bias is not None, weight.group_size,
            out_dtype, weight.qweight.device,
        )  # fmt: skip
        with torch.no_grad():
            layer.qweight.copy_(weight.qweight)
            layer.group_scale.copy_(weight.group_scale)
            layer.channel_scale.copy_(weight.channel_scale)
        if bias is not None:
            layer.bias = bias.detach().clone()
        layer.prepack()
        return layer

    _SM90_BUFFERS = ("sm90_weight", "sm90_lut_scale", "sm90_channel_scale", "sm90_bias")

    def prepack(self) -> bool:
        """Builds (or drops) the Hopper GEMM's layouts for the current weight and device; returns
        whether the layer now runs the sm90 CUTLASS GEMM. Shapes off its alignment are padded (see
        the class notes); group sizes it cannot take fall back to the generic kernels with a
        warning, once."""
        for name in self._SM90_BUFFERS:
            setattr(self, name, None)
        padded = sm90_padded_shape(self.out_features, self.in_features, self.group_size)
        if padded is None:
            reason = (
                f"the sm90 GEMM needs group_size to be a multiple of 128 or to span in_features, "
                f"got {self.group_size}"
            )
        else:
            n_p, k_p, g_p = padded
            reason = sm90_unsupported_reason(self.qweight.device, n_p, k_p, g_p, self.out_dtype)
        if reason is None:
            with torch.no_grad():
                qweight, group_scale, channel_scale, bias = sm90_pad_weight(
                    self.quantized_weight, self.bias, n_p, k_p
                )
                self.sm90_weight, self.sm90_lut_scale = torch.ops.fastlayers.int4_fp8_prepack_sm90(
                    qweight, group_scale, g_p
                )
                self.sm90_channel_scale, self.sm90_bias = channel_scale, bias
            return True
        if sm90_platform_reason(self.qweight.device) is None:  # a Hopper GPU, this shape refused
            _ext.warn_once(
                f"int4_fp8-sm90-{self.out_features}x{self.in_features}-{self.group_size}",
                f"Int4Fp8Linear({self.in_features}, {self.out_features}, group_size="
                f"{self.group_size}, out_dtype={self.out_dtype}): {reason}; using the generic "
                "CUDA kernels",
            )
        return False

    # The quantised format's dtypes are fixed: ``model.to(torch.bfloat16)`` / ``.half()`` move these
    # buffers but do not cast them (FP8 counts as floating point for Module.to); they cast the bias
    # and set ``out_dtype``.
    _FIXED_DTYPE_BUFFERS = ("group_scale", "channel_scale", *_SM90_BUFFERS)

    def _apply(self, fn, *args, **kwargs):
        apply_keeping_dtypes(self, super()._apply, fn, self._FIXED_DTYPE_BUFFERS, *args, **kwargs)
        # A floating-point cast sets the output dtype, as it does for nn.Linear.
        cast = float_cast_of(fn, self.qweight.device)
        if cast in OUT_DTYPES:
            self.out_dtype = cast
        self.prepack()  # a device move or cast: rebuild (or drop) the kernel layouts
        return self

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.group_scale, self.channel_scale, self.group_size)

    def dequantize(self, round_lut: bool = True) -> torch.Tensor:
        """The float32 weight ``[out_features, in_features]`` this layer computes with."""
        return self.quantized_weight.dequantize(round_lut)

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer computes with, dequantized to ``out_dtype`` on each access (not a
        parameter): for model code that reads ``.weight`` of the ``nn.Linear`` this layer replaced
        (its dtype, device or shape, as HunYuan's MoE router does); computing with it costs a
        dequantization per access."""
        return self.dequantize().to(self.out_dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        fmt = state_dict.get(prefix + "quant_format")
        if fmt is not None:
            version, group_size = (int(v) for v in fmt.tolist())
            if version != FORMAT_VERSION:
                raise ValueError(
                    f"{prefix}quant_format: format version {version}, this fastlayers reads "
                    f"{FORMAT_VERSION}"
                )
            if group_size != self.group_size:
                raise ValueError(
                    f"{prefix}quant_format: the checkpoint has group_size {group_size}, this layer "
                    f"{self.group_size}"
                )
        bias = state_dict.get(prefix + "bias")
        if bias is not None and self.bias is not None and bias.dtype != self.bias.dtype:
            self.bias = torch.empty_like(self.bias, dtype=bias.dtype)  # keep the stored dtype
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.prepack()

    def forward(self, x) -> torch.Tensor:
        if type(x) is torch.Tensor and no_dispatch_modes():
            if x.is_cpu:
                y = self._infer(x)  # the lean CPU route (None: a precondition fails, the ops below)
                if y is not None:
                    return y
            elif self._buffers["sm90_weight"] is not None:
                y = self._infer_sm90(x)  # the lean Hopper route, likewise
                if y is not None:
                    return y
        if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
            return _InputGradient.apply(x, self, self.qweight, self.group_scale, self.channel_scale)
        return self._forward(x)

    def _forward(self, x) -> torch.Tensor:
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError(
                    "forward takes a tensor or the (y_fp8, scale) pair of rms_norm_fp8; "
                    f"got a sequence of {len(x)}"
                )
            xq, xs = x
        else:
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() == 0 or x.shape[-1] != self.in_features:
                raise ValueError(
                    f"x must have {self.in_features} features in its last dimension, got shape "
                    f"{tuple(x.shape)}"
                )
            xq, xs = quantize_fp8_per_token(x)
        if self.sm90_weight is not None and xq.device == self.sm90_weight.device:
            return self._forward_sm90(xq, xs)
        return int4_fp8_gemm(xq, xs, self.quantized_weight, self.bias, self.out_dtype)

    def _infer(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layer on a CPU tensor by the two kernels straight away (:func:`linear_infer`: the
        ops' values without their dispatch and argument handling, which at small widths cost more
        than the kernels); the weight is checked once per layout (:class:`LinearInferPlan`)."""
        if torch.is_grad_enabled() and x.requires_grad:
            return None
        b = self._buffers  # the dict itself: attribute lookups cost ~1 us each
        qw, gs, cs, bias = b["qweight"], b["group_scale"], b["channel_scale"], b["bias"]
        # what the plan's checks and pointers depend on (in-place changes need no new plan: the
        # kernels read the buffers themselves)
        key = (
            qw.data_ptr(), qw.dtype, qw.shape, gs.data_ptr(), gs.dtype, gs.shape, cs.data_ptr(),
            cs.dtype, cs.shape, None if bias is None else (bias.data_ptr(), bias.dtype, bias.shape),
            self.group_size, self.out_dtype,
        )  # fmt: skip
        plan = self._infer_plan
        if plan is None or plan.key != key:
            plan = self._infer_plan = LinearInferPlan(key, qw, gs, cs, bias, self.group_size,
                                                      self.out_dtype)  # fmt: skip
        return linear_infer(x, plan)

    def _infer_sm90(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layer by the Hopper GEMM's lean route (:func:`sm90_linear_infer`: the two kernels
        straight away, the same values as :meth:`_forward_sm90`); its buffers are checked once per
        layout (:class:`Sm90InferPlan`, keyed on their addresses and versions: the plan holds an
        fp32 copy of the bias)."""
        if torch.is_grad_enabled() and x.requires_grad:
            return None
        b = self._buffers
        pw, lut = b["sm90_weight"], b["sm90_lut_scale"]
        cs, bias = b["sm90_channel_scale"], b["sm90_bias"]
        key = (
            pw.data_ptr(), pw._version, pw.shape, lut.data_ptr(), lut._version, lut.shape,
            cs.data_ptr(), cs._version, cs.dtype,
            None if bias is None else (bias.data_ptr(), bias._version, bias.dtype, bias.shape),
            self.group_size, self.out_dtype,
        )  # fmt: skip
        plan = self._sm90_plan
        if plan is None or plan.key != key:
            plan = self._sm90_plan = Sm90InferPlan(key, pw, lut, cs, bias,
                                                   self.sm90_gemm_shape()[2], self.in_features,
                                                   self.out_features, self.out_dtype)  # fmt: skip
        return sm90_linear_infer(x, plan)

    def sm90_gemm_shape(self) -> tuple[int, int, int] | None:
        """``(out_features, in_features, group_size)`` of the GEMM the Hopper layouts hold (padded
        by :func:`sm90_padded_shape`; one group spans the padded width when it spanned the layer's),
        or None without them."""
        if self.sm90_weight is None:
            return None
        n_p, k_p = self.sm90_weight.shape[0], 2 * self.sm90_weight.shape[1]
        return n_p, k_p, k_p if self.sm90_lut_scale.shape[0] == 1 else self.group_size

    def _forward_sm90(self, xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        n_p, k_p, group_size = self.sm90_gemm_shape()
        if xq.dim() == 0 or xq.shape[-1] != self.in_features:  # before padding hides the mismatch
            raise ValueError(
                f"xq must have {self.in_features} features in its last dimension, got shape "
                f"{tuple(xq.shape)}"
            )
        args = (
            sm90_pad_activations(xq, k_p), xs, self.sm90_weight, self.sm90_lut_scale,
            self.sm90_channel_scale, self.sm90_bias, group_size, self.out_dtype,
        )  # fmt: skip
        if xq.is_cuda and direct_call_ok(xq, xs):  # the op's CUDA kernel, without the dispatcher
            y = _gemm_sm90_cuda(*args)
        else:
            y = torch.ops.fastlayers.int4_fp8_gemm_sm90(*args)
        return y if n_p == self.out_features else y[..., : self.out_features].contiguous()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, "
            f"out_dtype={self.out_dtype}"
        )
