# SPDX-License-Identifier: Apache-2.0
"""The Hopper (sm90a) CUTLASS INT4 x FP8 GEMM: its prepacked layouts and the GEMM on them.

Here (any machine): the Python specification of the layout against the wgmma fragment it must
follow, the look-up-table encoding emulated as the mainloop reads it, the C++ host prepack (the
same index maps as the device kernel) against the specification, the ops' reference paths, bad
input, opcheck. On an sm90 GPU (marker ``sm90``): the device prepack, the GEMM against a float64
oracle (token tiles, partial tiles, groups, bias, output dtypes, strided activations), the module
path, torch.compile and CUDA-graph capture.
"""

import os
import subprocess
import sys

import pytest
import torch

import fastlayers
from _tolerances import (
    assert_close_to_oracle,
    fp8_tensor_core_slack,
    int4_fp8_oracle,
    opcheck_with_fp8_inputs,
    rand,
)
from fastlayers import _dtypes, _ext
from fastlayers.nn import int4_fp8 as nn_int4_fp8
from fastlayers.nn.int4_fp8 import Int4Fp8Linear
from fastlayers.ops.int4_fp8 import (
    sm90_pad_activations,
    sm90_pad_weight,
    sm90_padded_shape,
    sm90_unsupported_reason,
)
from fastlayers.reference import int4_fp8 as ref

FP8 = torch.float8_e4m3fn
HAS_HOST_PREPACK = _ext.C is not None and _ext.C.has_sm90_gemm()
needs_sm90_build = pytest.mark.skipif(
    not HAS_HOST_PREPACK, reason="this build has no Hopper (90a) CUTLASS kernels"
)
# (out_features, in_features, group_size): aligned, several 32-wide k blocks with a partial last
# group, one group per row (group_size == in_features), groups of 256.
SHAPES = [(128, 256, 128), (48, 320, 128), (32, 96, 96), (272, 1024, 256)]


def _weight(n, k, group_size, device="cpu"):
    w = rand(n, k, dtype=torch.float32, device=device, scale=0.05)
    w[0, 1] = 0.8  # an outlier
    return fastlayers.quantize_int4(w, group_size)


# ----------------------------------------------------------------------------------------------
# The layout specification
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k", [(16, 32), (48, 64), (32, 320)])
def test_layout_is_a_byte_preserving_permutation(n, k):
    off = ref.sm90_weight_offsets(n, k)
    assert torch.equal(off.reshape(-1).sort().values, torch.arange(n * k))
    # Even columns at even offsets, their odd neighbour right after: bytes map to bytes.
    assert (off[:, 0::2] % 2 == 0).all() and torch.equal(off[:, 1::2], off[:, 0::2] + 1)


def test_layout_follows_the_fp8_wgmma_a_fragment():
    """PTX ISA, wgmma .m64nNk32 with 8-bit A from registers, per warp (16 rows x 32 k): lane t
    holds rows t / 4 and t / 4 + 8, columns 4 (t % 4) + {0..3} and the same + 16. Each lane's 16
    values must be one contiguous 64-bit run, in the order the registers take them."""
    off = ref.sm90_weight_offsets(16, 32)
    for lane in range(32):
        row, quad = lane // 4, lane % 4
        coords = [
            (row + 8 * half_r, 4 * quad + i + 16 * half_k)
            for half_k in (0, 1)
            for half_r in (0, 1)
            for i in range(4)
        ]
        got = sorted(off[r, c].item() for r, c in coords)
        assert got == list(range(16 * lane, 16 * lane + 16)), lane
    # Blocks tile rows first: block (r, c) starts at 512 (r + (n / 16) c).
    off = ref.sm90_weight_offsets(48, 64)
    assert off[16, 0] == 512 and off[32, 0] == 1024 and off[0, 32] == 3 * 512


