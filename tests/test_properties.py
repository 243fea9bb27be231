# SPDX-License-Identifier: Apache-2.0
"""Property tests: the CPU kernels (and, in a CUDA emulation build, the CUDA kernels) against their
references on shapes, layouts and dtypes that hypothesis draws, beyond the hand-picked lists of the
family tests.

Each example draws sizes (odd and aligned, tails of every vector width, empty batches), a layout
for the activations (contiguous, rows further apart than they are wide, a column stride of 2, a
transposed view), a dtype and a seed for fresh random values; the checks are the family tests'
(float64 oracle, the reference's own error as the yardstick). ``derandomize=True``: the same
examples every run, so a failure reproduces and CI stays deterministic. For a longer search, new
random examples each run: ``FASTLAYERS_PROPERTY_EXAMPLES=6000`` (with ``FASTLAYERS_CPU_ISA`` per
kernel variant); a failure there prints its example, which then belongs in an ``@example``.
"""

import pytest
import torch
from conftest import property_settings
from hypothesis import example, given
from hypothesis import strategies as st
from test_fff import _agreeing_tokens, _hard_oracle, _hard_params
from test_kv_paged import _check_counted_rows, _check_rows, _paged
from test_peer import _check_selection, _expert_scores64
from test_quant_attention import _tables as _rope_tables
from test_rmsnorm import _check_fp8

import fastlayers
from _tolerances import (
    ATOL,
    FP8_STEP_RTOL,
    assert_close_to_oracle,
    fp8_codes,
    int4_fp8_oracle,
    rand,
)
from fastlayers import quant
from fastlayers import reference as ref
from fastlayers.ops import fff_hard, peer_experts, ultrafast_ff
from fastlayers.ops.kvint4 import (
    _attention_reference,
    _kv_quantize_reference,
    _q_quantize_reference,
    int4_kv_attention,
    int4_kv_decode,
    kv_quantize,
    q_quantize,
)
from fastlayers.ops.kvint4 import _reference as kv_reference
from fastlayers.ops.kvint4_paged import int4_kv_attention_paged_varlen, int4_kv_decode_paged
from fastlayers.reference import skip as skip_ref

pytestmark = [
    pytest.mark.skipif(
        not fastlayers.info()["extension_loaded"],
        reason="property tests exercise the compiled CPU kernels",
    ),
    pytest.mark.usefixtures("kernels"),  # (conftest: the CPU kernels, and emulated CUDA ones)
]

# 150 derandomized examples per test in CI; FASTLAYERS_PROPERTY_EXAMPLES=N: N new random ones
PROPERTY = property_settings(150)


DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
LAYOUTS = st.sampled_from(["contiguous", "padded rows", "column stride 2", "transposed"])
SEEDS = st.integers(0, 2**31 - 1)


def _activation(rows: int, cols: int, dtype, layout: str, scale=1.0) -> torch.Tensor:
    """A fresh random ``[rows, cols]`` CPU tensor in ``layout`` (same values for every layout)."""
    x = rand(rows, cols, dtype=dtype, device="cpu", scale=scale)
    if layout == "padded rows":
        buf = torch.full((rows, cols + 7), float("nan"), dtype=dtype)
        buf[:, :cols] = x
        return buf[:, :cols]
    if layout == "column stride 2":
        buf = torch.full((rows, 2 * cols), float("nan"), dtype=dtype)
        buf[:, ::2] = x
        return buf[:, ::2]
    if layout == "transposed":
        return x.t().contiguous().t()
    return x


def _d(t):
    return None if t is None else t.double()


def _assert_grads_close(names, grads, same, oracle, dtype, factor=2.0):
    """Each gradient in ``dtype`` against its float64 ``oracle``, the reference's error (``same``,
    cast to ``dtype``) the yardstick. Gradients are sums over tokens, pairs or channels of O(1)
    products: the floor scales with their magnitude (a dgates of ~37 from a 73-term sum: a few
    fp32 ulps is ~2e-5)."""
    for name, got, r, want in zip(names, grads, same, oracle, strict=True):
        assert got.dtype == dtype and got.shape == want.shape, name
        biggest = want.abs().max().item() if want.numel() else 0.0
        atol = ATOL[dtype] * max(1.0, biggest)
        assert_close_to_oracle(got, r.to(dtype), want, factor=factor, atol=atol, name=name)


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------
@PROPERTY
@given(
    rows=st.integers(0, 9),
    hidden=st.integers(1, 1100),
    dtype=DTYPES,
    layout=LAYOUTS,
    offset=st.sampled_from([0.0, 1.0]),
    eps=st.sampled_from([1e-6, 1e-5, 0.1]),
    seed=SEEDS,
)
def test_rms_norm_family(rows, hidden, dtype, layout, offset, eps, seed):
    torch.manual_seed(seed)
    x = _activation(rows, hidden, dtype, layout, scale=2.0)
    w = rand(hidden, dtype=dtype, device="cpu")
    y = fastlayers.rms_norm(x, w, eps, offset)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close_to_oracle(
        y, ref.rms_norm(x, w, eps, offset), ref.rms_norm(x.double(), w.double(), eps, offset)
    )
    residual = _activation(rows, hidden, dtype, "contiguous")
    y, s = fastlayers.fused_add_rms_norm(x, residual, w, eps, offset)
    y_ref, s_ref = ref.fused_add_rms_norm(x, residual, w, eps, offset)
    assert torch.equal(s, s_ref)
    assert_close_to_oracle(y, y_ref, ref.rms_norm(s_ref.double(), w.double(), eps, offset))
    if rows:
        q, scale = fastlayers.rms_norm_fp8(x, w, eps)
        q_ref, scale_ref = ref.rms_norm_fp8(x, w, eps)
        _check_fp8(q, scale, q_ref, scale_ref, ref.rms_norm(x.double(), w.double(), eps))
        # with the residual add: the sum rounded to the storage dtype, then its FP8 norm
        q, scale, s = fastlayers.rms_norm_fp8(x, w, eps, residual=residual)
        q_ref, scale_ref, s_ref = ref.rms_norm_fp8(x, w, eps, residual=residual)
        assert s.dtype == dtype and torch.equal(s, s_ref)
        _check_fp8(q, scale, q_ref, scale_ref, ref.rms_norm(s_ref.double(), w.double(), eps))


