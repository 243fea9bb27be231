# SPDX-License-Identifier: Apache-2.0
"""RMSNorm kernels (CPU, and CUDA where present) against the reference and a float64 oracle."""

import pytest
import torch

import fastlayers
from _tolerances import FP8_STEP_RTOL, assert_close_to_oracle, fp8_codes, rand
from fastlayers import reference as ref

HIDDEN_SIZES = [8, 111, 768, 769, 4096, 5120, 5125, 8192, 16384, 20000]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BATCH_SHAPES = [(1,), (7,), (2, 3)]  # 1-D/2-D/3-D inputs (x is [*batch, hidden])
OFFSETS = [0.0, 1.0]  # Llama and Gemma forms


def _inputs(batch, hidden, dtype, device, weight_dtype=None):
    x = rand(*batch, hidden, dtype=dtype, device=device, scale=2.0)
    w = rand(hidden, dtype=weight_dtype or dtype, device=device)
    return x, w


def _oracle(fn, *tensors, **kw):
    return fn(*[t.double() if isinstance(t, torch.Tensor) else t for t in tensors], **kw)


@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_offset", OFFSETS)
def test_rms_norm(device, hidden, dtype, weight_offset):
    x, w = _inputs((7,), hidden, dtype, device)
    y = fastlayers.rms_norm(x, w, 1e-6, weight_offset)
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    assert_close_to_oracle(
        y, ref.rms_norm(x, w, 1e-6, weight_offset), _oracle(ref.rms_norm, x, w, 1e-6, weight_offset)
    )


@pytest.mark.parametrize("batch", [(1,), (2, 3), (2, 1, 3)])
@pytest.mark.parametrize("hidden", [769, 4096])
def test_rms_norm_batch_shapes(device, batch, hidden):
    x, w = _inputs(batch, hidden, torch.bfloat16, device)
    y = fastlayers.rms_norm(x, w)
    assert y.shape == x.shape
    assert_close_to_oracle(y, ref.rms_norm(x, w), _oracle(ref.rms_norm, x, w))


def test_rms_norm_1d_input(device):
    x, w = _inputs((), 4096, torch.float16, device)
    assert x.dim() == 1
    assert_close_to_oracle(
        fastlayers.rms_norm(x, w), ref.rms_norm(x, w), _oracle(ref.rms_norm, x, w)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [111, 4096])
def test_float32_weight_with_16bit_input(device, dtype, hidden):
    x, w = _inputs((5,), hidden, dtype, device, weight_dtype=torch.float32)
    for offset in OFFSETS:
        y = fastlayers.rms_norm(x, w, 1e-5, offset)
        assert y.dtype == dtype
        assert_close_to_oracle(
            y, ref.rms_norm(x, w, 1e-5, offset), _oracle(ref.rms_norm, x, w, 1e-5, offset)
        )


def _strided_cases(hidden, dtype, device):
    """Views whose rows are not packed: row-strided slices, batch dims that cannot merge, and a
    non-unit last stride."""
    base = rand(6, hidden + 24, dtype=dtype, device=device)
    yield "row-strided", base[:, 8 : 8 + hidden]
    b3 = rand(3, 4, hidden, dtype=dtype, device=device)
    yield "transposed batch", b3.transpose(0, 1)
    t = rand(hidden, 5, dtype=dtype, device=device)
    yield "column-strided", t.t()


@pytest.mark.parametrize("hidden", [769, 4096, 5120])
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(device, hidden, dtype):
    w = rand(hidden, dtype=dtype, device=device)
    for name, x in _strided_cases(hidden, dtype, device):
        assert not x.is_contiguous(), name
        y = fastlayers.rms_norm(x, w)
        assert_close_to_oracle(y, ref.rms_norm(x, w), _oracle(ref.rms_norm, x, w), name=name)
        r = (
            rand(*x.shape, dtype=dtype, device=device)
            .transpose(-1, -2)
            .contiguous()
            .transpose(-1, -2)
        )
        y2, s2 = fastlayers.fused_add_rms_norm(x, r, w)
        y_ref, s_ref = ref.fused_add_rms_norm(x, r, w)
        assert torch.equal(s2, s_ref), name
        assert_close_to_oracle(y2, y_ref, _oracle(ref.rms_norm, s_ref, w), name=name)