@pytest.mark.parametrize("n,k,group_size", SHAPES)
def test_prepack_round_trip(n, k, group_size):
    qw = _weight(n, k, group_size)
    packed, lut = ref.prepack_sm90(qw.qweight, qw.group_scale, group_size)
    groups = -(-k // group_size)
    assert packed.shape == (n, k // 2) and lut.shape == (groups, n, 8)
    q2, s2 = ref.unprepack_sm90(packed, lut)
    assert torch.equal(q2, qw.qweight)
    assert torch.equal(s2.view(torch.uint8), qw.group_scale.view(torch.uint8))


def test_lut_encoding_as_the_mainloop_reads_it():
    """Emulates the LUT mainloop on the prepacked bytes: index = code & 7 into the table of
    fp8(-8 s) .. -s; sign bit clear: the negated entry, except index 0, which gives -0. Every INT4
    value with every group scale must come out as the reference's fp8(q * s)."""
    n, k = 16, 32
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[~torch.isnan(codes.view(torch.float8_e4m3fn).float())]
    for scale_code in codes.tolist():
        s8 = torch.full((n, 1), scale_code, dtype=torch.uint8).view(torch.float8_e4m3fn)
        q = torch.arange(n * k).reshape(n, k) % 16 - 8  # every value -8..7
        qweight = ref.pack_int4(q)
        packed, lut = ref.prepack_sm90(qweight, s8, k)
        p = packed.reshape(-1).to(torch.int64)
        nib = torch.stack([p & 0xF, p >> 4], -1).reshape(-1)[ref.sm90_weight_offsets(n, k)]
        neg = lut[0].view(torch.float8_e4m3fn).float()  # [n, 8]
        idx = nib & 7
        picked = torch.gather(neg, 1, idx)
        # The positive table is the negated one with byte 0 replaced by -0 (the encoded zero).
        value = torch.where(nib >= 8, picked, torch.where(idx == 0, -0.0, -picked))
        want = ref.dequantize_int4(qweight, s8, torch.ones(n), k)
        assert torch.equal(value, want), scale_code


# ----------------------------------------------------------------------------------------------
# The C++ prepack on the host and the ops' reference paths (no GPU)
# ----------------------------------------------------------------------------------------------
@needs_sm90_build
@pytest.mark.parametrize("n,k,group_size", SHAPES)
def test_host_prepack_matches_the_specification(n, k, group_size):
    qw = _weight(n, k, group_size)
    qw.group_scale[0, 0] = torch.tensor(448.0).to(torch.float8_e4m3fn)  # saturating -8 s
    want = ref.prepack_sm90(qw.qweight, qw.group_scale, group_size)
    got = torch.ops.fastlayers.int4_fp8_prepack_sm90(qw.qweight, qw.group_scale, group_size)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_sm90_build
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,group_size", SHAPES + [(4096, 4096, 128), (14336, 4096, 128)])
def test_cutlass_can_implement_every_shape_we_accept(n, k, group_size, out_dtype):
    """CUTLASS's own host-side can_implement (no GPU needed) on the arguments the launcher builds,
    with the configuration picked for each M and the split-K factor of several SM counts: every
    shape sm90_unsupported_reason lets through is implementable, so nothing fails on the GPU for a
    shape we claimed."""
    C, code = _ext.C, _dtypes.code(out_dtype)
    assert C.int4_fp8_sm90_unsupported(n, k, group_size, code) is None
    for m in (1, 16, 17, 64, 100, 300, 4096):
        for sms in (1, 78, 114, 132):  # the split-K factors of these SM counts (1: none)
            assert C.int4_fp8_sm90_can_implement(m, n, k, group_size, code, k, sm_count=sms), (
                m,
                sms,
                C.int4_fp8_sm90_config(m, code),
            )
        assert C.int4_fp8_sm90_can_implement(m, n, k, group_size, code, k + 16)  # padded xq rows


# (out_features, in_features, group_size) that decode splits along K on 132 SMs: 2 weight tiles x
# 32 K tiles (8 splits), one group spanning K, and 17 K tiles (the last partial) in uneven splits.
SPLIT_SHAPES = [(256, 4096, 128), (128, 4096, 4096), (384, 2080, 128)]


@pytest.mark.skipif(_ext.C is None, reason="needs the compiled extension")
def test_split_k_policy():
    """sm90_split_k: no split while the output tiles fill half the SMs; else as many splits as
    fill the SMs, each of at least 4 K tiles (the numbers the issue's decode shapes get on an H100's
    132 SMs: 4096 -> 4096 and 14336 -> 4096 at one token are 32 tiles)."""
    split = _ext.C.int4_fp8_sm90_split_k
    assert split(32, 32, 132) == 4  # 1 x 4096 -> 4096
    assert split(32, 112, 132) == 4  # 1 x 14336 -> 4096
    assert split(112, 32, 132) == 1  # 1 x 4096 -> 14336: 112 tiles already
    assert split(66, 100, 132) == 2 and split(67, 100, 132) == 1
    assert split(2, 32, 132) == 8 and split(2, 7, 132) == 1 and split(1, 8, 132) == 2
    assert split(0, 32, 132) == 1 and split(4, 32, 0) == 1 and split(4, 0, 132) == 1
    for tiles in range(1, 140, 3):
        for k_tiles in range(1, 130, 7):
            for sms in (1, 78, 114, 132):
                s = split(tiles, k_tiles, sms)
                assert s >= 1
                if s > 1:
                    assert 2 * tiles <= sms and s * tiles <= sms and 4 * s <= k_tiles
                    assert (s + 1) * tiles > sms or 4 * (s + 1) > k_tiles  # the largest such


@needs_sm90_build
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,group_size", SPLIT_SHAPES)
def test_cutlass_can_implement_the_split_k_arguments(n, k, group_size, out_dtype):
    """CUTLASS's host-side can_implement on the split-K arguments an H100 (132 SMs) would get."""
    C, code = _ext.C, _dtypes.code(out_dtype)
    for m in (1, 16, 17, 100):
        assert C.int4_fp8_sm90_can_implement(m, n, k, group_size, code, k, sm_count=132), m


@needs_sm90_build
def test_cutlass_rejects_what_we_reject():
    """Groups of 64 or 192 (not whole 128-wide K tiles) are refused by CUTLASS too: the reason we
    give is CUTLASS's constraint, not ours; and its checks are real (a misaligned row stride)."""
    code = _dtypes.code(torch.bfloat16)
    assert "group_size" in _ext.C.int4_fp8_sm90_unsupported(256, 512, 64, code)
    assert not _ext.C.int4_fp8_sm90_can_implement(16, 256, 512, 64, code, 512)
    assert "group_size" in _ext.C.int4_fp8_sm90_unsupported(256, 576, 192, code)
    assert not _ext.C.int4_fp8_sm90_can_implement(16, 256, 576, 192, code, 576)
    # TMA needs 16-byte aligned rows of xq: the launcher copies such views first
    assert not _ext.C.int4_fp8_sm90_can_implement(16, 256, 512, 128, code, 513)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_gemm_op_reference_path(out_dtype):
    """On the CPU the prepacked op undoes the prepack and runs the reference: same bits as the
    unpacked GEMM's reference."""
    n, k, g = 48, 320, 128
    qw = _weight(n, k, g)
    packed, lut = torch.ops.fastlayers.int4_fp8_prepack_sm90(qw.qweight, qw.group_scale, g)
    xq, xs = fastlayers.quantize_fp8_per_token(rand(2, 3, k, dtype=torch.bfloat16, device="cpu"))
    bias = rand(n, dtype=torch.float32, device="cpu")
    y = torch.ops.fastlayers.int4_fp8_gemm_sm90(xq, xs, packed, lut, qw.channel_scale, bias, g,
                                                 out_dtype)  # fmt: skip
    want = ref.int4_fp8_gemm(xq, xs, qw.qweight, qw.group_scale, qw.channel_scale, g, bias,
                             out_dtype)  # fmt: skip
    assert y.shape == (2, 3, n) and torch.equal(y, want)


def test_opcheck():
    n, k, g = 32, 256, 128
    qw = _weight(n, k, g)
    torch.library.opcheck(
        torch.ops.fastlayers.int4_fp8_prepack_sm90, (qw.qweight, qw.group_scale, g),
        test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )  # fmt: skip
    packed, lut = ref.prepack_sm90(qw.qweight, qw.group_scale, g)
    xq, xs = fastlayers.quantize_fp8_per_token(rand(3, k, dtype=torch.float32, device="cpu"))
    args = (xq, xs, packed, lut, qw.channel_scale, None, g, torch.bfloat16)
    opcheck_with_fp8_inputs(torch.ops.fastlayers.int4_fp8_gemm_sm90, args)


def _prepack_args():
    qw = _weight(32, 256, 128)
    return [qw.qweight, qw.group_scale, 128]


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda a: a.__setitem__(0, a[0].to(torch.int8)), TypeError, "qweight must be uint8"),
        (lambda a: a.__setitem__(0, a[0][:24]), ValueError, "group_scale must be"),
        (lambda a: a.__setitem__(2, 64), ValueError, "group_scale must be"),
        (lambda a: a.__setitem__(2, 3), ValueError, "group_size must be a positive even"),
        (lambda a: a.__setitem__(1, a[1].float()), ValueError, "group_scale must be"),
    ],
)
def test_prepack_bad_input(mutate, error, match):
    args = _prepack_args()
    mutate(args)
    with pytest.raises(error, match=match):
        torch.ops.fastlayers.int4_fp8_prepack_sm90(*args)