@PROPERTY
@given(
    rows=st.integers(1, 7),
    hidden=st.integers(1, 700),
    dtype=DTYPES,
    layout=LAYOUTS,
    offset=st.sampled_from([0.0, 1.0]),
    seed=SEEDS,
)
# (found by a longer randomized run: hidden size 1, x^2 = 200 eps, the two terms of dx 460 each)
@example(rows=6, hidden=1, dtype=torch.float32, layout="contiguous", offset=1.0, seed=577029)
def test_rms_norm_backward(rows, hidden, dtype, layout, offset, seed):
    torch.manual_seed(seed)
    x = _activation(rows, hidden, dtype, layout, scale=2.0).requires_grad_()
    w = rand(hidden, dtype=dtype, device="cpu").requires_grad_()
    dy = rand(rows, hidden, dtype=dtype, device="cpu")
    fastlayers.rms_norm(x, w, 1e-6, offset).backward(dy)
    dx_ref, dw_ref = ref.rms_norm_backward(dy, x.detach(), w.detach(), 1e-6, offset)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    ref.rms_norm(x64, w64, 1e-6, offset).backward(dy.double())
    # dx: the oracle rule, each element also allowed four fp32 ulps of its larger term
    slack = _cancellation(x64.detach(), w64.detach(), dy.double(), 1e-6, offset)
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    err = (x.grad.double() - x64.grad).abs()
    ref_err = (dx_ref.double() - x64.grad).abs().max() if err.numel() else 0.0
    bad = err > 2.0 * ref_err + ATOL[dtype] + slack
    assert not bad.any(), f"dx: error {err[bad].max():.3e} vs float64 above the oracle rule"
    assert_close_to_oracle(w.grad, dw_ref, w64.grad, name="dw")


