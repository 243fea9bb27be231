# SPDX-License-Identifier: Apache-2.0
"""The INT4 x FP8 reference (FireQ formats): packing, weight and activation quantisation, the GEMM,
and the underflow that channel scaling prevents. The kernels (later) are tested against these."""

import pytest
import torch

from _tolerances import rand
from fastlayers.reference import int4_fp8 as ref
from fastlayers.reference import rms_norm_fp8


def test_pack_int4_layout_and_round_trip():
    q = torch.tensor([[1, -2, 7, -8], [0, -1, 3, 5]], dtype=torch.int8)
    packed = ref.pack_int4(q)
    # even k in the low nibble, two's complement: (1, -2) -> 0xE1, (7, -8) -> 0x87
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0xE1, 0x87], [0xF0, 0x53]]
    assert torch.equal(ref.unpack_int4(packed), q)
    r = torch.randint(-8, 8, (37, 258), dtype=torch.int8)
    assert torch.equal(ref.unpack_int4(ref.pack_int4(r)), r)
    with pytest.raises(ValueError, match="even"):
        ref.pack_int4(r[:, :3])


@pytest.mark.parametrize("channel_scale", ref.CHANNEL_SCALES)
@pytest.mark.parametrize("shape,group", [((64, 256), 128), ((33, 320), 128), ((5, 46), 16)])
def test_quantize_int4_formats_and_error_bound(channel_scale, shape, group):
    w = rand(*shape, dtype=torch.float32, device="cpu", scale=0.05)
    w[3, 7] = 0.9  # an outlier in one group
    qweight, s8, c = ref.quantize_int4(w, group, channel_scale)
    n, k = shape
    groups = -(-k // group)
    assert qweight.shape == (n, k // 2) and qweight.dtype == torch.uint8
    assert s8.shape == (n, groups) and s8.dtype == torch.float8_e4m3fn
    assert c.shape == (n,) and c.dtype == torch.float32 and bool((c > 0).all())
    s = s8.float()
    assert bool((s >= 2.0**-9).all()) and bool((s <= 448).all())
    if channel_scale == "per_channel":  # every LUT entry |q * s8| <= 448, the largest group at 56
        assert bool((s <= 56).all())
        torch.testing.assert_close(s.amax(-1), torch.full((n,), 56.0))
    q = ref.unpack_int4(qweight).float()
    assert bool((q >= -8).all()) and bool((q <= 7).all())
    # Without the LUT rounding the error is at most half a quantisation step.
    step = (c[:, None] * s).repeat_interleave(group, 1)[:, :k]
    w_hat = ref.dequantize_int4(qweight, s8, c, group, round_lut=False)
    assert bool(((w - w_hat).abs() <= 0.5 * step * (1 + 1e-6)).all())
    # The LUT rounding (fp8 of q * s8) adds at most half an FP8 ulp: 2^-4 relative.
    w_lut = ref.dequantize_int4(qweight, s8, c, group)
    assert bool(((w_lut - w_hat).abs() <= w_hat.abs() * 2.0**-4 + 1e-30).all())


def test_channel_scaling_prevents_underflow():
    """Weights whose group scale max/7 is below the smallest FP8 value: without a channel scale
    the group scales clamp at 2^-9 and every weight rounds to 0; per-channel and the per-tensor
    power of two recover them."""
    w = torch.randn(16, 256) * 2e-4  # group max ~6e-4: max/7 < 2^-9 ~ 1.95e-3
    errors = {}
    for mode in ref.CHANNEL_SCALES:
        qw, s8, c = ref.quantize_int4(w, 128, mode)
        errors[mode] = ((ref.dequantize_int4(qw, s8, c) - w).norm() / w.norm()).item()
    assert errors["none"] > 0.9  # (almost) everything underflows
    assert errors["per_channel"] < 0.15
    assert errors["per_tensor_pow2"] < 0.15
    t = ref.pow2_tensor_scale(ref._group_max(w, 128))
    assert t > 1 and t == 2 ** round(torch.log2(torch.tensor(t)).item())


def test_quantize_fp8_per_token_matches_rms_norm_fp8():
    x = rand(7, 300, dtype=torch.bfloat16, device="cpu", scale=3.0)
    x[2] = 0
    xq, xs = ref.quantize_fp8_per_token(x)
    assert xq.dtype == torch.float8_e4m3fn and xs.shape == (7, 1) and xs[2].item() == 1.0
    amax = x.float().abs().amax(-1)
    torch.testing.assert_close(xs[:, 0], torch.where(amax > 0, amax / 448, torch.ones_like(amax)))
    assert float(xq.float().abs().amax()) == 448.0
    rel = (xq.float() * xs - x.float()).abs() / x.float().abs().clamp_min(1e-3)
    assert float(rel[x.float().abs() > 1e-1].max()) <= 2.0**-4
    # rms_norm_fp8 hands the GEMM exactly this quantisation of the normalised row.
    w = torch.ones(300)
    yq, ys = rms_norm_fp8(x.float(), w)
    q2, s2 = ref.quantize_fp8_per_token(x.float() * torch.rsqrt(
        x.float().pow(2).mean(-1, keepdim=True) + 1e-6))  # fmt: skip
    assert torch.equal(yq.float(), q2.float()) and torch.equal(ys, s2)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_fp8_gemm_is_the_stated_formula(out_dtype, bias):
    n, k, g = 48, 320, 128  # K with a partial last group
    w = rand(n, k, dtype=torch.float32, device="cpu", scale=0.05)
    x = rand(3, 3, k, dtype=torch.bfloat16, device="cpu")
    b = rand(n, dtype=torch.float32, device="cpu") if bias else None
    qw, s8, c = ref.quantize_int4(w, g)
    xq, xs = ref.quantize_fp8_per_token(x)
    y = ref.int4_fp8_gemm(xq, xs, qw, s8, c, g, bias=b, out_dtype=out_dtype)
    assert y.shape == (3, 3, n) and y.dtype == out_dtype
    # float64 evaluation of the same formula
    lut = ref.to_fp8(
        ref.unpack_int4(qw).double() * s8.double().repeat_interleave(g, 1)[:, :k]
    ).double()
    y64 = (xq.double() @ lut.t()) * xs.double() * c.double()
    if bias:
        y64 = y64 + b.double()
    tol = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5}[out_dtype]
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol * float(y64.abs().max()))
    # And it approximates the unquantised layer: a few percent relative error.
    exact = x.float() @ w.t() + (b if bias else 0)
    assert float((y.float() - exact).norm() / exact.norm()) < 0.1  # INT4 noise: ~6 % here
    # The FP8 rounding of q * s8 costs accuracy, never gains it on average.
    y_pseudo = ref.int4_fp8_gemm(xq, xs, qw, s8, c, g, bias=b, out_dtype=torch.float32,
                                 round_lut=False)  # fmt: skip
    assert not torch.equal(y_pseudo, y.float())


def test_quantize_int4_bad_arguments():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="even K"):
        ref.quantize_int4(w[:, :7])
    with pytest.raises(ValueError, match="group_size"):
        ref.quantize_int4(w, 0)
    with pytest.raises(ValueError, match="channel_scale"):
        ref.quantize_int4(w, 4, "per_row")