@pytest.mark.parametrize(
    "n,k,group_size,match",
    [(24, 256, 128, "out_features % 16"), (32, 80, 80, "in_features % 32"),
     (32, 256, 64, "group_size")],
)  # fmt: skip
def test_prepack_rejects_shapes_the_kernel_cannot_take(n, k, group_size, match):
    qw = fastlayers.quantize_int4(rand(n, k, dtype=torch.float32, device="cpu"), group_size)
    with pytest.raises(ValueError, match=match):
        torch.ops.fastlayers.int4_fp8_prepack_sm90(qw.qweight, qw.group_scale, group_size)


def test_gemm_bad_input():
    n, k, g = 32, 256, 128
    qw = _weight(n, k, g)
    packed, lut = ref.prepack_sm90(qw.qweight, qw.group_scale, g)
    xq, xs = fastlayers.quantize_fp8_per_token(rand(3, k, dtype=torch.float32, device="cpu"))
    op = torch.ops.fastlayers.int4_fp8_gemm_sm90
    with pytest.raises(TypeError, match="packed_weight must be uint8"):
        op(xq, xs, packed.to(torch.int8), lut, qw.channel_scale, None, g, torch.bfloat16)
    with pytest.raises(ValueError, match="lut_scale"):
        op(xq, xs, packed, lut[:, :8], qw.channel_scale, None, g, torch.bfloat16)
    with pytest.raises(TypeError, match="out_dtype must be one of"):
        op(xq, xs, packed, lut, qw.channel_scale, None, g, torch.float32)
    with pytest.raises(ValueError, match="xq has 128 in-features"):
        op(xq[:, :128], xs, packed, lut, qw.channel_scale, None, g, torch.bfloat16)
    with pytest.raises(ValueError, match="channel_scale must be float32"):
        op(xq, xs, packed, lut, qw.channel_scale[:8], None, g, torch.bfloat16)