def _cancellation(x, w, dy, eps: float, offset: float) -> torch.Tensor:
    """Per element, four fp32 ulps of the larger term of ``dx = r g - coef x`` (``g = dy (offset +
    w)``, ``coef = r^3 mean(g x)``): where the two nearly cancel (``g`` along ``x``, as in every
    row of hidden size 1: ``dx = r g eps / (x^2 + eps)``) an fp32 computation's error scales with
    them, not with ``dx``, and the reference's own error can be below it by luck (the kernels
    contract to FMAs where it rounds twice)."""
    r = (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    g = dy * (offset + w)
    coef = r.pow(3) * (g * x).mean(-1, keepdim=True)
    return 4 * 2.0**-24 * torch.maximum((r * g).abs(), (coef * x).abs())


@PROPERTY
@given(
    rows=st.integers(0, 9),
    hidden=st.integers(1, 1100),
    dtype=DTYPES,
    offset=st.sampled_from([0.0, 1.0]),
    seed=SEEDS,
)
def test_rms_norm_out_and_in_place(rows, hidden, dtype, offset, seed):
    """``out=`` and the in-place fused add write what the allocating calls return, bit for bit."""
    torch.manual_seed(seed)
    x = rand(rows, hidden, dtype=dtype, device="cpu", scale=2.0)
    residual = rand(rows, hidden, dtype=dtype, device="cpu")
    w = rand(hidden, dtype=dtype, device="cpu")
    out = torch.full_like(x, float("nan"))
    assert fastlayers.rms_norm(x, w, 1e-6, offset, out=out) is out
    assert torch.equal(out, fastlayers.rms_norm(x, w, 1e-6, offset))
    y, s = fastlayers.fused_add_rms_norm(x, residual, w, 1e-6, offset)
    xi, ri = x.clone(), residual.clone()
    fastlayers.fused_add_rms_norm_(xi, ri, w, 1e-6, offset)
    assert torch.equal(xi, y) and torch.equal(ri, s)


# ----------------------------------------------------------------------------------------------
# FFF (UltraFastFeedForward form)
# ----------------------------------------------------------------------------------------------
@PROPERTY
@given(
    tokens=st.integers(0, 150),  # the bucketed descent starts at 64 tokens
    depth=st.integers(0, 9),
    d_in=st.integers(1, 130),
    d_out=st.integers(1, 70),
    dtype=DTYPES,
    layout=LAYOUTS,
    bias=st.booleans(),
    activation=st.sampled_from(["gelu", "relu", "silu"]),
    seed=SEEDS,
)
# A near-tie one level above the first differing node (a logit of 1.3e-8 in fp32, -3.5e-8 in
# float64): the check must look at the logit that chose the branch, the parent's.
@example(
    tokens=29, depth=9, d_in=11, d_out=10, dtype=torch.float32, layout="contiguous", bias=False,
    activation="gelu", seed=10,
)  # fmt: skip
def test_ultrafast_ff(tokens, depth, d_in, d_out, dtype, layout, bias, activation, seed):
    torch.manual_seed(seed)
    nodes = 2 ** (depth + 1) - 1
    w_in = rand(nodes, d_in, dtype=dtype, device="cpu", scale=d_in**-0.5)
    w_out = rand(nodes, d_out, dtype=dtype, device="cpu", scale=0.5)
    b_in = rand(nodes, dtype=dtype, device="cpu", scale=0.1) if bias else None
    x = _activation(tokens, d_in, dtype, layout)
    y, path, pre = ultrafast_ff(x, w_in, w_out, b_in, activation)
    assert y.shape == (tokens, d_out) and path.shape == (tokens, depth + 1)
    y_ref = ref.ultrafast_ff(x, w_in, w_out, b_in, activation)[0]
    y64, path64, pre64 = ref.ultrafast_ff(_d(x), _d(w_in), _d(w_out), _d(b_in), activation)
    ok = _agreeing_tokens(path, path64, pre64, x, w_in)
    assert_close_to_oracle(y[ok], y_ref[ok], y64[ok], name="y")


@PROPERTY
@given(
    tokens=st.integers(0, 150),
    depth=st.integers(0, 9),
    d_in=st.integers(1, 130),
    d_out=st.integers(1, 70),
    dtype=DTYPES,
    layout=LAYOUTS,
    bias=st.booleans(),
    activation=st.sampled_from(["gelu", "gelu_tanh", "relu", "silu"]),
    seed=SEEDS,
)
def test_ultrafast_ff_backward(tokens, depth, d_in, d_out, dtype, layout, bias, activation, seed):
    """The backward along the kernel's hard path: dx, dw_in, dw_out, db_in against float64
    autograd of the reference. A token whose path differs from the oracle's (a near-tie, which
    _agreeing_tokens allows) gets dy = 0, so it adds nothing to any gradient."""
    torch.manual_seed(seed)
    nodes = 2 ** (depth + 1) - 1
    params = [
        _activation(tokens, d_in, dtype, layout),
        rand(nodes, d_in, dtype=dtype, device="cpu", scale=d_in**-0.5),
        rand(nodes, d_out, dtype=dtype, device="cpu", scale=0.5),
    ]
    if bias:
        params.append(rand(nodes, dtype=dtype, device="cpu", scale=0.1))
    leaves = [t.detach().requires_grad_() for t in params]
    y, path, _ = ultrafast_ff(*leaves[:3], leaves[3] if bias else None, activation)
    l64 = [t.detach().double().requires_grad_() for t in params]
    y64, path64, pre64 = ref.ultrafast_ff(*l64[:3], l64[3] if bias else None, activation)
    l32 = [t.detach().float().requires_grad_() for t in params]
    y32, path32, _ = ref.ultrafast_ff(*l32[:3], l32[3] if bias else None, activation)
    ok = _agreeing_tokens(path, path64, pre64.detach(), params[0], params[1])
    ok &= (path32 == path64).all(-1)  # (the fp32 yardstick on the same path too)
    dy = rand(tokens, d_out, dtype=dtype, device="cpu") * ok[:, None]
    grads = torch.autograd.grad(y, leaves, dy)
    g64 = torch.autograd.grad(y64, l64, dy.double())
    g32 = torch.autograd.grad(y32, l32, dy.float())
    names = ("dx", "dw_in", "dw_out", "db_in")[: len(grads)]
    _assert_grads_close(names, grads, g32, g64, dtype, factor=3.0)


@PROPERTY
@given(
    tokens=st.integers(0, 120),
    depth=st.integers(0, 6),
    d_in=st.integers(1, 90),
    width=st.integers(1, 40),  # wide leaves with many tokens take the per-leaf GEMMs
    d_out=st.integers(1, 50),
    dtype=DTYPES,
    layout=LAYOUTS,
    seed=SEEDS,
)
def test_fff_hard(tokens, depth, d_in, width, d_out, dtype, layout, seed):
    torch.manual_seed(seed)
    params = _hard_params(depth, d_in, width, d_out, dtype, "cpu")
    x = _activation(tokens, d_in, dtype, layout)
    y, leaf = fff_hard(x, *params)
    assert y.shape == (tokens, d_out) and leaf.shape == (tokens,)
    y_ref = ref.fff_hard(x, *params)[0]
    y64, leaf64, min_logit = _hard_oracle(x, params)
    differs = leaf != leaf64
    assert (min_logit[differs] < 1e-3).all(), "a leaf differs away from a near-tie"
    assert_close_to_oracle(y[~differs], y_ref[~differs], y64[~differs], name="y")


@PROPERTY
@given(
    tokens=st.integers(0, 120),
    depth=st.integers(0, 6),
    d_in=st.integers(1, 90),
    width=st.integers(1, 40),
    d_out=st.integers(1, 50),
    dtype=DTYPES,
    layout=LAYOUTS,
    chunk=st.sampled_from([None, 1, 700]),  # elements a recomputed chunk holds (1: a token each)
    seed=SEEDS,
)
def test_fff_hard_backward(tokens, depth, d_in, width, d_out, dtype, layout, chunk, seed):
    """dx and the leaf weights' gradients along the kernel's leaves (the routing nodes get none)
    against float64 autograd of the reference; a token routed to another leaf at a near-tie gets
    dy = 0. With the backward's recomputation in chunks of every size."""
    from unittest import mock

    from fastlayers.ops import fff as fff_ops

    torch.manual_seed(seed)
    params = _hard_params(depth, d_in, width, d_out, dtype, "cpu")
    x = _activation(tokens, d_in, dtype, layout)
    leaves = [t.detach().requires_grad_() for t in (x, *params)]
    size = fff_ops._HARD_BACKWARD_CHUNK_ELEMENTS if chunk is None else chunk
    with mock.patch.object(fff_ops, "_HARD_BACKWARD_CHUNK_ELEMENTS", size):
        y, leaf = fff_hard(*leaves)
        _, leaf64, min_logit = _hard_oracle(x, params)
        differs = leaf != leaf64
        assert (min_logit[differs] < 1e-3).all(), "a leaf differs away from a near-tie"
        dy = rand(tokens, d_out, dtype=dtype, device="cpu") * (~differs)[:, None]
        grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    assert grads[1] is None and grads[2] is None  # (node_w, node_b: a hard decision)

    def reference_grads(dt):
        ls = [t.detach().to(dt).requires_grad_() for t in (x, *params)]
        return torch.autograd.grad(ref.fff_hard(*ls)[0], [ls[0], *ls[3:]], dy.to(dt))

    g64, g32 = reference_grads(torch.float64), reference_grads(torch.float32)
    names = ("dx", "dw1", "db1", "dw2", "db2")
    _assert_grads_close(names, [grads[0], *grads[3:]], g32, g64, dtype, factor=3.0)


# ----------------------------------------------------------------------------------------------
# PEER experts
# ----------------------------------------------------------------------------------------------
@PROPERTY
@given(
    tokens=st.integers(0, 40),
    dim=st.integers(1, 100),
    pairs=st.integers(1, 40),
    n=st.integers(1, 300),
    dtype=DTYPES,
    layout=LAYOUTS,
    seed=SEEDS,
)
# (found by a longer randomized run: one expert, 40 picks per token)
@example(tokens=5, dim=5, pairs=40, n=1, dtype=torch.float32, layout="contiguous", seed=1551)
def test_peer_experts_forward_and_backward(tokens, dim, pairs, n, dtype, layout, seed):
    torch.manual_seed(seed)
    down = rand(n, dim, dtype=dtype, device="cpu", scale=dim**-0.5)
    up = rand(n, dim, dtype=dtype, device="cpu", scale=0.5)
    idx = torch.randint(0, n, (tokens, pairs))
    gates = torch.rand(tokens, pairs).to(dtype)
    x = _activation(tokens, dim, dtype, layout)
    leaves = [t.detach().requires_grad_() for t in (x, gates, down, up)]
    y, _ = peer_experts(leaves[0], idx, *leaves[1:])
    y_ref = ref.peer_experts(x, idx, gates, down, up)[0]
    l64 = [t.detach().double().requires_grad_() for t in (x, gates, down, up)]
    y64 = ref.peer_experts(l64[0], idx, *l64[1:])[0]
    # y is a sum over the picks too: its floor scales with its magnitude, as the gradients' below
    # (one expert picked 40 times: |y| of 52, 3.6 ulps from float64 is 1.4e-5)
    atol = ATOL[dtype] * max(1.0, y64.abs().max().item() if y64.numel() else 0.0)
    assert_close_to_oracle(y, y_ref, y64, atol=atol, name="y")
    if tokens == 0:
        return
    dy = rand(tokens, dim, dtype=dtype, device="cpu")
    grads = torch.autograd.grad(y, leaves, dy)
    g64 = torch.autograd.grad(y64, l64, dy.double())
    l_ref = [t.detach().requires_grad_() for t in (x, gates, down, up)]
    g_ref = torch.autograd.grad(ref.peer_experts(l_ref[0], idx, *l_ref[1:])[0], l_ref, dy)
    _assert_grads_close(("dx", "dgates", "ddown", "dup"), grads, g_ref, g64, dtype)


@PROPERTY
@given(
    tokens=st.integers(1, 20),
    heads=st.integers(1, 4),
    half_key=st.integers(1, 20),
    n_keys=st.integers(1, 70),
    topk=st.integers(1, 40),
    dtype=DTYPES,
    score=st.sampled_from(["softmax", "relu"]),
    seed=SEEDS,
)
@example(
    tokens=6,
    heads=2,
    half_key=1,
    n_keys=59,
    topk=2,
    dtype=torch.float16,
    score="softmax",
    seed=1254,
)  # (fp16 gates: the backward's yardstick must read them as stored)
def test_peer_retrieve(tokens, heads, half_key, n_keys, topk, dtype, score, seed):
    """A valid top-k of the product-key scores (distinct experts, scores equal to the brute-force
    best up to rounding) and gates that are the softmax/relu of those experts' exact scores."""
    topk = min(topk, n_keys * n_keys)
    torch.manual_seed(seed)
    queries = rand(tokens, heads, 2 * half_key, dtype=dtype, device="cpu")
    keys = rand(heads, 2, n_keys, half_key, dtype=dtype, device="cpu")
    indices, gates = fastlayers.peer_retrieve(queries, keys, topk, score)
    assert indices.shape == gates.shape == (tokens, heads, topk) and gates.dtype == dtype
    _check_selection(queries, keys, indices, topk, atol=2 * half_key * 4.0 * 1e-6)
    s64 = _expert_scores64(queries, keys, indices)
    g64 = torch.softmax(s64, -1) if score == "softmax" else torch.relu(s64)
    assert_close_to_oracle(gates, g64.to(dtype), g64, name="gates")
    # the backward through the gates (the selection held fixed): d/d(queries, keys) of
    # sum(gates * dy), against float64 autograd of the chosen experts' exact scores; the
    # yardstick is the reference backward's error (it reads the gates stored in the dtype)
    leaves = [t.detach().requires_grad_() for t in (queries, keys)]
    indices, gates = fastlayers.peer_retrieve(*leaves, topk, score)
    dy = rand(*gates.shape, dtype=dtype, device="cpu")
    grads = torch.autograd.grad(gates, leaves, dy)
    same = ref.peer_retrieve_backward(dy, queries, keys, indices, gates.detach(), score)
    l64 = [t.detach().double().requires_grad_() for t in (queries, keys)]
    s64 = _expert_scores64(*l64, indices)
    g64 = torch.softmax(s64, -1) if score == "softmax" else torch.relu(s64)
    want = torch.autograd.grad(g64, l64, dy.double())
    _assert_grads_close(("dqueries", "dkeys"), grads, same, want, dtype)


# ----------------------------------------------------------------------------------------------
# INT4 x FP8 GEMM
# ----------------------------------------------------------------------------------------------
@PROPERTY
@given(
    m=st.integers(0, 70),  # per-channel tiles below 8-28 rows (by ISA), decoded panels from there
    n=st.sampled_from([1, 7, 16, 32, 33, 48, 64]),  # panels need a multiple of 16 (AVX2) / 32
    half_k=st.integers(1, 300),
    # group sizes of 16 k multiples (AVX2) or 32 (AVX-512) take the panels' vector decode
    half_group=st.one_of(st.integers(1, 160), st.sampled_from([8, 16, 24, 32, 64])),
    out_dtype=DTYPES,
    x_dtype=DTYPES,
    layout=LAYOUTS,
    bias=st.booleans(),
    seed=SEEDS,
)
def test_int4_fp8_gemm(m, n, half_k, half_group, out_dtype, x_dtype, layout, bias, seed):
    torch.manual_seed(seed)
    k, group_size = 2 * half_k, 2 * half_group
    w = rand(n, k, dtype=torch.float32, device="cpu", scale=0.05)
    qw = fastlayers.quantize_int4(w, group_size)
    x = _activation(m, k, x_dtype, layout)
    xq, xs = fastlayers.quantize_fp8_per_token(x)
    xq_ref, xs_ref = ref.quantize_fp8_per_token(x)
    assert torch.equal(xq.view(torch.uint8), xq_ref.view(torch.uint8))
    assert torch.equal(xs, xs_ref)
    b = rand(n, dtype=out_dtype, device="cpu") if bias else None
    y = fastlayers.int4_fp8_gemm(xq, xs, qw, b, out_dtype)
    assert y.shape == (m, n) and y.dtype == out_dtype
    want = ref.int4_fp8_gemm(
        xq, xs, qw.qweight, qw.group_scale, qw.channel_scale, group_size, b, out_dtype
    )
    assert_close_to_oracle(y, want, int4_fp8_oracle(xq, xs, qw, b))


# ----------------------------------------------------------------------------------------------
# Position-causal varlen attention
# ----------------------------------------------------------------------------------------------
@PROPERTY
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    d=st.sampled_from([1, 8, 20, 64, 72, 128]),
    dtype=DTYPES,
    causal=st.booleans(),
    window=st.sampled_from([None, 3, (2, 5), (0, 0)]),
    backward=st.booleans(),
    seed=SEEDS,
)
def test_varlen_attention(lengths, kv_heads, group, d, dtype, causal, window, backward, seed):
    """Sequences of routed tokens (sorted random positions, some empty), GQA, windows; forward and,
    in fp32, the backward through autograd."""
    torch.manual_seed(seed)
    pos = torch.cat([torch.randperm(64)[:t].sort().values for t in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    q = rand(total, kv_heads * group, d, dtype=dtype, device="cpu")
    k = rand(total, kv_heads, d, dtype=dtype, device="cpu")
    v = rand(total, kv_heads, d, dtype=dtype, device="cpu")
    kw = {"causal": causal, "window": window}
    out, lse = fastlayers.varlen_attention(q, k, v, cu, cu, pos, pos, return_lse=True, **kw)
    same = skip_ref.varlen_attention(q, k, v, cu, cu, pos, pos, **kw)
    o64, lse64 = skip_ref.varlen_attention(
        q.double(), k.double(), v.double(), cu, cu, pos, pos, return_lse=True, **kw
    )
    assert_close_to_oracle(out, same, o64, name="out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64))
    finite = torch.isfinite(lse64)
    torch.testing.assert_close(lse[finite].double(), lse64[finite].double(), rtol=1e-4, atol=1e-4)
    if backward and dtype == torch.float32 and total:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        dy = rand(*out.shape, dtype=dtype, device="cpu")
        fastlayers.varlen_attention(*leaves, cu, cu, pos, pos, **kw).backward(dy)
        l64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        skip_ref.varlen_attention(*l64, cu, cu, pos, pos, **kw).backward(dy.double())
        for got, want in zip(leaves, l64, strict=True):
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)


@PROPERTY
@given(
    rows=st.integers(1, 60),
    dim=st.integers(1, 300),
    picked=st.integers(0, 60),
    dtype=DTYPES,
    gated=st.booleans(),
    int32=st.booleans(),
    seed=SEEDS,
)
def test_gather_and_gated_scatter(rows, dim, picked, dtype, gated, int32, seed):
    """gather_rows and scatter_add_gated (unique rows, some -1 padding) against the reference,
    bit for bit forward; the fused backward against autograd of the reference."""
    torch.manual_seed(seed)
    picked = min(picked, rows)
    idx = torch.randperm(rows)[:picked]
    idx[torch.rand(picked) < 0.2] = -1  # routing padding: skipped
    idx = idx.to(torch.int32 if int32 else torch.int64)
    x = rand(rows, dim, dtype=dtype, device="cpu")
    assert torch.equal(fastlayers.gather_rows(x, idx), skip_ref.gather_rows(x, idx))
    out = rand(picked, dim, dtype=dtype, device="cpu")
    gate = torch.rand(picked).to(dtype) if gated else None
    got = fastlayers.scatter_add_gated(x, idx, out, gate)
    assert torch.equal(got, skip_ref.scatter_add_gated(x, idx, out, gate))
    leaves = [t.clone().requires_grad_() for t in (x, out)] + (
        [gate.clone().requires_grad_()] if gated else []
    )

    def call(fn, ls):
        return fn(ls[0], idx, ls[1], ls[2] if gated else None)

    dy = rand(rows, dim, dtype=dtype, device="cpu")
    g = torch.autograd.grad(call(fastlayers.scatter_add_gated, leaves), leaves, dy)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    g64 = torch.autograd.grad(call(skip_ref.scatter_add_gated, l64), l64, dy.double())
    lr = [t.detach().clone().requires_grad_() for t in leaves]
    g_ref = torch.autograd.grad(call(skip_ref.scatter_add_gated, lr), lr, dy)
    for got_g, same, want in zip(g, g_ref, g64, strict=True):
        assert_close_to_oracle(got_g, same, want)


# ----------------------------------------------------------------------------------------------
# Decode attention over the INT4 KV cache
# ----------------------------------------------------------------------------------------------
@PROPERTY
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 4),
    half_d=st.sampled_from([4, 16, 20, 32, 64]),
    q_group=st.sampled_from([4, 8, 32]),
    capacity=st.integers(1, 90),
    dtype=DTYPES,
    seed=SEEDS,
    data=st.data(),
)
def test_int4_kv_decode(batch, kv_heads, group, half_d, q_group, capacity, dtype, seed, data):
    d = 2 * half_d
    q_group = min(q_group, d)
    if d % q_group:
        q_group = d
    length = data.draw(st.integers(0, capacity), label="length")
    torch.manual_seed(seed)
    q = rand(batch, kv_heads * group, d, dtype=dtype, device="cpu")
    k, ks, v, vs = _quantized_cache(batch, kv_heads, capacity, d, q_group)
    out, lse = int4_kv_decode(q, k, ks, v, vs, length)
    assert out.dtype == dtype and out.shape == q.shape
    if length == 0:
        assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
        return
    _check_kv_attention(out, lse, kv_reference(q.double(), k, ks, v, vs, length, d**-0.5))


