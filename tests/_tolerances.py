# SPDX-License-Identifier: Apache-2.0
"""The oracle: kernel error at most ``factor`` x the error of the same-dtype PyTorch reference, both
measured against a float64 computation, plus a small per-dtype atol (the FlashAttention rule)."""

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# One FP8-E4M3 step relative to the smaller of two neighbours (3 mantissa bits: 2 against 16): FP8
# outputs may differ by that where the kernel's fp32 row sum, and so the row's scale, differs from
# the reference's in the last bit and a value sits on a rounding midpoint.
FP8_STEP_RTOL = 0.125


def assert_close_to_oracle(
    out, ref_same_dtype, oracle, *, factor=2.0, atol=None, name="out", slack=None
):
    """``slack``: a per-element allowance on top (e.g. :func:`fp8_tensor_core_slack`); the error
    checked is then ``max(|out - oracle| - slack)``."""
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    out64, ref64, ora64 = out.double(), ref_same_dtype.double(), oracle.double()
    assert torch.isfinite(out64).all(), f"{name}: non-finite values (an element left unwritten?)"
    if atol is None:
        atol = ATOL[out.dtype] if out.dtype in ATOL else 0.0
    diff = (out64 - ora64).abs()
    if slack is not None:
        diff = diff - slack.double()
    err = diff.max().item() if out.numel() else 0.0
    ref_err = (ref64 - ora64).abs().max().item() if out.numel() else 0.0
    assert err <= factor * ref_err + atol, (
        f"{name}: max error {err:.3e} vs float64 > {factor} x reference error {ref_err:.3e}"
        f" + {atol:.1e}"
    )


def fp8_codes(t):
    """An FP8-E4M3 tensor's codes (uint8) with a NaN's sign cleared (0xFF -> 0x7F): x86 makes
    inf * 0 and inf / inf negative NaNs, a GPU positive ones, and the sign of a NaN carries
    nothing. Compare codes through this where NaNs may arise."""
    codes = t.view(torch.uint8)
    return torch.where(codes == 0xFF, torch.full_like(codes, 0x7F), codes)


def rand(*shape, dtype, device, scale=1.0):
    """Fresh random data (never zeros), with an offset so rows do not have zero mean."""
    return (torch.randn(*shape, dtype=torch.float32, device=device) * scale + 0.1).to(dtype)


def opcheck_with_fp8_inputs(op, args):
    """``torch.library.opcheck`` for ops that take float8 tensors: its test_schema compares inputs
    with arithmetic torch lacks for float8 ("mul_cpu_reduced_float not implemented"), so that one
    property (no input mutated, no output aliasing an input) is checked here by hand instead."""
    torch.library.opcheck(
        op, args,
        test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )  # fmt: skip
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    before = [t.clone() for t in tensors]
    outs = op(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)

    def raw(t):
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    for b, a in zip(before, tensors, strict=True):
        assert torch.equal(raw(b), raw(a))
        for o in outs:
            assert o.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()


# Hopper's FP8 tensor cores accumulate at about 13 mantissa bits, truncating (SageAttention2: the
# accumulator of mma f32.e4m3.e4m3 keeps 1 + 8 + 13 bits; DeepSeek-V3 3.3.2: products aligned to
# the largest exponent keep 14 bits), and CUTLASS's sm90 mixed-input mainloop, which the Hopper INT4
# x FP8 GEMM runs, accumulates all of K there without promoting to fp32 (its mma_promotion_interval
# is unused). Errors grow with K and, truncation being biased, with the mean of the products: on
# the H200 (dd55068, k = 1024, fp16 out) the largest error was about 2^-10.6 of the expected
# sum_k |x_k w_k| of the test's data (estimated: the run kept only the largest error). The
# allowance is 2^-9 of that sum: an error in the layout or in a group's scale (many terms wrong)
# exceeds it by far; a single wrong weight only at small K (the prepack layout is checked bit for
# bit apart).
FP8_TENSOR_CORE_REL = 2.0**-9


def fp8_tensor_core_slack(xq, xs, qw):
    """Per-element allowance for the Hopper INT4 x FP8 GEMM's FP8 accumulation (see above):
    ``FP8_TENSOR_CORE_REL * xs * c * (|xq| @ |fp8(q * s8)|.T)`` in float64."""
    from fastlayers.reference import int4_fp8 as ref

    lut = ref.dequantize_int4(
        qw.qweight, qw.group_scale, torch.ones_like(qw.channel_scale), qw.group_size
    )
    abs_sum = xq.double().abs() @ lut.double().abs().t()
    scale = xs.double().reshape(*xq.shape[:-1], 1) * qw.channel_scale.double().abs()
    return FP8_TENSOR_CORE_REL * abs_sum * scale


def int4_fp8_oracle(xq, xs, qw, bias):
    """float64 of the INT4 x FP8 GEMM contract: xs * c * (xq @ fp8(q * s8).T) + bias, for a
    :class:`fastlayers.QuantizedWeight` ``qw``."""
    from fastlayers.reference import int4_fp8 as ref

    lut = ref.dequantize_int4(
        qw.qweight, qw.group_scale, torch.ones_like(qw.channel_scale), qw.group_size
    )
    acc = xq.double() @ lut.double().t()
    y = acc * xs.double().reshape(*xq.shape[:-1], 1) * qw.channel_scale.double()
    return y + bias.double() if bias is not None else y