def test_module_on_cpu_has_no_sm90_buffers_and_says_why():
    layer = Int4Fp8Linear.from_linear(torch.nn.Linear(256, 64), group_size=128)
    assert layer.prepack() is False
    assert layer.sm90_weight is None and layer.sm90_lut_scale is None
    assert layer.sm90_gemm_shape() is None
    assert not any(key.startswith("sm90") for key in layer.state_dict())
    reason = sm90_unsupported_reason(torch.device("cpu"), 64, 256, 128, torch.bfloat16)
    assert isinstance(reason, str) and reason


def test_module_sm90_branch_passes_the_right_arguments():
    """The module's sm90 branch, on the CPU: with the prepacked buffers set by hand (normally only
    on an sm90 GPU), a traced forward goes through the int4_fp8_gemm_sm90 op (its CPU path is the
    reference through the unprepack) and must give the reference's bits, bias included."""
    layer = Int4Fp8Linear.from_linear(torch.nn.Linear(256, 64), out_dtype=torch.bfloat16)
    x = rand(2, 3, 256, dtype=torch.float32, device="cpu")
    xq, xs = fastlayers.quantize_fp8_per_token(x)
    want = ref.int4_fp8_gemm(xq, xs, layer.qweight, layer.group_scale, layer.channel_scale, 128,
                             layer.bias, torch.bfloat16)  # fmt: skip
    pw, lut = ref.prepack_sm90(layer.qweight, layer.group_scale, 128)
    layer.sm90_weight, layer.sm90_lut_scale = pw, lut
    layer.sm90_channel_scale, layer.sm90_bias = layer.channel_scale, layer.bias.float()
    traced = torch.compile(layer, backend="eager", fullgraph=True)
    assert torch.equal(traced(x), want)