def _check_kv_attention(out, lse, want):
    """Against the float64 reference: the output within its dtype's rounding, lse in fp32."""
    tol = 1e-4 if out.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), want[1].double(), rtol=1e-5, atol=1e-5)


@PROPERTY
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    half_d=st.sampled_from([4, 16, 20, 32, 64]),
    capacity=st.integers(1, 80),
    dtype=DTYPES,
    seed=SEEDS,
    data=st.data(),
)
def test_int4_kv_attention(batch, kv_heads, group, half_d, capacity, dtype, seed, data):
    """Several new tokens against the cache, causally (prefill / speculative verification)."""
    d = 2 * half_d
    length = data.draw(st.integers(1, capacity), label="length")
    tq = data.draw(st.integers(1, length), label="queries")
    torch.manual_seed(seed)
    q = rand(batch, kv_heads * group, tq, d, dtype=dtype, device="cpu")
    k, ks, v, vs = _quantized_cache(batch, kv_heads, capacity, d, 8)
    out, lse = int4_kv_attention(q, k, ks, v, vs, length)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:3]
    _check_kv_attention(out, lse, _attention_reference(q.double(), k, ks, v, vs, length, d**-0.5))


@PROPERTY
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    tokens=st.integers(0, 20),
    half_d=st.sampled_from([1, 4, 8, 16, 32, 64]),
    group=st.sampled_from([2, 4, 8, 16, 32, 64, 128]),
    dtype=DTYPES,
    post=st.booleans(),
    rope=st.sampled_from([None, "half", "interleaved"]),
    per_batch_tables=st.booleans(),
    seed=SEEDS,
)
def test_kv_quantize(batch, kv_heads, tokens, half_d, group, dtype, post, rope, per_batch_tables,
                     seed):  # fmt: skip
    """The fused cache write (RoPE, post-RoPE scale, INT4 quantisation) is the reference's, bit for
    bit."""
    d = 2 * half_d
    if d % group:
        group = 2
    torch.manual_seed(seed)
    x = rand(batch, kv_heads, tokens, d, dtype=dtype, device="cpu", scale=4.0)
    post_scale = torch.rand(kv_heads, d) * 4 + 0.1 if post else None
    cos = sin = None
    if rope is not None:
        cos, sin = _rope_tables(tokens, d, batch=batch if per_batch_tables else None)
    got = kv_quantize(x, group, post_scale, cos, sin, rope or "half")
    want = _kv_quantize_reference(x, post_scale, group, cos, sin, rope or "half")
    assert torch.equal(got[0], want[0])
    assert torch.equal(fp8_codes(got[1]), fp8_codes(want[1]))