@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_offset", OFFSETS)
def test_fused_add_rms_norm(device, hidden, dtype, weight_offset):
    x, w = _inputs((2, 3), hidden, dtype, device)
    residual = rand(2, 3, hidden, dtype=dtype, device=device)
    y, new_residual = fastlayers.fused_add_rms_norm(x, residual, w, 1e-6, weight_offset)
    y_ref, s_ref = ref.fused_add_rms_norm(x, residual, w, 1e-6, weight_offset)
    # x + residual rounded once to the storage dtype: bit-exact, as in the unfused model.
    assert torch.equal(new_residual, s_ref)
    assert_close_to_oracle(y, y_ref, _oracle(ref.rms_norm, s_ref, w, 1e-6, weight_offset))


def _check_fp8(q, scale, q_ref, scale_ref, oracle):
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == q.shape[:-1] + (1,)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert not torch.isnan(q.float()).any(), "NaN in fp8 output (unwritten element?)"
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)
    assert (q.float().abs() <= 448).all()
    # Dequantised values: FP8 rounding dominates; same rule as the other outputs, no extra atol.
    assert_close_to_oracle(
        q.float() * scale, q_ref.float() * scale_ref, oracle, atol=0.0, name="fp8"
    )
    # Identical fp32 inputs give identical codes; only a last-ulp difference in r may flip one.
    assert (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean().item() < 0.01


@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_fp8(device, hidden, dtype):
    x, w = _inputs((5,), hidden, dtype, device)
    q, scale = fastlayers.rms_norm_fp8(x, w)
    q_ref, scale_ref = ref.rms_norm_fp8(x, w)
    _check_fp8(q, scale, q_ref, scale_ref, _oracle(ref.rms_norm, x, w))


@pytest.mark.parametrize("hidden", [111, 4096, 5125])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_fp8(device, hidden, dtype):
    x, w = _inputs((2, 3), hidden, dtype, device)
    residual = rand(2, 3, hidden, dtype=dtype, device=device)
    q, scale, s = fastlayers.rms_norm_fp8(x, w, residual=residual)
    q_ref, scale_ref, s_ref = ref.rms_norm_fp8(x, w, residual=residual)
    assert torch.equal(s, s_ref)
    _check_fp8(q, scale, q_ref, scale_ref, _oracle(ref.rms_norm, s_ref, w))


def test_fp8_zero_row_gets_unit_scale(device):
    x, w = _inputs((3,), 769, torch.bfloat16, device)
    x[1] = 0
    q, scale = fastlayers.rms_norm_fp8(x, w)
    assert scale[1].item() == 1.0
    assert (q[1].float() == 0).all()
    assert scale[0].item() != 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_nan_and_inf_rows(device, dtype):
    """A row with a NaN (all its values NaN) or an infinity (r = 0: zeros, NaN where the infinity
    was) gets scale 1 and the reference's codes; the other rows are unaffected."""
    x = rand(5, 64, dtype=dtype, device=device)
    x[1, 5] = float("nan")
    x[3, 7] = float("inf")
    w = rand(64, dtype=dtype, device=device)
    y, scale = fastlayers.rms_norm_fp8(x, w)
    ry, rscale = ref.rms_norm_fp8(x, w)
    bad, good = [1, 3], [0, 2, 4]
    assert scale[1].item() == scale[3].item() == 1.0 == rscale[1].item() == rscale[3].item()
    # the same codes, a NaN's sign aside (inf * 0 is a negative NaN on x86, a positive one on a GPU)
    assert torch.equal(fp8_codes(y[bad]), fp8_codes(ry[bad]))
    assert bool(torch.isnan(y[1].float()).all())  # NaN spreads through the row's rms
    assert bool(torch.isnan(y[3, 7].float())) and bool((y[3, :7].float() == 0).all())  # inf: r = 0
    # finite rows: the kernel's fp32 sum of squares may differ in the last bit (one FP8 step)
    torch.testing.assert_close(scale[good], rscale[good], rtol=1e-5, atol=0)
    torch.testing.assert_close((y[good].float() * scale[good]), (ry[good].float() * rscale[good]),
                               rtol=FP8_STEP_RTOL, atol=1e-3)  # fmt: skip


@pytest.mark.parametrize("hidden", [64, 8199])
@pytest.mark.parametrize("residual", [False, True])
def test_fp8_nan_from_the_weight_gives_unit_scale(device, hidden, residual):
    """A NaN that only the weight brings (a NaN weight, or an infinite weight times a zero input)
    makes the row's max|y| NaN, as torch's amax in the reference: scale 1 and the reference's
    codes. The kernels' max dropped the NaN (a finite scale; found by the differential fuzz)."""
    x = rand(4, hidden, dtype=torch.float32, device=device)
    r = rand(4, hidden, dtype=torch.float32, device=device) if residual else None
    w = rand(hidden, dtype=torch.float32, device=device)
    w[hidden // 2] = float("nan")  # every row
    want = ref.rms_norm_fp8(x, w, 1e-6, r)
    got = fastlayers.rms_norm_fp8(x, w, 1e-6, r)
    assert bool((want[1] == 1.0).all())  # (the premise)
    assert torch.equal(got[1], want[1])
    assert torch.equal(fp8_codes(got[0]), fp8_codes(want[0]))
    w = rand(hidden, dtype=torch.float32, device=device)
    w[3] = float("inf")
    x[1, 3] = 0.0 if r is None else -r[1, 3]  # row 1: 0 x inf; the others: inf, scale inf
    want = ref.rms_norm_fp8(x, w, 1e-6, r)
    got = fastlayers.rms_norm_fp8(x, w, 1e-6, r)
    assert want[1][1].item() == 1.0 and bool(want[1][[0, 2, 3]].isinf().all())  # (the premise)
    assert torch.equal(got[1], want[1])
    assert torch.equal(fp8_codes(got[0]), fp8_codes(want[0]))


def test_fp8_outliers_saturate_to_448(device):
    x, w = _inputs((2,), 4096, torch.float32, device)
    x[0, 17] = 1e4  # one outlier takes the whole row's scale
    q, scale = fastlayers.rms_norm_fp8(x, w)
    assert q[0, 17].float().abs().item() == 448.0
    q_ref, scale_ref = ref.rms_norm_fp8(x, w)
    _check_fp8(q, scale, q_ref, scale_ref, _oracle(ref.rms_norm, x, w))


@pytest.mark.parametrize("hidden", [111, 4096])
def test_cpu_isa_variants_agree(cpu_isa, hidden):
    """Every CPU kernel variant this machine can run (scalar, AVX2, AVX-512) meets the oracle."""
    for dtype in DTYPES:
        x, w = _inputs((9,), hidden, dtype, "cpu")
        r = rand(9, hidden, dtype=dtype, device="cpu")
        for offset in OFFSETS:
            assert_close_to_oracle(
                fastlayers.rms_norm(x, w, 1e-6, offset),
                ref.rms_norm(x, w, 1e-6, offset),
                _oracle(ref.rms_norm, x, w, 1e-6, offset),
            )
        y, s = fastlayers.fused_add_rms_norm(x, r, w)
        assert torch.equal(s, ref.fused_add_rms_norm(x, r, w)[1])
        q, scale = fastlayers.rms_norm_fp8(x, w)
        _check_fp8(q, scale, *ref.rms_norm_fp8(x, w), _oracle(ref.rms_norm, x, w))


@pytest.mark.parametrize("shape", [(0, 769), (2, 0, 64)])
def test_empty_batch_is_a_noop(device, shape):
    x, w = _inputs(shape[:-1], shape[-1], torch.bfloat16, device)
    assert fastlayers.rms_norm(x, w).shape == shape
    y, s = fastlayers.fused_add_rms_norm(x, x.clone(), w)
    assert y.shape == shape and s.shape == shape
    q, scale = fastlayers.rms_norm_fp8(x, w)
    assert q.shape == shape and scale.shape == shape[:-1] + (1,)


def test_large_values_do_not_overflow_in_16bit(device):
    # sum(x^2) of fp16 values near 6e4 overflows fp16 but not the fp32 accumulator.
    x = (torch.randn(4, 4096, device=device) * 2e4).clamp(-6e4, 6e4).to(torch.float16)
    assert torch.isfinite(x).all() and (x.float().pow(2).sum(-1) > 65504).all()
    w = rand(4096, dtype=torch.float16, device=device)
    y = fastlayers.rms_norm(x, w)
    assert torch.isfinite(y.float()).all()
    assert_close_to_oracle(y, ref.rms_norm(x, w), _oracle(ref.rms_norm, x, w))


def _fp8_probe_values():
    """Every e4m3 value, the midpoints between neighbours and one fp32 ulp either side of them,
    tiny values and random ones, all within +-448 (the row maximum must be 448 for scale 1)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[torch.isfinite(codes)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    ulp = lambda t, d: torch.nextafter(t, torch.full_like(t, d))  # noqa: E731
    vals = torch.cat(
        [
            grid,
            mids,
            ulp(mids, 1e9),
            ulp(mids, -1e9),
            torch.tensor([-448.0, 1e-12, -0.0, 2.0**-10, 2.0**-9 * 1.5]),
            (torch.randn(4000) * torch.logspace(-4, 2.5, 4000)).clamp(-448, 448),
        ]
    )
    return vals


def test_fp8_conversion_matches_torch(cpu_isa):
    """With x = 1, eps = 0 and a 448 in the weight, r = 1 and scale = 1, so y = fp8(clamp(w)):
    every rounding case of the kernels' fp32 -> e4m3 conversion is compared with torch's."""
    vals = _fp8_probe_values()
    w = torch.cat([torch.tensor([448.0]), vals]).float()
    x = torch.ones(1, w.numel())
    q, scale = fastlayers.rms_norm_fp8(x, w, eps=0.0)
    assert scale.item() == 1.0
    expected = w.clamp(-448, 448).to(torch.float8_e4m3fn)
    mismatch = (q.view(torch.uint8) != expected.view(torch.uint8)).nonzero().flatten()
    assert mismatch.numel() == 0, (
        f"{mismatch.numel()} codes differ, e.g. w={w[mismatch[:5]].tolist()}"
    )


# ----------------------------------------------------------------------------------------------
# Writing into the caller's buffers: rms_norm(out=...) and the in-place fused_add_rms_norm_
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden", [8, 769, 4096, 5125])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_offset", OFFSETS)
def test_rms_norm_out(device, hidden, dtype, weight_offset):
    x, w = _inputs((2, 3), hidden, dtype, device)
    out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    y = fastlayers.rms_norm(x, w, 1e-6, weight_offset, out=out)
    assert y is out
    # the same kernel as the allocating form, so the same bits
    assert torch.equal(out, fastlayers.rms_norm(x, w, 1e-6, weight_offset))
    assert_close_to_oracle(
        out,
        ref.rms_norm(x, w, 1e-6, weight_offset),
        _oracle(ref.rms_norm, x, w, 1e-6, weight_offset),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_out_in_place_and_strided_input(device, dtype):
    x, w = _inputs((5,), 769, dtype, device)
    expected = fastlayers.rms_norm(x, w)
    x_inplace = x.clone()
    assert fastlayers.rms_norm(x_inplace, w, out=x_inplace) is x_inplace
    assert torch.equal(x_inplace, expected)
    wide = rand(5, 2 * 769, dtype=dtype, device=device)
    strided = wide[:, ::2]  # a strided input still writes a contiguous out
    out = torch.full((5, 769), float("nan"), dtype=dtype, device=device)
    fastlayers.rms_norm(strided, w, out=out)
    assert torch.equal(out, fastlayers.rms_norm(strided.contiguous(), w))


@pytest.mark.parametrize("hidden", [111, 4096, 5125])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_offset", OFFSETS)
def test_fused_add_rms_norm_in_place(device, hidden, dtype, weight_offset):
    x, w = _inputs((7,), hidden, dtype, device)
    r = rand(7, hidden, dtype=dtype, device=device)
    y_alloc, res_alloc = fastlayers.fused_add_rms_norm(x, r, w, 1e-6, weight_offset)
    xi, ri = x.clone(), r.clone()
    out = fastlayers.fused_add_rms_norm_(xi, ri, w, 1e-6, weight_offset)
    assert out[0] is xi and out[1] is ri
    assert torch.equal(ri, res_alloc) and torch.equal(xi, y_alloc)
    y_ref, res_ref = ref.fused_add_rms_norm(x, r, w, 1e-6, weight_offset)
    assert torch.equal(ri, res_ref)  # one rounding of an exact sum: identical
    assert_close_to_oracle(xi, y_ref, _oracle(ref.rms_norm, res_ref, w, 1e-6, weight_offset))


def test_out_variants_reject_bad_buffers(device):
    x, w = _inputs((4,), 64, torch.float32, device)
    with pytest.raises(ValueError, match="out must have x's shape"):
        fastlayers.rms_norm(x, w, out=torch.empty(4, 63, device=device))
    with pytest.raises(TypeError, match="out must have x's dtype"):
        fastlayers.rms_norm(x, w, out=torch.empty(4, 64, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="out must be contiguous"):
        fastlayers.rms_norm(x, w, out=torch.empty(64, 4, device=device).t())
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        fastlayers.rms_norm(x, w, out=[0.0])
    buf = rand(5, 64, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="out shares memory with x"):
        fastlayers.rms_norm(buf[:4], w, out=buf[1:])
    with pytest.raises(ValueError, match="out shares memory with weight"):
        fastlayers.rms_norm(x[:1], w, out=w.view(1, 64))
    with pytest.raises(ValueError, match="x shares memory with residual"):
        fastlayers.fused_add_rms_norm_(buf[:4], buf[1:], w)
    with pytest.raises(ValueError, match="residual must be contiguous"):
        fastlayers.fused_add_rms_norm_(
            x, rand(4, 128, dtype=torch.float32, device=device)[:, ::2], w
        )
    with pytest.raises(ValueError, match="does not support autograd"):
        fastlayers.rms_norm(x.clone().requires_grad_(), w, out=torch.empty_like(x))
    with pytest.raises(ValueError, match="does not support autograd"):
        fastlayers.fused_add_rms_norm_(x.clone(), x.clone(), w.clone().requires_grad_())
    with torch.no_grad():  # the same call without grad is fine
        fastlayers.rms_norm(x.clone().requires_grad_(), w, out=torch.empty_like(x))


def test_out_variants_compile_without_graph_breaks(device):
    x, w = _inputs((3,), 769, torch.float32, device)
    r = rand(3, 769, dtype=torch.float32, device=device)

    def step(x, r, w, out):
        fastlayers.rms_norm(x, w, out=out)
        fastlayers.fused_add_rms_norm_(x, r, w)
        return out + x

    xs, rs, out = x.clone(), r.clone(), torch.empty_like(x)
    got = torch.compile(step, fullgraph=True)(xs, rs, w, out)
    y, new_r = fastlayers.fused_add_rms_norm(x, r, w)
    assert torch.equal(out, fastlayers.rms_norm(x, w))
    assert torch.equal(xs, y) and torch.equal(rs, new_r)
    assert torch.equal(got, out + y)


def test_bf16_rounding_fast_path_matches_nan_path():
    """The CPU kernel's NaN-free bf16 roundings are used for rows with a finite sum of squares and a
    finite weight; a NaN in another row or in the weight switches to the checked roundings. Both
    must give the reference's bits (round to nearest even). With a bf16 weight the product of two
    bf16 numbers is exact in fp32 and lands half-way between two bf16 numbers about once in 256
    elements, so the ties are exercised too."""
    torch.manual_seed(3)
    n = 4096
    x = (torch.randn(6, n) * 3).to(torch.bfloat16)
    w = torch.randn(n).to(torch.bfloat16)
    prod = ref.rms_norm(x, torch.ones_like(w)).float() * w.float()  # the fp32 values rounded last
    assert ((prod.view(torch.int32) & 0xFFFF) == 0x8000).sum() > 20  # ties are present
    expected = ref.rms_norm(x, w)
    x_nan = x.clone()
    x_nan[4, 7] = float("nan")
    got = fastlayers.rms_norm(x_nan, w)
    assert torch.equal(got[:4], expected[:4]) and torch.equal(got[5:], expected[5:])
    assert torch.isnan(got[4]).all()
    assert torch.equal(fastlayers.rms_norm(x, w), expected)
    w_inf = w.clone()
    w_inf[9] = float("inf")
    torch.testing.assert_close(
        fastlayers.rms_norm(x, w_inf), ref.rms_norm(x, w_inf), rtol=0, atol=0, equal_nan=True
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_offset", OFFSETS)
def test_large_outputs_streamed(dtype, weight_offset):
    """CPU outputs of 16 MiB and more with 64-byte aligned rows are written with non-temporal
    stores into a caller's buffer (out=, in place) and with plain stores when just allocated:
    the same values, the reference's, and with a NaN row."""
    rows = (16 << 20) // (4096 * torch.tensor([], dtype=dtype).element_size())
    x, w = _inputs((rows,), 4096, dtype, "cpu")
    x[5, 9] = float("nan")
    expected = ref.rms_norm(x, w, 1e-6, weight_offset)
    y = fastlayers.rms_norm(x, w, 1e-6, weight_offset)
    finite = torch.ones(rows, dtype=torch.bool)
    finite[5] = False
    assert torch.isnan(y[5]).all()
    assert_close_to_oracle(
        y[finite],
        expected[finite],
        _oracle(ref.rms_norm, x[finite], w, 1e-6, weight_offset),
    )
    out = torch.full_like(x, float("nan"))
    fastlayers.rms_norm(x, w, 1e-6, weight_offset, out=out)
    assert torch.equal(out[finite], y[finite])
    fastlayers.rms_norm(x, w, 1e-6, weight_offset, out=x)  # in place
    assert torch.equal(x[finite], y[finite])


def test_round_once_is_torch_nn_rmsnorm_rounding(cpu_isa):
    """round_once: the weight multiplied in fp32 and one rounding at the end (torch.nn.RMSNorm's
    form), by each CPU kernel variant and each entry point (allocating, out=, fused add, in place,
    the op through the dispatcher): the reference's values but for summation-order ties, not the
    Llama form's (which differ from them on ~1/4 of the 16-bit outputs)."""
    for dtype in (torch.float16, torch.bfloat16):
        x, w = _inputs((33,), 769, dtype, "cpu")
        r = rand(33, 769, dtype=dtype, device="cpu")
        want = ref.rms_norm(x, w, 1e-6, 0.0, True)
        want_add, s = ref.fused_add_rms_norm(x, r, w, 1e-6, 0.0, True)
        assert (want != ref.rms_norm(x, w, 1e-6, 0.0)).float().mean().item() > 0.1
        xi, ri = x.clone(), r.clone()
        fastlayers.fused_add_rms_norm_(xi, ri, w, round_once=True)
        got = {
            "rms_norm": (fastlayers.rms_norm(x, w, round_once=True), want),
            "out=": (fastlayers.rms_norm(x, w, round_once=True, out=torch.empty_like(x)), want),
            "op": (torch.ops.fastlayers.rms_norm(x, w, 1e-6, 0.0, True), want),
            "fused add": (fastlayers.fused_add_rms_norm(x, r, w, round_once=True)[0], want_add),
            "in place": (xi, want_add),
        }
        assert torch.equal(ri, s)
        for name, (y, expected) in got.items():
            assert (y != expected).float().mean().item() < 0.01, (dtype, name)