@pytest.mark.parametrize(
    "n,k,g,want",
    [
        (64, 256, 128, (64, 256, 128)),  # aligned: as is
        (40, 200, 128, (48, 224, 128)),  # two groups of 128, the second partial either way
        (40, 200, 200, (48, 224, 224)),  # one group spans the padded width
        (40, 200, 512, (48, 224, 224)),
        (4096, 4100, 128, (4096, 4128, 128)),  # 4128 = 32 * 129 < 33 groups * 128: no new group
        (40, 200, 64, None),  # several groups of 64: padding cannot help
        (48, 256, 96, None),
    ],
)
def test_sm90_padded_shape(n, k, g, want):
    got = sm90_padded_shape(n, k, g)
    assert got == want
    if got is not None:
        n_p, k_p, g_p = got
        assert n_p % 16 == 0 and k_p % 32 == 0 and (g_p == k_p or g_p % 128 == 0)
        assert -(-k_p // g_p) == -(-k // g)  # the same groups


def test_sm90_pad_weight_and_activations_keep_the_products():
    """The padded weight and activations give the unpadded GEMM's sums (zero weights and zero
    activation columns) and rows the caller drops; nothing padded is touched otherwise."""
    qw = _weight(40, 200, 128)
    bias = rand(40, dtype=torch.bfloat16, device="cpu")
    qweight, group_scale, channel_scale, b = sm90_pad_weight(qw, bias, 48, 224)
    assert qweight.shape == (48, 112) and group_scale.shape == (48, 2) and group_scale.dtype == FP8
    assert channel_scale.shape == (48,) and b.shape == (48,) and b.dtype == torch.float32
    assert torch.equal(qweight[:40, :100], qw.qweight) and not qweight[40:].any()
    assert not qweight[:, 100:].any()
    assert torch.equal(group_scale[:40].view(torch.uint8), qw.group_scale.view(torch.uint8))
    assert torch.equal(group_scale[40:].float(), torch.ones(8, 2))
    assert torch.equal(channel_scale[:40], qw.channel_scale) and not channel_scale[40:].any()
    assert torch.equal(b[:40], bias.float()) and not b[40:].any()
    xq, xs = fastlayers.quantize_fp8_per_token(rand(3, 5, 200, dtype=torch.float32, device="cpu"))
    xp = sm90_pad_activations(xq, 224)
    assert xp.shape == (3, 5, 224) and xp.dtype == FP8
    assert torch.equal(xp[..., :200].view(torch.uint8), xq.view(torch.uint8))
    assert not xp[..., 200:].view(torch.uint8).any()
    assert sm90_pad_activations(xq, 200) is xq
    padded = fastlayers.QuantizedWeight(qweight, group_scale, channel_scale, 128)
    y = ref.int4_fp8_gemm(xp, xs, qweight, group_scale, channel_scale, 128, b, torch.float32)
    want = int4_fp8_oracle(xq, xs, qw, bias.float())
    assert_close_to_oracle(y[..., :40], want.float(), want)
    assert torch.equal(int4_fp8_oracle(xp, xs, padded, b)[..., :40], want)
    with pytest.raises(ValueError, match="cannot pad"):
        sm90_pad_weight(qw, None, 32, 224)
    with pytest.raises(ValueError, match="cannot pad"):
        sm90_pad_weight(qw, None, 48, 201)


def _sm90_on_cpu(monkeypatch):
    """Lets the module build its sm90 layouts on the CPU (where the op's path is the reference
    through the unprepack), asserting that it only ever asks for shapes the kernel takes."""
    asked = []

    def reason(device, n, k, group_size, out_dtype):
        assert n % 16 == 0 and k % 32 == 0 and (group_size == k or group_size % 128 == 0)
        asked.append((n, k, group_size))
        return None

    monkeypatch.setattr(nn_int4_fp8, "sm90_unsupported_reason", reason)
    return asked


@pytest.mark.parametrize(
    "n,k,g",
    [(40, 200, 128), (40, 200, 200), (33, 256, 128), (64, 208, 256), (128, 256, 128)],
)
def test_module_pads_odd_shapes_for_the_sm90_gemm(monkeypatch, n, k, g):
    """Shapes off the sm90 GEMM's alignment are padded at prepack, not refused: the module's sm90
    branch (run here through the op's reference path) matches the unpadded contract for tensor and
    (xq, xs) inputs, strided inputs and under torch.compile; the output is contiguous."""
    asked = _sm90_on_cpu(monkeypatch)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(rand(n, k, dtype=torch.float32, device="cpu", scale=0.05))
        lin.bias.copy_(rand(n, dtype=torch.float32, device="cpu"))
    layer = Int4Fp8Linear.from_linear(lin, group_size=g, out_dtype=torch.bfloat16)
    assert asked == [sm90_padded_shape(n, k, g)]
    n_p, k_p, _ = asked[0]
    assert layer.sm90_gemm_shape() == asked[0]
    assert layer.sm90_weight.shape == (n_p, k_p // 2)
    assert layer.sm90_channel_scale.shape == (n_p,) and layer.sm90_bias.shape == (n_p,)
    qw = layer.quantized_weight
    base = rand(2, 3, 2 * k, dtype=torch.float32, device="cpu")
    for x in (base[..., :k], base[..., ::2]):  # rows apart by 2k, then a column stride of 2
        xq, xs = fastlayers.quantize_fp8_per_token(x)
        want = ref.int4_fp8_gemm(xq, xs, qw.qweight, qw.group_scale, qw.channel_scale, g,
                                 layer.bias, torch.bfloat16)  # fmt: skip
        oracle = int4_fp8_oracle(xq, xs, qw, layer.bias)
        for got in (layer(x), layer((xq, xs))):
            assert got.shape == (2, 3, n) and got.is_contiguous()
            assert_close_to_oracle(got, want, oracle)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert_close_to_oracle(compiled(x), want, oracle)
    with pytest.raises(ValueError, match=f"{k} features"):
        layer((xq[..., :-2], xs))


def _assert_layer_follows_the_contract(layer, x):
    """``layer(x)`` against the reference GEMM on the same FP8 activations and its float64 oracle;
    returns the output."""
    xq, xs = fastlayers.quantize_fp8_per_token(x)
    qw = layer.quantized_weight
    want = ref.int4_fp8_gemm(xq, xs, qw.qweight, qw.group_scale, qw.channel_scale,
                             layer.group_size, layer.bias, layer.out_dtype)  # fmt: skip
    got = layer(x)
    slack = fp8_tensor_core_slack(xq, xs, qw) if layer.sm90_weight is not None else None
    assert_close_to_oracle(got, want, int4_fp8_oracle(xq, xs, qw, layer.bias), slack=slack)
    return got


def test_module_keeps_the_generic_path_for_group_sizes_padding_cannot_fix(monkeypatch):
    asked = _sm90_on_cpu(monkeypatch)
    layer = Int4Fp8Linear.from_linear(torch.nn.Linear(256, 48), group_size=64)
    assert asked == [] and layer.sm90_weight is None and layer.sm90_channel_scale is None
    _assert_layer_follows_the_contract(layer, rand(4, 256, dtype=torch.float32, device="cpu"))


# ----------------------------------------------------------------------------------------------
# sm90 GPU
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.sm90
@pytest.mark.parametrize("n,k,group_size", SHAPES)
def test_device_prepack_matches_the_specification(n, k, group_size):
    qw = _weight(n, k, group_size, "cuda")
    want = ref.prepack_sm90(qw.qweight, qw.group_scale, group_size)
    got = torch.ops.fastlayers.int4_fp8_prepack_sm90(qw.qweight, qw.group_scale, group_size)
    assert torch.equal(got[0].cpu(), want[0].cpu()) and torch.equal(got[1].cpu(), want[1].cpu())


@pytest.mark.cuda
@pytest.mark.sm90
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,group_size", SHAPES)
@pytest.mark.parametrize("m", [1, 5, 16, 17, 33, 64, 100, 128, 300])
def test_gemm_matches_oracle(m, n, k, group_size, out_dtype):
    qw = _weight(n, k, group_size, "cuda")
    packed, lut = torch.ops.fastlayers.int4_fp8_prepack_sm90(qw.qweight, qw.group_scale,
                                                             group_size)  # fmt: skip
    xq, xs = fastlayers.quantize_fp8_per_token(rand(m, k, dtype=torch.bfloat16, device="cuda"))
    bias = None if m % 2 else rand(n, dtype=torch.float32, device="cuda")
    y = torch.ops.fastlayers.int4_fp8_gemm_sm90(xq, xs, packed, lut, qw.channel_scale, bias,
                                                 group_size, out_dtype)  # fmt: skip
    want = ref.int4_fp8_gemm(xq, xs, qw.qweight, qw.group_scale, qw.channel_scale, group_size,
                             bias, out_dtype)  # fmt: skip
    oracle, slack = int4_fp8_oracle(xq, xs, qw, bias), fp8_tensor_core_slack(xq, xs, qw)
    assert_close_to_oracle(y, want, oracle, slack=slack)


@pytest.mark.cuda
@pytest.mark.sm90
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,group_size", SPLIT_SHAPES)
@pytest.mark.parametrize("m", [1, 16, 17, 100])
def test_gemm_split_k_matches_oracle(m, n, k, group_size, out_dtype):
    """Decode shapes that split K (the factor asserted): the splits' partial sums reduce to the
    whole sum before the epilogue, bias and scales applied once. Run twice: the deterministic
    reduction gives the same bits."""
    if os.environ.get("FASTLAYERS_SM90_SPLIT_K") == "0":
        pytest.skip("split-K turned off (FASTLAYERS_SM90_SPLIT_K=0)")
    qw = _weight(n, k, group_size, "cuda")
    packed, lut = torch.ops.fastlayers.int4_fp8_prepack_sm90(qw.qweight, qw.group_scale,
                                                             group_size)  # fmt: skip
    code, index = _dtypes.code(out_dtype), torch.cuda.current_device()
    assert _ext.C.int4_fp8_sm90_splits(index, m, n, k, group_size, code) > 1
    xq, xs = fastlayers.quantize_fp8_per_token(rand(m, k, dtype=torch.bfloat16, device="cuda"))
    bias = rand(n, dtype=torch.float32, device="cuda") if m != 17 else None
    op = torch.ops.fastlayers.int4_fp8_gemm_sm90
    y = op(xq, xs, packed, lut, qw.channel_scale, bias, group_size, out_dtype)
    want = ref.int4_fp8_gemm(xq, xs, qw.qweight, qw.group_scale, qw.channel_scale, group_size,
                             bias, out_dtype)  # fmt: skip
    oracle, slack = int4_fp8_oracle(xq, xs, qw, bias), fp8_tensor_core_slack(xq, xs, qw)
    assert_close_to_oracle(y, want, oracle, slack=slack)
    again = op(xq, xs, packed, lut, qw.channel_scale, bias, group_size, out_dtype)
    assert torch.equal(y, again)


@pytest.mark.cuda
@pytest.mark.sm90
def test_split_k_can_be_turned_off():
    """FASTLAYERS_SM90_SPLIT_K=0 (read once per process) turns the split off: a decode shape that
    splits K (1 x 4096 -> 4096: 32 output tiles) runs data-parallel in a process started with it;
    without it, the policy's factor for this GPU's SMs."""
    n, k, g = 4096, 4096, 128
    code = (
        "import torch, fastlayers; from fastlayers import _ext; "
        f"print(_ext.C.int4_fp8_sm90_splits(torch.cuda.current_device(), 1, {n}, {k}, {g}, "
        f"{_dtypes.code(torch.bfloat16)}))"
    )
    env = {**os.environ, "FASTLAYERS_SM90_SPLIT_K": "0"}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    env.pop("FASTLAYERS_SM90_SPLIT_K")
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120, check=True)  # fmt: skip
    assert int(off.stdout.split()[-1]) == 1
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    assert int(on.stdout.split()[-1]) == _ext.C.int4_fp8_sm90_split_k(n // 128, k // 128, sms)
    assert int(on.stdout.split()[-1]) > 1


@pytest.mark.cuda
@pytest.mark.sm90
def test_gemm_strided_and_unaligned_activations():
    n, k, g = 128, 256, 128
    qw = _weight(n, k, g, "cuda")
    packed, lut = torch.ops.fastlayers.int4_fp8_prepack_sm90(qw.qweight, qw.group_scale, g)
    xq0, xs = fastlayers.quantize_fp8_per_token(rand(7, k, dtype=torch.bfloat16, device="cuda"))
    buf = torch.empty(7, k + 32, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    for start in (0, 16, 1):  # padded rows (TMA reads them in place); an odd base (copied first)
        buf.view(torch.uint8).fill_(0x7F)  # NaN around the view
        xq = buf[:, start : start + k]
        xq.copy_(xq0)
        y = torch.ops.fastlayers.int4_fp8_gemm_sm90(xq, xs, packed, lut, qw.channel_scale, None,
                                                     g, torch.bfloat16)  # fmt: skip
        want = ref.int4_fp8_gemm(xq0, xs, qw.qweight, qw.group_scale, qw.channel_scale, g, None,
                                 torch.bfloat16)  # fmt: skip
        assert_close_to_oracle(y, want, int4_fp8_oracle(xq0, xs, qw, None),
                               slack=fp8_tensor_core_slack(xq0, xs, qw))  # fmt: skip


@pytest.mark.cuda
@pytest.mark.sm90
def test_module_uses_the_sm90_gemm_and_rebuilds_after_moves(tmp_path):
    lin = torch.nn.Linear(512, 256, dtype=torch.bfloat16, device="cuda")
    layer = Int4Fp8Linear.from_linear(lin)
    assert layer.sm90_weight is not None and layer.sm90_weight.is_cuda
    x = rand(3, 5, 512, dtype=torch.bfloat16, device="cuda")
    xq, xs = fastlayers.quantize_fp8_per_token(x)
    qw = layer.quantized_weight
    want = ref.int4_fp8_gemm(xq, xs, qw.qweight, qw.group_scale, qw.channel_scale, 128,
                             layer.bias, torch.bfloat16)  # fmt: skip
    oracle, slack = int4_fp8_oracle(xq, xs, qw, layer.bias), fp8_tensor_core_slack(xq, xs, qw)
    assert_close_to_oracle(layer(x), want, oracle, slack=slack)
    compiled = torch.compile(layer, fullgraph=True)
    assert_close_to_oracle(compiled(x), want, oracle, slack=slack)
    # device moves drop and rebuild the layouts; a load rebuilds them for the new weight
    layer.cpu()
    assert layer.sm90_weight is None
    layer.cuda()
    assert layer.sm90_weight is not None
    other = Int4Fp8Linear.from_linear(torch.nn.Linear(512, 256, dtype=torch.bfloat16))
    layer.load_state_dict(other.state_dict())
    want = ref.prepack_sm90(other.qweight, other.group_scale, 128)[0]
    assert torch.equal(layer.sm90_weight.cpu(), want)


@pytest.mark.cuda
@pytest.mark.sm90
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_module_lean_route_equals_the_ops_route(out_dtype):
    """Inference calls take the lean Hopper route (Sm90InferPlan: buffers checked once, the two
    kernels called straight away): bit-equal to the ops' route (``_forward``) for 1-33 tokens,
    strided rows, fp32/bf16 inputs; an in-place bias change reaches it (the plan's fp32 bias copy
    is rebuilt: keyed on the buffer's version); a padded layer (out_features 40) keeps the ops'
    route and its values."""
    lin = torch.nn.Linear(512, 256, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        lin.bias.copy_(rand(256, dtype=torch.bfloat16, device="cuda"))
    layer = Int4Fp8Linear.from_linear(lin, out_dtype=out_dtype)
    base = rand(33, 1024, dtype=torch.float32, device="cuda")
    with torch.no_grad():
        for x in (base[:1, :512], base[:4, :512].bfloat16(), base[:16, ::2], base[:, 512:]):
            got = layer(x)
            assert layer._sm90_plan is not None and layer._sm90_plan.ok
            assert got.dtype == out_dtype and torch.equal(got, layer._forward(x))
        layer.sm90_bias.add_(1.0)
        x = base[:2, :512]
        assert torch.equal(layer(x), layer._forward(x))
    odd = Int4Fp8Linear.from_linear(torch.nn.Linear(512, 40, device="cuda"), out_dtype=out_dtype)
    with torch.no_grad():
        x = base[:3, :512]
        assert torch.equal(odd(x), odd._forward(x)) and odd._sm90_plan is not None
        assert not odd._sm90_plan.ok


@pytest.mark.sm90
def test_module_pads_odd_shapes_and_falls_back_once_for_group_sizes(recwarn):
    bf16 = torch.bfloat16  # (the Hopper GEMM writes bf16 or fp16: a float32 layer falls back)
    for n, k, g in ((40, 200, 128), (33, 256, 256), (40, 200, 200)):  # padded at prepack
        lin = torch.nn.Linear(k, n, device="cuda", dtype=bf16)
        layer = Int4Fp8Linear.from_linear(lin, group_size=g)
        assert layer.sm90_weight is not None and layer.sm90_weight.shape[0] % 16 == 0
        x = rand(5, 7, k, dtype=bf16, device="cuda")
        assert _assert_layer_follows_the_contract(layer, x).is_contiguous()
    assert not [w for w in recwarn if "generic" in str(w.message)]
    lin = torch.nn.Linear(256, 48, device="cuda", dtype=bf16)
    layer = Int4Fp8Linear.from_linear(lin, group_size=64)
    assert layer.sm90_weight is None  # groups of 64: the generic CUDA GEMM, warned once
    assert len([w for w in recwarn if "generic" in str(w.message)]) == 1
    _assert_layer_follows_the_contract(layer, rand(4, 256, dtype=bf16, device="cuda"))
    layer = Int4Fp8Linear.from_linear(torch.nn.Linear(384, 56, device="cuda"))
    assert layer.sm90_weight is None  # float32 out: the generic CUDA GEMM, warned once
    assert len([w for w in recwarn if "float32" in str(w.message)]) == 1
    _assert_layer_follows_the_contract(layer, rand(4, 384, dtype=torch.float32, device="cuda"))


@pytest.mark.cuda
@pytest.mark.sm90
def test_gemm_captures_in_a_cuda_graph():
    layer = Int4Fp8Linear.from_linear(torch.nn.Linear(1024, 512, device="cuda"))
    x = rand(16, 1024, dtype=torch.float32, device="cuda")
    eager = layer(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(x)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    x.copy_(rand(16, 1024, dtype=torch.float32, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, layer(x)) and not torch.equal(out, eager)


def test_fp8_tensor_core_slack_is_a_per_element_allowance():
    """The allowance the sm90 GEMM tests add (tests/_tolerances.py): 2^-9 of xs * c * sum |x w|
    per element; errors within it pass, beyond it fail (CPU: the sm90 tests themselves need one)."""
    qw = _weight(48, 320, 128)
    xq, xs = fastlayers.quantize_fp8_per_token(rand(5, 320, dtype=torch.float32, device="cpu"))
    oracle, slack = int4_fp8_oracle(xq, xs, qw, None), fp8_tensor_core_slack(xq, xs, qw)
    lut = ref.dequantize_int4(qw.qweight, qw.group_scale, qw.channel_scale, qw.group_size)
    want = 2.0**-9 * (xq.double().abs() @ lut.double().abs().t()) * xs.double()
    torch.testing.assert_close(slack, want, rtol=1e-6, atol=0)  # (lut * c rounded to fp32)
    assert (slack > 0).all()
    out = oracle + slack * torch.where(torch.rand_like(oracle) < 0.5, -0.9, 0.9)
    assert_close_to_oracle(out.float(), oracle.float(), oracle, atol=0.0, factor=1.0, slack=slack)
    out[2, 7] = oracle[2, 7] + 2 * slack[2, 7]
    with pytest.raises(AssertionError, match="max error"):
        assert_close_to_oracle(out, oracle, oracle, atol=0.0, factor=1.0, slack=slack)