@PROPERTY
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 4),
    tokens=st.integers(0, 12),
    half_d=st.sampled_from([1, 4, 8, 20, 32, 64]),
    dtype=DTYPES,
    transposed=st.booleans(),
    scaled=st.booleans(),
    rope=st.sampled_from([None, "half", "interleaved"]),
    fp8=st.booleans(),
    seed=SEEDS,
)
def test_q_quantize(batch, heads, tokens, half_d, dtype, transposed, scaled, rope, fp8, seed):
    """The query side (RoPE, times the scale, FP8 per token and head) is the reference's, bit for
    bit, on contiguous and [B, T, H, d]-strided queries."""
    d = 2 * half_d
    torch.manual_seed(seed)
    if transposed:  # the layout a [B, T, H, d] projection leaves
        q = rand(batch, tokens, heads, d, dtype=dtype, device="cpu", scale=5.0).transpose(1, 2)
    else:
        q = rand(batch, heads, tokens, d, dtype=dtype, device="cpu", scale=5.0)
    scale = torch.rand(heads, d) * 3 + 0.2 if scaled else None
    cos = sin = None
    if rope is not None:
        angles = torch.rand(tokens, d) * 6
        cos, sin = angles.cos(), angles.sin()
    got = q_quantize(q, scale, cos, sin, rope or "half", fp8)
    want = _q_quantize_reference(q, scale, cos, sin, rope or "half", fp8)
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert torch.equal(got, want)


@PROPERTY
@given(
    rows=st.integers(0, 40),
    cols=st.integers(1, 300),
    dtype=DTYPES,
    layout=LAYOUTS,
    zero_row=st.booleans(),
    seed=SEEDS,
)
def test_quantize_fp8_per_token(rows, cols, dtype, layout, zero_row, seed):
    """Dynamic per-token FP8 quantisation is the reference's, bit for bit (an all-zero row: scale
    1)."""
    torch.manual_seed(seed)
    x = _activation(rows, cols, dtype, layout, scale=3.0)
    if zero_row and rows:
        x[rows // 2] = 0
    got, want = fastlayers.quantize_fp8_per_token(x), ref.quantize_fp8_per_token(x)
    assert got[0].dtype == torch.float8_e4m3fn and got[0].shape == x.shape
    assert got[1].dtype == torch.float32 and got[1].shape == (rows, 1)
    assert torch.equal(fp8_codes(got[0]), fp8_codes(want[0]))
    assert torch.equal(got[1], want[1])


# Paged cache: block tables over shuffled, poisoned pages (test_kv_paged._paged)
@PROPERTY
@given(
    lens=st.lists(st.integers(0, 70), min_size=1, max_size=4),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 4),
    half_d=st.sampled_from([4, 16, 20, 32, 64]),
    q_group=st.sampled_from([4, 8, 32]),
    page_size=st.sampled_from([1, 4, 16, 32]),  # (powers of two)
    softcap=st.sampled_from([0.0, 1.5]),
    num_splits=st.sampled_from([0, 1, 3]),
    dtype=DTYPES,
    seed=SEEDS,
)
def test_int4_kv_decode_paged(lens, kv_heads, group, half_d, q_group, page_size, softcap,
                              num_splits, dtype, seed):  # fmt: skip
    """Each row of the paged decode against the contiguous float64 reference over its own tokens
    (a row of no token: zeros, lse -inf)."""
    d = 2 * half_d
    q_group = q_group if d % q_group == 0 else d
    torch.manual_seed(seed)
    cache = _quantized_cache(len(lens), kv_heads, max(lens), d, q_group)
    pages, table, seq_lens = _paged(cache, lens, page_size, generator_seed=seed)
    q = rand(len(lens), kv_heads * group, d, dtype=dtype, device="cpu")
    out, lse = int4_kv_decode_paged(q, *pages, table, seq_lens, softcap=softcap,
                                    num_splits=num_splits)  # fmt: skip
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:2]
    _check_rows(q, out, lse, cache, lens, d**-0.5, softcap)


@PROPERTY
@given(
    lens=st.lists(st.integers(0, 50), min_size=1, max_size=4),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    half_d=st.sampled_from([4, 16, 20, 32, 64]),
    page_size=st.sampled_from([1, 8, 16]),
    softcap=st.sampled_from([0.0, 1.5]),
    dtype=DTYPES,
    seed=SEEDS,
    data=st.data(),
)
def test_int4_kv_attention_paged_varlen(lens, kv_heads, group, half_d, page_size, softcap, dtype,
                                        seed, data):  # fmt: skip
    """Ragged queries over a paged cache (prefill chunks beside decode rows and empty rows): row
    b's n_b queries are its last n_b tokens, each against the contiguous causal float64 reference
    over the row's own tokens."""
    d = 2 * half_d
    counts = [data.draw(st.integers(0, n), label=f"queries of row {i}") for i, n in enumerate(lens)]
    torch.manual_seed(seed)
    cache = _quantized_cache(len(lens), kv_heads, max(lens), d, 8)
    pages, table, seq_lens = _paged(cache, lens, page_size, generator_seed=seed)
    hq = kv_heads * group
    q = rand(sum(counts), hq, d, dtype=dtype, device="cpu")
    cu = torch.tensor([sum(counts[:i]) for i in range(len(counts) + 1)], dtype=torch.int32)
    out, lse = int4_kv_attention_paged_varlen(q, *pages, table, seq_lens, cu, softcap=softcap)
    _check_ragged(q, out, lse, cache, lens, counts, softcap)


def _check_ragged(q, out, lse, cache, lens, counts, softcap=0.0):
    """Ragged outputs ``out [T, Hq, d]`` / ``lse [T, Hq]`` of queries ``q`` (row b's ``counts[b]``
    queries one after the other, its last tokens of ``lens[b]``): each row against the contiguous
    causal float64 reference over its own tokens of ``cache``."""
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == q.shape[:2]
    c = 0
    for row, (n, m) in enumerate(zip(lens, counts, strict=True)):
        if m == 0:
            continue
        qb = q[c : c + m].transpose(0, 1).unsqueeze(0).double()  # [1, Hq, m, d]
        one = [x[row : row + 1, :, :n] for x in cache]
        want = _attention_reference(qb, *one, n, q.shape[-1] ** -0.5, softcap)
        got = out[c : c + m].transpose(0, 1).unsqueeze(0), lse[c : c + m].transpose(0, 1)[None]
        _check_kv_attention(*got, want)
        c += m


@PROPERTY
@given(
    lens=st.lists(st.integers(0, 50), min_size=1, max_size=4),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    half_d=st.sampled_from([4, 16, 20, 32, 64]),
    page_size=st.sampled_from([1, 8, 16]),
    split=st.booleans(),
    dtype=DTYPES,
    seed=SEEDS,
    data=st.data(),
)
def test_int4_kv_attention_paged_planned(lens, kv_heads, group, half_d, page_size, split, dtype,
                                         seed, data):  # fmt: skip
    """A serving step planned once (quant.plan_paged_step over a block manager's table), run
    without host reads: the ragged prefill in one call, or (``split``, CUDA's route, forced here
    on CPU too) its one-token rows through the split-KV decode and the rest through the ragged
    prefill, joined in the step's order. Each row against the causal float64 reference."""
    from unittest import mock

    from fastlayers.ops import int4_kv_attention_paged_planned, kvint4_paged

    d = 2 * half_d
    counts = [data.draw(st.integers(0, min(n, 3) if data.draw(st.booleans(), label=f"decode {i}")
                                    else n), label=f"queries of row {i}")
              for i, n in enumerate(lens)]  # fmt: skip
    torch.manual_seed(seed)
    cache = _quantized_cache(len(lens), kv_heads, max(lens), d, 8)
    pages, table, seq_lens = _paged(cache, lens, page_size, generator_seed=seed)
    cu = [sum(counts[:i]) for i in range(len(counts) + 1)]
    with mock.patch.object(kvint4_paged, "split_decode_rows", lambda device: split):
        step = quant.plan_paged_step(table, seq_lens, cu, page_size, pages[0].shape[0])
        q = rand(cu[-1], kv_heads * group, d, dtype=dtype, device="cpu")
        out, lse = int4_kv_attention_paged_planned(q, *pages, step)
    # (a split needs one-token rows beside longer ones; rows of no new token are in neither)
    assert (step.split is not None) == (split and 1 in counts and max(counts) > 1)
    _check_ragged(q, out, lse, cache, lens, counts)


@PROPERTY
@given(
    lens=st.lists(st.integers(0, 50), min_size=1, max_size=4),
    tq=st.integers(1, 12),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    half_d=st.sampled_from([4, 16, 20, 32, 64]),
    page_size=st.sampled_from([1, 8, 16]),
    softcap=st.sampled_from([0.0, 1.5]),
    q_layout=st.sampled_from(["contiguous", "[B, Tq, Hq, d] transposed"]),
    dtype=DTYPES,
    seed=SEEDS,
    data=st.data(),
)
def test_int4_kv_attention_paged_padded(lens, tq, kv_heads, group, half_d, page_size, softcap,
                                        q_layout, dtype, seed, data):  # fmt: skip
    """Padded queries ``[B, Hq, Tq, d]`` over a paged cache with ``q_lens`` (rows of different
    numbers of new tokens): row b's first q_lens[b] queries against the causal float64 reference
    over its own tokens, its padding zeros with lse -inf. Without q_lens every row has Tq new
    tokens."""
    from fastlayers.ops.kvint4_paged import int4_kv_attention_paged

    d = 2 * half_d
    padded = data.draw(st.booleans(), label="q_lens")
    if not padded:
        lens = [max(n, tq) for n in lens]
    q_lens = [data.draw(st.integers(0, min(tq, n)), label=f"q_lens[{i}]") if padded else tq
              for i, n in enumerate(lens)]  # fmt: skip
    torch.manual_seed(seed)
    cache = _quantized_cache(len(lens), kv_heads, max(lens), d, 8)
    pages, table, seq_lens = _paged(cache, lens, page_size, generator_seed=seed)
    hq = kv_heads * group
    q = rand(len(lens), tq, hq, d, dtype=dtype, device="cpu").transpose(1, 2)
    if q_layout == "contiguous":
        q = q.contiguous()
    arg = torch.tensor(q_lens, dtype=torch.int32) if padded else None
    out, lse = int4_kv_attention_paged(q, *pages, table, seq_lens, softcap=softcap, q_lens=arg)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:3]
    _check_counted_rows(q, out, lse, cache, lens, q_lens, d**-0.5, softcap)


@PROPERTY
@given(
    tokens=st.integers(0, 40),
    kv_heads=st.integers(1, 3),
    half_d=st.sampled_from([1, 4, 8, 20, 32, 64]),
    group=st.sampled_from([2, 4, 8, 16, 32, 64, 128]),
    page_size=st.sampled_from([1, 2, 8, 16]),
    spare=st.integers(0, 40),
    dtype=DTYPES,
    post=st.booleans(),
    rope=st.sampled_from([None, "half", "interleaved"]),
    seed=SEEDS,
    data=st.data(),
)
def test_kv_cache_write_paged(tokens, kv_heads, half_d, group, page_size, spare, dtype, post, rope,
                              seed, data):  # fmt: skip
    """The paged cache write is its reference (an indexed copy of kv_quantize's reference) bit for
    bit over a pool of random bytes, with slots drawn anywhere in the pool and -1 (not written)
    among them: the rows no token names keep their bytes."""
    from fastlayers.ops.kvint4_paged import _write_reference, kv_cache_write_paged

    d = 2 * half_d
    if d % group:
        group = 2
    pool = (tokens + spare) // page_size + 1
    slots = data.draw(
        st.lists(st.integers(0, pool * page_size - 1), min_size=tokens, max_size=tokens,
                 unique=True),
        label="slots",
    )  # fmt: skip
    skipped = data.draw(st.sets(st.integers(0, max(tokens - 1, 0))), label="-1 slots")
    slots = torch.tensor([-1 if i in skipped else v for i, v in enumerate(slots)], dtype=torch.long)
    torch.manual_seed(seed)
    x = rand(tokens, kv_heads, d, dtype=dtype, device="cpu", scale=4.0)
    post_scale = torch.rand(kv_heads, d) * 4 + 0.1 if post else None
    cos = sin = None
    if rope is not None:
        angles = torch.rand(tokens, d) * 6
        cos, sin = angles.cos(), angles.sin()
    pages = [torch.randint(0, 256, (pool, kv_heads, page_size, w), dtype=torch.uint8)
             for w in (half_d, d // group)]  # fmt: skip
    pages[1] = pages[1].view(torch.float8_e4m3fn)
    before = [t.view(torch.uint8).clone() for t in pages]
    want = [t.clone() for t in pages]
    kv_cache_write_paged(x, *pages, slots, post_scale, cos, sin, rope or "half")
    _write_reference(x, *want, slots, post_scale, cos, sin, rope or "half")
    kept = torch.ones(pool * page_size, dtype=torch.bool)
    kept[slots[slots >= 0]] = False
    kept = kept.reshape(pool, 1, page_size, 1)
    for got, expected, old in zip(pages, want, before, strict=True):
        got = got.view(torch.uint8)
        assert torch.equal(got, expected.view(torch.uint8))
        assert torch.equal(got[kept.expand_as(got)], old[kept.expand_as(old)])


def _quantized_cache(batch, kv_heads, tokens, d, group):
    """INT4 keys, key scales, values, value scales ``[batch, kv_heads, max(tokens, 1), .]``."""
    kv = [rand(batch, kv_heads, max(tokens, 1), d, dtype=torch.float32, device="cpu") for _ in "kv"]
    (k, ks), (v, vs) = (quant.quantize_kv_int4(t, group) for t in kv)
    return k, ks, v, vs


# ----------------------------------------------------------------------------------------------
# Non-finite inputs
# ----------------------------------------------------------------------------------------------
def _same_non_finite(got, want, name, lse=False, rtol=2e-2, atol=2e-2):
    """NaN and inf exactly where ``want`` has them (for a log-sum-exp, ``lse``: non-finite where
    ``want`` is, since +inf - +inf makes the kernels' running form NaN where logsumexp says inf);
    the finite values close (``rtol``/``atol``)."""
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    if lse:
        assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite values differ"
    else:
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN positions differ"
        inf = torch.isinf(want)
        assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], want[inf]), name
    torch.testing.assert_close(got[finite], want[finite], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_query_row_whose_every_score_is_minus_inf_gives_nan(dtype):
    """A query with a -inf channel against keys all positive there: every score of its row is -inf,
    and the reference's softmax gives NaN for the row (0 / 0). The kernels must too, not take the
    row for one that saw no key (zeros, as the 16-bit tensor-core tiles did: they weigh -inf 0, the
    value they give masked keys); every other row stays finite and equal to the reference."""
    torch.manual_seed(1)

    def cache(t, d):  # INT4 keys, channel 3 > 0 in every key
        k, v = torch.randn(2, 1, t, d), torch.randn(2, 1, t, d)
        k[..., 3] = k[..., 3].abs() + 0.5
        return (*quant.quantize_kv_int4(k, 16), *quant.quantize_kv_int4(v, 16))

    for d, hq in ((64, 16), (128, 8), (32, 4)):  # tensor-core tiles on CUDA at 64 and 128
        c = cache(40, d)
        q = rand(2, hq, d, dtype=dtype, device="cpu")
        q[0, 0, 3] = float("-inf")
        q3 = rand(2, hq, 3, d, dtype=dtype, device="cpu")
        q3[0, 0, 1, 3] = float("-inf")
        want = kv_reference(q.double(), *c, 40, d**-0.5)
        want3 = _attention_reference(q3.double(), *c, 40, d**-0.5)
        pages, table, lens = _paged(c, [40, 40], 16)
        cu = torch.tensor([0, 3, 6], dtype=torch.int32)
        ragged = q3.transpose(1, 2).reshape(6, hq, d)
        for name, got, expect in (
            ("int4_kv_decode", int4_kv_decode(q, *c, 40), want),
            ("int4_kv_attention", int4_kv_attention(q3, *c, 40), want3),
            ("int4_kv_decode_paged", int4_kv_decode_paged(q, *pages, table, lens), want),
            ("int4_kv_attention_paged_varlen",
             [t.reshape(2, 3, *t.shape[1:]).transpose(1, 2)
              for t in int4_kv_attention_paged_varlen(ragged, *pages, table, lens, cu)], want3),
        ):  # fmt: skip
            assert bool(expect[0].isnan().any()), name  # (the premise)
            _same_non_finite(got[0], expect[0], f"{name} d{d}")
            _same_non_finite(got[1], expect[1], f"{name} d{d} lse", lse=True)
    for d in (64, 128, 16):
        q, k, v = (rand(40, 2, d, dtype=dtype, device="cpu") for _ in "qkv")
        k[..., 3] = k[..., 3].abs() + 0.5
        q[7, 0, 3] = float("-inf")
        cu, pos = torch.tensor([0, 40], dtype=torch.int32), torch.arange(40)
        got = fastlayers.varlen_attention(q, k, v, cu, cu, pos, pos, return_lse=True)
        want = skip_ref.varlen_attention(q.double(), k.double(), v.double(), cu, cu, pos, pos,
                                         return_lse=True)  # fmt: skip
        assert bool(want[0][7, 0].isnan().all())
        _same_non_finite(got[0], want[0], f"varlen_attention d{d}")
        _same_non_finite(got[1], want[1], f"varlen_attention d{d} lse", lse=True)


@PROPERTY
@given(
    value=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    dtype=DTYPES,
    where=st.lists(st.integers(0, 10**6), min_size=1, max_size=3),
    seed=SEEDS,
)
# (a -inf query channel against keys all positive there in the 16-bit tensor-core decode: see the
# test above)
@example(value=float("-inf"), dtype=torch.float16, where=[1043], seed=3091)
def test_non_finite_inputs_propagate_as_in_the_reference(value, dtype, where, seed):
    """NaN/inf in the activations: every kernel puts NaN and inf exactly where its reference
    does (nothing silently finite, no poisoned neighbours) and agrees elsewhere."""
    torch.manual_seed(seed)

    def poisoned(*shape):
        t = rand(*shape, dtype=dtype, device="cpu")
        flat = t.view(-1)
        for i in where:
            flat[i % flat.numel()] = value
        return t

    x, w = poisoned(4, 64), rand(64, dtype=dtype, device="cpu")
    _same_non_finite(fastlayers.rms_norm(x, w), ref.rms_norm(x, w), "rms_norm")
    r = rand(4, 64, dtype=dtype, device="cpu")
    got, want = fastlayers.fused_add_rms_norm(x, r, w), ref.fused_add_rms_norm(x, r, w)
    _same_non_finite(got[0], want[0], "fused_add_rms_norm")
    q, s = fastlayers.rms_norm_fp8(x, w)
    q_ref, s_ref = ref.rms_norm_fp8(x, w)
    # the values as scaled FP8, at most one FP8 step apart (FP8_STEP_RTOL)
    _same_non_finite(
        q.float() * s, q_ref.float() * s_ref, "rms_norm_fp8", rtol=FP8_STEP_RTOL, atol=1e-3
    )
    _same_non_finite(s, s_ref, "rms_norm_fp8 scale")
    xq, xs = fastlayers.quantize_fp8_per_token(x)
    xq_ref, xs_ref = ref.quantize_fp8_per_token(x)
    # (a NaN's sign aside: inf / inf is a negative NaN on x86, a positive one on a GPU)
    assert torch.equal(fp8_codes(xq), fp8_codes(xq_ref)) and torch.equal(xs, xs_ref)
    qw = fastlayers.quantize_int4(rand(32, 64, dtype=torch.float32, device="cpu"), 32)
    _same_non_finite(
        fastlayers.int4_fp8_gemm(xq, xs, qw, None, torch.float32),
        ref.int4_fp8_gemm(
            xq, xs, qw.qweight, qw.group_scale, qw.channel_scale, 32, None, torch.float32
        ),
        "int4_fp8_gemm",
    )
    w_in, w_out = (rand(15, n, dtype=dtype, device="cpu") for n in (64, 16))
    got, want = ultrafast_ff(x, w_in, w_out), ref.ultrafast_ff(x, w_in, w_out)
    _same_non_finite(got[0], want[0], "ultrafast_ff")
    assert torch.equal(got[1], want[1]), "ultrafast_ff path"
    idx = torch.randint(0, 50, (4, 6))
    gates = torch.rand(4, 6).to(dtype)
    down, up = (rand(50, 64, dtype=dtype, device="cpu") for _ in "du")
    _same_non_finite(
        peer_experts(x, idx, gates, down, up)[0],
        ref.peer_experts(x, idx, gates, down, up)[0],
        "peer_experts",
    )
    _, cu = fastlayers.route_topk(torch.randn(1, 20), 1.0)
    pos = torch.arange(20)
    a, b = poisoned(20, 2, 16), rand(20, 2, 16, dtype=dtype, device="cpu")
    for q_, k_ in ((a, b), (b, a)):
        got = fastlayers.varlen_attention(q_, k_, b, cu, cu, pos, pos, return_lse=True)
        want = skip_ref.varlen_attention(q_, k_, b, cu, cu, pos, pos, return_lse=True)
        _same_non_finite(got[0], want[0], "varlen_attention")
        _same_non_finite(got[1], want[1], "varlen_attention lse", lse=True)
    # the INT4 KV cache: a poisoned key group gets the NaN scale (not a finite one), and poisoned
    # queries give NaN rows in the decode and prefill kernels
    keys = poisoned(2, 2, 10, 32)
    got, want = kv_quantize(keys, 16), _kv_quantize_reference(keys, None, 16)
    assert torch.equal(got[0], want[0])
    assert torch.equal(fp8_codes(got[1]), fp8_codes(want[1]))
    k, ks = got
    v, vs = quant.quantize_kv_int4(rand(2, 2, 10, 32, dtype=torch.float32, device="cpu"), 16)
    q1, q3 = poisoned(2, 4, 32), poisoned(2, 4, 3, 32)
    # and at head_dim 64 with 16 query heads per kv head: the tensor-core decode on CUDA
    k64, ks64 = quant.quantize_kv_int4(rand(2, 1, 10, 64, dtype=torch.float32, device="cpu"), 16)
    v64, vs64 = quant.quantize_kv_int4(rand(2, 1, 10, 64, dtype=torch.float32, device="cpu"), 16)
    q64 = poisoned(2, 16, 64)
    for name, got, want in (
        ("int4_kv_decode", int4_kv_decode(q1, k, ks, v, vs, 10),
         kv_reference(q1.double(), k, ks, v, vs, 10, 32**-0.5)),
        ("int4_kv_decode d64 gqa16", int4_kv_decode(q64, k64, ks64, v64, vs64, 10),
         kv_reference(q64.double(), k64, ks64, v64, vs64, 10, 64**-0.5)),
        ("int4_kv_attention", int4_kv_attention(q3, k, ks, v, vs, 10),
         _attention_reference(q3.double(), k, ks, v, vs, 10, 32**-0.5)),
    ):  # fmt: skip
        _same_non_finite(got[0], want[0], name)
        _same_non_finite(got[1], want[1], name + " lse", lse=True)
