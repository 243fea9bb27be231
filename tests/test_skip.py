# SPDX-License-Identifier: Apache-2.0
"""Sparse layer-skip attention: routing, position-masked varlen attention (kernel vs a float64
evaluation of the reference, and vs SDPA in the dense case), backward, gather / gated scatter."""

import contextlib
import math

import pytest
import torch

import fastlayers
from _emu import launches_since
from _tolerances import assert_close_to_oracle, rand
from fastlayers.reference import skip as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _routed(batch, tokens, capacity, hq, hkv, d, dtype, device, dv=None):
    """Routed tokens of `batch` sequences: packed q/k/v, cu_seqlens and original positions."""
    scores = torch.randn(batch, tokens, device=device)
    idx, cu = fastlayers.route_topk(scores, capacity)
    n = idx.shape[0]
    pos = idx % tokens
    q = rand(n, hq, d, dtype=dtype, device=device)
    k = rand(n, hkv, d, dtype=dtype, device=device)
    v = rand(n, hkv, dv or d, dtype=dtype, device=device)
    return q, k, v, cu, pos


def _check(q, k, v, cu_q, cu_k, q_pos, k_pos, **kw):
    out, lse = fastlayers.varlen_attention(q, k, v, cu_q, cu_k, q_pos, k_pos, return_lse=True, **kw)
    same = ref.varlen_attention(q, k, v, cu_q, cu_k, q_pos, k_pos, return_lse=True, **kw)
    o64, lse64 = ref.varlen_attention(
        q.double(), k.double(), v.double(), cu_q, cu_k, q_pos, k_pos, return_lse=True, **kw
    )
    assert_close_to_oracle(out, same[0], o64, name="out")
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64))
    finite = torch.isfinite(lse64)
    torch.testing.assert_close(lse[finite].double(), lse64[finite].double(), rtol=1e-4, atol=1e-4)
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("capacity", [0.0, 0.125, 0.5, 1.0, 3])
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (4, 2, 128), (6, 2, 40)])
def test_varlen_matches_oracle(device, dtype, capacity, hq, hkv, d):
    q, k, v, cu, pos = _routed(3, 37, capacity, hq, hkv, d, dtype, device)
    _check(q, k, v, cu, cu, pos, pos)


@pytest.mark.parametrize("window", [None, 4, (3, 5), (0, 0)])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_windows_and_non_causal(device, window, causal):
    q, k, v, cu, pos = _routed(2, 70, 0.5, 4, 2, 64, torch.float32, device, dv=48)
    _check(q, k, v, cu, cu, pos, pos, causal=causal, window=window, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 80, 96, 128])
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, (20, 0)),
                                           (False, (3, 5))])  # fmt: skip
def test_varlen_tensor_core_forward(cuda_device, dtype, d, causal, window):
    """fp16/bf16 with head dim 64, 80 (Phi-2), 96 (Phi-3) or 128 run the tensor-core kernel:
    sequences of ~150 routed tokens (several 64-key tiles, tiles that no row sees), 64-row CTAs that
    span sequences, GQA."""
    q, k, v, cu, pos = _routed(5, 300, 0.5, 4, 2, d, dtype, cuda_device)
    _check(q, k, v, cu, cu, pos, pos, causal=causal, window=window)


# The varlen kernels' launch sites (the tensor-core ones go through cuda::tc::launch: "kernel").
VARLEN_KERNELS = ("kernel", "varlen_forward_kernel", "varlen_dkdv_kernel", "varlen_dq_kernel")


@contextlib.contextmanager
def _references_refused(monkeypatch):
    """The PyTorch forward and backward references made to fail: a CUDA kernel must run."""
    from fastlayers.ops import skip as skip_ops

    def refused(*args, **kwargs):
        raise AssertionError("the PyTorch reference ran instead of a CUDA kernel")

    with monkeypatch.context() as m:
        m.setattr(skip_ops, "_varlen_reference", refused)
        m.setattr(skip_ops, "_varlen_backward_reference", refused)
        yield


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_head_dims_up_to_256_on_cuda(cuda_device, dtype, monkeypatch):
    """Head dim 256 (Gemma 2 / 3) and 200 / 136 (partial lanes) run CUDA kernels forward and
    backward, not the reference (made to fail here): fp16/bf16 at 256 the tensor-core forward (Q's
    fragments read from shared memory per use) where a block can have its ~100 KiB of shared
    memory, and the tensor-core backward (dV and dK in two launches, 134 KiB), the CUDA-core
    kernels otherwise (fp32, views that are not 16-byte aligned, GPUs with less, 200 / 136; 8
    channels a lane, 80 KiB opted in). Windowed and soft-capped too; gradients against float64
    autograd. Beyond 256, the reference."""
    from fastlayers.ops import skip as skip_ops

    q, k, v, cu, pos = _routed(3, 150, 0.5, 4, 2, 256, dtype, cuda_device)
    q2, k2, v2, cu2, pos2 = _routed(2, 60, 0.5, 4, 2, 200, dtype, cuda_device, dv=136)
    before = launches_since(VARLEN_KERNELS)
    with _references_refused(monkeypatch):
        _check(q, k, v, cu, cu, pos, pos)
        _check(q, k, v, cu, cu, pos, pos, causal=False, window=(7, 3), softcap=2.0)
        buffers = [torch.empty(t.numel() + 1, dtype=dtype, device=cuda_device) for t in (q, k, v)]
        qs, ks, vs = (b[1:].view(t.shape).copy_(t) for b, t in zip(buffers, (q, k, v), strict=True))
        assert dtype == torch.float32 or qs.data_ptr() % 16 != 0
        _check(qs, ks, vs, cu, cu, pos, pos)
        _check(q2, k2, v2, cu2, cu2, pos2, pos2, window=9)
        _check_backward(q, k, v, cu, pos)
        _check_backward(q, k, v, cu, pos, causal=False, window=(3, 5), softcap=2.0)
        _check_backward(q2, k2, v2, cu2, pos2, causal=False, softcap=2.0)
    if before is not None:
        # 16-bit: 4 forwards at 256 on tensor cores, 2 backwards of 3 launches (dV, dK, dQ); the
        # unaligned views and 200 / 136 on CUDA cores (the emulation lets a block have 227 KiB)
        tc = [0, 7, 3, 3] if dtype == torch.float32 else [10, 3, 1, 1]
        assert launches_since(VARLEN_KERNELS, before) == tc
    # beyond 256: the reference (warned once)
    q3, k3, v3, cu3, pos3 = _routed(1, 20, 1.0, 2, 2, 288, dtype, cuda_device)
    reference, seen = skip_ops._varlen_reference, []
    monkeypatch.setattr(skip_ops, "_varlen_reference", lambda *a: seen.append(1) or reference(*a))
    _check(q3, k3, v3, cu3, cu3, pos3, pos3)
    assert seen


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varlen_tensor_core_keys_wider_than_values(cuda_device, dtype, monkeypatch):
    """Keys of 192 channels with values of 128 (DeepSeek's multi-head latent attention
    unabsorbed, MiMo-V2-Flash) take the tensor-core forward (value rows of their own width in
    shared memory, 128-channel outputs) and backward (dK and dV in one kernel, 16 queries a pass;
    dQ over 32 keys a step), not the reference (made to fail here): causal, windowed and
    soft-capped, GQA, forward and backward against float64. In the emulation the launches are
    counted (no CUDA-core kernel)."""
    q, k, v, cu, pos = _routed(3, 150, 0.5, 4, 2, 192, dtype, cuda_device, dv=128)
    before = launches_since(VARLEN_KERNELS)
    with _references_refused(monkeypatch):
        _check(q, k, v, cu, cu, pos, pos)
        _check(q, k, v, cu, cu, pos, pos, causal=False, window=(7, 3), softcap=2.0)
        _check_backward(q, k, v, cu, pos)
        _check_backward(q, k, v, cu, pos, causal=False, window=(3, 5), softcap=2.0)
    if before is not None:  # 4 forwards, 2 x (dK/dV, dQ); no CUDA-core kernel
        assert launches_since(VARLEN_KERNELS, before) == [8, 0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("order", ["sorted", "shuffled"])
@pytest.mark.parametrize("window", [None, (40, 0), (0, 30)])
def test_varlen_tensor_core_tile_classes(cuda_device, dtype, d, order, window):
    """The tensor-core kernel sorts key tiles by the bounds of their sequences and positions: tiles
    no row can see (skipped), tiles every row sees whole (no mask) and the rest (masked per pair).
    Long sequences (200 and 150 tokens: 64-row CTAs inside one sequence, so whole tiles occur) with
    sorted positions, and the same with the positions shuffled within each sequence (the bounds
    then rule out less; every pair is still masked right)."""
    gen = torch.Generator().manual_seed(7)
    lengths = [200, 3, 150]
    pos = []
    for n in lengths:
        p = torch.randperm(2 * n, generator=gen)[:n].sort().values
        pos.append(p if order == "sorted" else p[torch.randperm(n, generator=gen)])
    pos = torch.cat(pos).to(cuda_device)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu = cu.to(cuda_device)
    n = int(cu[-1])
    q = rand(n, 4, d, dtype=dtype, device=cuda_device)
    k = rand(n, 2, d, dtype=dtype, device=cuda_device)
    v = rand(n, 2, d, dtype=dtype, device=cuda_device)
    _check(q, k, v, cu, cu, pos, pos, window=window)
    _check(q, k, v, cu, cu, pos, pos, causal=False, window=window, softcap=2.0)


def test_varlen_dense_case_is_causal_sdpa(device):
    """q_pos = k_pos = arange: the usual causal attention."""
    t, h, d = 45, 4, 64
    q, k, v = (rand(t, h, d, dtype=torch.float32, device=device) for _ in range(3))
    cu = torch.tensor([0, t], dtype=torch.int32, device=device)
    pos = torch.arange(t, device=device)
    out = fastlayers.varlen_attention(q, k, v, cu, cu, pos, pos)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
    ).transpose(0, 1)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_varlen_subset_queries_all_keys_empty_sequences_and_invisible_rows(device):
    """Routed queries attending to every token of their sequence (kv_scope 'all'), an empty
    sequence in the batch, and queries that see no key (zeros, lse -inf)."""
    t = 30
    q_idx = [torch.tensor([0, 4, 9, 20]), torch.tensor([], dtype=torch.long), torch.tensor([3, 29])]
    q_pos = torch.cat(q_idx).to(device)
    cu_q = torch.tensor([0, 4, 4, 6], dtype=torch.int32, device=device)
    k_pos = torch.cat([torch.arange(5, t), torch.arange(t), torch.arange(t)]).to(device)
    cu_k = torch.tensor([0, t - 5, 2 * t - 5, 3 * t - 5], dtype=torch.int32, device=device)
    q = rand(6, 4, 64, dtype=torch.bfloat16, device=device)
    k = rand(k_pos.shape[0], 2, 64, dtype=torch.bfloat16, device=device)
    v = rand(k_pos.shape[0], 2, 64, dtype=torch.bfloat16, device=device)
    out, lse = _check(q, k, v, cu_q, cu_k, q_pos, k_pos)
    # sequence 0's keys start at position 5: queries at 0 and 4 see nothing
    assert bool((out[:2] == 0).all()) and bool(torch.isneginf(lse[:2]).all())
    assert bool(torch.isfinite(lse[2:]).all())


def test_varlen_threshold_routing_padding(device):
    """route_threshold's static buffer: rows past cu_seqlens[-1] are zeros with lse -inf."""
    scores = torch.randn(3, 40, device=device)
    idx, cu = fastlayers.route_threshold(scores, 0.5)
    pos = torch.where(idx >= 0, idx % 40, 0)
    n = idx.shape[0]
    q, k, v = (rand(n, 2, 64, dtype=torch.float32, device=device) for _ in range(3))
    # keys: the routed tokens only (the padded tail is not part of any sequence)
    out, lse = fastlayers.varlen_attention(q, k, v, cu, cu, pos, pos, return_lse=True)
    used = int(cu[-1])
    assert bool((out[used:] == 0).all()) and bool(torch.isneginf(lse[used:]).all())
    _check(q[:used], k[:used], v[:used], cu, cu, pos[:used], pos[:used])


def test_varlen_every_cpu_isa(cpu_isa):
    """Each CPU variant; bf16 with an even head dim takes the bf16-pair scores (forward S,
    backward S and dP = dO V^T) under avx512_bf16 (an odd one, 21, the fp32 path)."""
    for dtype in (torch.float32, torch.bfloat16):
        for hq, hkv, d in ((4, 2, 64), (3, 3, 20), (2, 1, 21)):
            q, k, v, cu, pos = _routed(2, 100, 0.5, hq, hkv, d, dtype, "cpu")
            _check(q, k, v, cu, cu, pos, pos, window=(6, 0))
            _check(q, k, v, cu, cu, pos, pos, window=(-1, 0))  # 50 keys: 32, 16 and 2
            _check_backward(q, k, v, cu, pos, window=(6, 0))
            _check_backward(q, k, v, cu, pos, window=(-1, 0))
            _check(q, k, v, cu, cu, pos, pos, window=(-1, 0), softcap=0.5)  # (Gemma 2)
            _check_backward(q, k, v, cu, pos, window=(-1, 0), softcap=0.5)


def test_varlen_scores_far_apart_every_cpu_isa(cpu_isa):
    """Queries x 30: scores more than 87 apart, whose probabilities and partial sums are denormal;
    the kernels flush them to zero for the call (x86 computes on denormals through microcode
    assists). Forward and backward match the float64 oracle (fp32 queries: scores of ~100 carry
    fp32 rounding of ~6e-6 into each probability), and the caller computes with denormals again
    after the calls."""
    q, k, v, cu, pos = _routed(2, 100, 0.5, 4, 2, 64, torch.float32, "cpu")
    q = q * 30
    _check(q, k, v, cu, cu, pos, pos)
    _check_backward(q, k, v, cu, pos)
    tiny = torch.full((1 << 16,), 1e-39)  # (a denormal; the product is one too)
    assert bool(((tiny * 2) > 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_sinks(device, dtype):
    """GPT-OSS's attention sinks (a logit per query head in the softmax's denominator, a key of
    zero value every query sees): forward and backward (q, k, v and the sinks themselves) against
    float64 autograd of the reference, which puts the sink into the softmax (the op scales the
    kernel's output by sigmoid(lse - sink)); a row that sees no key gives zeros with lse = sink;
    large sinks take nearly all the weight; bad sinks refused."""
    q, k, v, cu, pos = _routed(2, 40, 0.5, 4, 2, 64, dtype, device)
    sinks = torch.randn(4, device=device) * 2
    out, lse = _check(q, k, v, cu, cu, pos, pos, sinks=sinks, window=(5, 0))
    plain = fastlayers.varlen_attention(q, k, v, cu, cu, pos, pos, window=(5, 0))
    assert not torch.allclose(out.float(), plain.float(), rtol=1e-2, atol=1e-2)
    heavy = fastlayers.varlen_attention(q, k, v, cu, cu, pos, pos, sinks=sinks + 30)
    assert float(heavy.float().abs().max()) < 1e-6  # (e^-30 of the weight left on the keys)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out, lse = fastlayers.varlen_attention(*leaves[:3], cu, cu, pos, pos, return_lse=True,
                                           sinks=leaves[3])  # fmt: skip
    dy = rand(*out.shape, dtype=out.dtype, device=out.device)
    dl = rand(*lse.shape, dtype=lse.dtype, device=lse.device)
    torch.autograd.backward([out, lse], [dy, dl])
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    o64, l64 = ref.varlen_attention(*leaves64[:3], cu, cu, pos, pos, return_lse=True,
                                    sinks=leaves64[3])  # fmt: skip
    torch.autograd.backward([o64, l64], [dy.double(), dl.double()])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for got, want in zip(leaves, leaves64, strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=tol, atol=tol)
    # queries that see no key (keys start at position 5): zeros, lse = the sink
    t = 12
    q_pos, k_pos = torch.arange(0, t, 2, device=device), torch.arange(5, t, device=device)
    cu_q = torch.tensor([0, q_pos.shape[0]], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, k_pos.shape[0]], dtype=torch.int32, device=device)
    qq = rand(q_pos.shape[0], 4, 64, dtype=dtype, device=device)
    kk, vv = (rand(k_pos.shape[0], 2, 64, dtype=dtype, device=device) for _ in range(2))
    out, lse = _check(qq, kk, vv, cu_q, cu_k, q_pos, k_pos, sinks=sinks)
    assert bool((out[:3] == 0).all()) and torch.equal(lse[:3], sinks.float().expand(3, 4))
    bad_sinks = ((torch.zeros(3, device=device), ValueError),
                 (torch.zeros(4, dtype=torch.int32, device=device), ValueError),
                 (torch.zeros(4, 1, device=device), ValueError),
                 ([0.0] * 4, TypeError))  # fmt: skip
    for bad, error in bad_sinks:
        with pytest.raises(error, match="sinks must be"):
            fastlayers.varlen_attention(q, k, v, cu, cu, pos, pos, sinks=bad)


def _check_backward(q, k, v, cu, pos, cu_k=None, k_pos=None, **kw):
    """Gradients of out and lse (the backward kernels) against float64 autograd of the reference
    (keys: the queries' cu_seqlens and positions unless given)."""
    cu_k = cu if cu_k is None else cu_k
    k_pos = pos if k_pos is None else k_pos
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = fastlayers.varlen_attention(*leaves, cu, cu_k, pos, k_pos, return_lse=True, **kw)
    dy = rand(*out.shape, dtype=out.dtype, device=out.device)
    dl = rand(*lse.shape, dtype=lse.dtype, device=lse.device)
    finite = torch.isfinite(lse)
    torch.autograd.backward([out, torch.where(finite, lse, 0.0)], [dy, dl])
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o64, l64 = ref.varlen_attention(*leaves64, cu, cu_k, pos, k_pos, return_lse=True, **kw)
    torch.autograd.backward([o64, torch.where(finite, l64, 0.0)], [dy.double(), dl.double()])
    tol = 1e-4 if q.dtype == torch.float32 else 3e-2
    for got, want in zip(leaves, leaves64, strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_backward(device, dtype):
    q, k, v, cu, pos = _routed(2, 30, 0.5, 4, 2, 32, dtype, device)
    _check_backward(q, k, v, cu, pos, window=7)
    q, k, v, cu, pos = _routed(3, 25, 1.0, 2, 2, 48, dtype, device)
    _check_backward(q, k, v, cu, pos, causal=False)


@pytest.mark.parametrize("route", ["kernels", "reference"])
def test_varlen_backward_with_no_query_in_a_sequence(device, route, monkeypatch):
    """No routed query (an empty batch, or every row past the last sequence): the output is
    zeros and the gradients zero. The reference backward (the route without kernels) asked
    autograd for the gradients of outputs that were constants and raised RuntimeError; found by
    the differential fuzz (RoutedSelfAttention of an empty batch, training)."""
    if route == "reference":
        monkeypatch.setattr(fastlayers._ext, "C", None)
    k, v = (rand(6, 2, 16, dtype=torch.float32, device=device) for _ in "kv")
    cu_k, k_pos = torch.tensor([0, 6], dtype=torch.int32, device=device), torch.arange(6)
    for nq, cu_q in ((0, [0, 0]), (3, [0, 0])):  # (3 rows of routing padding)
        q = rand(nq, 4, 16, dtype=torch.float32, device=device)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        cu = torch.tensor(cu_q, dtype=torch.int32, device=device)
        out = fastlayers.varlen_attention(*leaves, cu, cu_k, torch.arange(nq, device=device),
                                          k_pos.to(device))  # fmt: skip
        assert out.shape == (nq, 4, 16) and bool((out == 0).all())
        out.sum().backward()
        for t in leaves:
            assert t.grad is None or bool((t.grad == 0).all())


_TC_DTYPES = [torch.float16, torch.bfloat16]
_TC_DIMS = [64, 80, 96, 128]
_TC_MASKS = [(True, None, 0.0), (False, None, 0.0), (True, (20, 0), 0.0), (False, (3, 5), 2.0)]


@pytest.mark.parametrize("dtype", _TC_DTYPES)
@pytest.mark.parametrize("d", _TC_DIMS)
@pytest.mark.parametrize("causal,window,softcap", _TC_MASKS)
def test_varlen_tensor_core_backward(cuda_device, dtype, d, causal, window, softcap):
    """fp16/bf16 with head dim 64, 80, 96 or 128 run the tensor-core backward (dK/dV per 64 keys
    of a kv head over the query tiles of the group's heads, dQ per 64 query rows over their key
    tiles; no CUDA-core backward kernel launched): sequences of ~150 routed tokens (several tiles
    each, tiles that no row sees), tiles that span sequences, GQA, windows, soft-capping, gradients
    of out and lse, against float64 autograd of the reference.

    A GPU runs the whole grid. The CPU emulation (10-20 s a case, the slowest of CI's emulated
    tests) runs half of it, chosen pairwise: every (head dim, mask) pair once, every dtype with
    every head dim and every mask twice, so each kernel instantiation still runs."""
    mask = (causal, window, softcap)
    emulated = cuda_device == "cpu"  # (device_for: the cuda_emu device allocates on the CPU)
    if emulated and (_TC_DTYPES.index(dtype) + _TC_DIMS.index(d) + _TC_MASKS.index(mask)) % 2:
        pytest.skip("emulated: the other half of the pairwise grid runs this (d, mask) pair")
    q, k, v, cu, pos = _routed(5, 300, 0.5, 4, 2, d, dtype, cuda_device)
    q = (q.float() * 2).to(dtype)  # (scores of a few units: the soft cap bends them)
    names = ("varlen_dq_kernel", "varlen_dkdv_kernel", "kernel")
    before = launches_since(names)
    _check_backward(q, k, v, cu, pos, causal=causal, window=window, softcap=softcap)
    if before is not None:  # (the tensor-core kernels go through cuda::tc::launch: "kernel")
        assert launches_since(names, before) == [0, 0, 3]  # forward, dK/dV, dQ


def test_varlen_tensor_core_many_empty_sequences(cuda_device):
    """64-row CTAs and 64-key tiles whose entries span more than 64 sequences (most of them empty on
    that side): queries in sequences 0, 69 and 138 only, keys in every third sequence; forward and
    backward on the tensor-core kernels against the float64 reference."""
    batch = 150
    nq = [3 if b in (0, 69, 138) else 0 for b in range(batch)]
    nk = [2 if b % 3 == 0 else 0 for b in range(batch)]
    q_pos = torch.cat([torch.arange(n) + 1 for n in nq]).to(cuda_device)
    k_pos = torch.cat([torch.arange(n) for n in nk]).to(cuda_device)
    cu_q, cu_k = (
        torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32).to(cuda_device)
        for n in (nq, nk)
    )
    q = rand(q_pos.shape[0], 4, 64, dtype=torch.float16, device=cuda_device)
    k = rand(k_pos.shape[0], 2, 64, dtype=torch.float16, device=cuda_device)
    v = rand(k_pos.shape[0], 2, 64, dtype=torch.float16, device=cuda_device)
    out, lse = _check(q, k, v, cu_q, cu_k, q_pos, k_pos)
    assert bool(torch.isfinite(lse).all())  # every query sees its sequence's two keys
    _check_backward(q, k, v, cu_q, q_pos, cu_k=cu_k, k_pos=k_pos)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_softcap(device, dtype):
    """Gemma 2's logit soft-capping (``softcap * tanh(s / softcap)`` on the scaled scores), forward
    and backward (ds times 1 - tanh^2) against float64 autograd of the reference, with scores
    several times the cap, and the forward far below it (1e5: the CPU forward's tanh lost a small
    argument's digits to cancellation); None or 0 is none; bad values refused; opcheck with a
    cap."""
    q, k, v, cu, pos = _routed(2, 40, 0.5, 4, 2, 64, dtype, device)
    q = (q.float() * 4).to(dtype)
    for cap in (0.7, 5.0):
        _check(q, k, v, cu, cu, pos, pos, softcap=cap)
        _check_backward(q, k, v, cu, pos, softcap=cap, window=9)
    _check(q, k, v, cu, cu, pos, pos, softcap=1e5)
    plain = fastlayers.varlen_attention(q, k, v, cu, cu, pos, pos)
    for none in (None, 0.0):
        assert torch.equal(fastlayers.varlen_attention(q, k, v, cu, cu, pos, pos, softcap=none),
                           plain)  # fmt: skip
    capped = fastlayers.varlen_attention(q, k, v, cu, cu, pos, pos, softcap=0.7)
    assert not torch.allclose(capped.float(), plain.float(), rtol=1e-2, atol=1e-2)
    for bad, error in ((-1.0, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                       ("1", TypeError), (True, TypeError)):  # fmt: skip
        with pytest.raises(error, match="softcap"):
            fastlayers.varlen_attention(q, k, v, cu, cu, pos, pos, softcap=bad)
    if dtype == torch.float32:
        args = (q, k, v, cu, cu, pos, pos, -1, 0, 0.125, 0.7)
        torch.library.opcheck(torch.ops.fastlayers.varlen_attention, args)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.library.opcheck(torch.ops.fastlayers.varlen_attention, (*leaves, *args[3:]))


def test_varlen_bad_input():
    q, k, v, cu, pos = _routed(2, 20, 0.5, 4, 2, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="multiple"):
        fastlayers.varlen_attention(q[:, :3], k, v, cu, cu, pos, pos)
    with pytest.raises(TypeError, match="dtype"):
        fastlayers.varlen_attention(q, k.half(), v, cu, cu, pos, pos)
    with pytest.raises(ValueError, match="int32"):
        fastlayers.varlen_attention(q, k, v, cu.long(), cu, pos, pos)
    with pytest.raises(ValueError, match="increase strictly"):
        fastlayers.varlen_attention(q, k, v, cu, cu, pos.flip(0), pos)
    with pytest.raises(ValueError, match="window"):
        fastlayers.varlen_attention(q, k, v, cu, cu, pos, pos, window=(-3, 0))
    # the reference (the route without kernels, and the spec) checks cu_seqlens as the CPU kernel
    # does: a decreasing one or one past the tokens gave an output of the wrong number of rows
    n = q.shape[0]
    for bad in ([0, int(cu[2]), int(cu[1])], [0, int(cu[1]), n + 4]):
        bad = torch.tensor(bad, dtype=torch.int32)
        for args in ((bad, cu), (cu, bad)):
            with pytest.raises(ValueError, match="not decrease"):
                ref.varlen_attention(q, k, v, *args, pos, pos)
            with pytest.raises(ValueError, match="not decrease"):
                fastlayers.varlen_attention(q, k, v, *args, pos, pos)


def test_varlen_opcheck(device):
    q, k, v, cu, pos = _routed(2, 20, 0.5, 4, 2, 16, torch.float32, device)
    args = (q, k, v, cu, cu, pos, pos, -1, 0, 0.25)
    torch.library.opcheck(torch.ops.fastlayers.varlen_attention, args)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.fastlayers.varlen_attention, (*leaves, *args[3:]))
    out, lse = torch.ops.fastlayers.varlen_attention(*args)
    grads = [rand(*out.shape, dtype=out.dtype, device=device), rand(*lse.shape,
             dtype=lse.dtype, device=device)]  # fmt: skip
    bwd = (*grads, *(t.detach() for t in (q, k, v)), cu, cu, pos, pos, out.detach(),
           lse.detach(), -1, 0, 0.25)  # fmt: skip
    torch.library.opcheck(torch.ops.fastlayers.varlen_attention_backward, bwd)


def test_routed_attention_training_step_under_compile():
    """torch.compile of a RoutedSelfAttention training step: the backward kernels are an op of
    their own, which the compiler traces (it traced into their raw pointers and failed before),
    and the gradients equal eager's."""
    import copy

    torch.manual_seed(0)
    layer = fastlayers.RoutedSelfAttention(64, 4, num_kv_heads=2, capacity=0.5)
    twin = copy.deepcopy(layer)
    x = rand(2, 9, 64, dtype=torch.float32, device="cpu")
    xs = [x.clone().requires_grad_() for _ in range(2)]
    with torch._inductor.config.patch(force_disable_caches=True):
        for module, xi in ((torch.compile(layer), xs[0]), (twin, xs[1])):
            module(xi).square().sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(layer.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------
# routing, gather, scatter
# ------------------------------------------------------------------------------------------------
def test_route_topk_selects_the_best_in_order(device):
    scores = torch.randn(4, 33, device=device)
    scores[1, 5] = scores[1, 6]  # a tie: the earlier token wins when only one fits
    scores[2, 7] = float("nan")
    idx, cu = fastlayers.route_topk(scores, 0.25)
    k = math.ceil(0.25 * 33)
    assert idx.shape == (4 * k,) and cu.tolist() == [i * k for i in range(5)]
    sel = idx.reshape(4, k)
    assert bool((sel[:, 1:] > sel[:, :-1]).all())  # ascending within each sequence
    for b in range(4):
        t = sel[b] - b * 33
        chosen = torch.zeros(33, dtype=torch.bool, device=device)
        chosen[t] = True
        s = scores[b].nan_to_num(nan=-math.inf)
        assert s[chosen].min() >= s[~chosen].max()
    assert fastlayers.route_topk(scores, 0)[0].numel() == 0
    assert fastlayers.route_topk(scores, 5)[0].shape == (20,)
    with pytest.raises(ValueError, match="capacity"):
        fastlayers.route_topk(scores, 1.5)


def test_route_threshold(device):
    scores = torch.randn(3, 16, device=device)
    idx, cu = fastlayers.route_threshold(scores, 0.2)
    counts = (scores > 0.2).sum(1)
    assert cu.tolist() == [0, *counts.cumsum(0).tolist()]
    n = int(cu[-1])
    want = (scores.reshape(-1) > 0.2).nonzero().reshape(-1)
    assert torch.equal(idx[:n], want) and bool((idx[n:] == -1).all())


def test_gather_and_scatter_add_gated(device):
    x = rand(20, 12, dtype=torch.bfloat16, device=device)
    idx = torch.tensor([3, 7, -1, 15], device=device)
    rows = fastlayers.gather_rows(x, idx)
    assert torch.equal(rows[[0, 1, 3]], x[[3, 7, 15]]) and bool((rows[2] == 0).all())
    out = rand(4, 12, dtype=torch.bfloat16, device=device).requires_grad_()
    gate = torch.rand(4, device=device).requires_grad_()
    residual = x.clone().requires_grad_()
    y = fastlayers.scatter_add_gated(residual, idx, out, gate)
    want = x.float().clone()
    for i, j in enumerate(idx.tolist()):
        if j >= 0:
            want[j] += gate[i].item() * out[i].float().detach()
    torch.testing.assert_close(y.float(), want.to(torch.bfloat16).float())
    dy = rand(20, 12, dtype=torch.bfloat16, device=device)
    y.backward(dy)
    dgate = (dy[[3, 7, 15]].float() * out.detach()[[0, 1, 3]].float()).sum(-1)
    torch.testing.assert_close(gate.grad[[0, 1, 3]], dgate, rtol=2e-2, atol=2e-2)
    assert gate.grad[2].item() == 0
    torch.testing.assert_close(residual.grad, dy)


def test_gather_rows_backward_gives_the_zeroed_rows_no_gradient(device):
    """A negative index (and on CUDA, which reads no index back to the host, one past the end)
    gives a zero row: its dy reaches no row of dx, a NaN in it neither. Before, the backward
    added a padding row's dy times 0 into row 0 (NaN there) and indexed past the end with an
    index the CUDA forward had zeroed (a device-side assert on a GPU; found by the fuzz)."""
    from fastlayers.ops import _common

    x = rand(20, 12, dtype=torch.float32, device=device).requires_grad_()
    cuda_route = _common.on_cuda(x.device)
    idx = torch.tensor([3, -1, 25 if cuda_route else 7, 3], device=device)
    if not cuda_route:
        with pytest.raises(ValueError, match="index"):
            fastlayers.gather_rows(x, torch.tensor([3, 25], device=device))
    rows = fastlayers.gather_rows(x, idx)
    dy = rand(4, 12, dtype=torch.float32, device=device)
    dy[1] = float("nan")
    (dx,) = torch.autograd.grad(rows, x, dy)
    want = torch.zeros_like(dx)
    want[3] = dy[0] + dy[3]
    if not cuda_route:
        want[7] = dy[2]
    else:
        assert bool((rows[2] == 0).all())
    assert bool((rows[1] == 0).all())
    torch.testing.assert_close(dx, want, rtol=0, atol=0)
    # the reference's padding row is zeros too when the row it reads in place (row 0) is not
    # finite (it multiplied by the mask: NaN there)
    x = x.detach().clone()
    x[0] = float("inf")
    pad = torch.tensor([-1, 3], device=device)
    want = torch.stack([torch.zeros_like(x[0]), x[3]])
    assert torch.equal(ref.gather_rows(x, pad), want)
    assert torch.equal(fastlayers.gather_rows(x, pad), want)


@pytest.mark.parametrize("route", ["kernel", "reference"])
def test_scatter_add_gated_refuses_a_repeated_row_on_cpu(route, monkeypatch):
    """Each row is updated from the residual, so a row named twice would lose one update: the CPU
    kernel and the reference refuse it (padding, -1, may repeat)."""
    from fastlayers.ops import skip as skip_ops

    if route == "reference":
        monkeypatch.setattr(skip_ops, "_rows_kernel_ok", lambda t: False)
    elif not skip_ops._rows_kernel_ok(torch.empty(0)):
        pytest.skip("no CPU kernels in this build")
    residual = rand(6, 4, dtype=torch.float32, device="cpu")
    out = rand(3, 4, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="indices must be unique"):
        fastlayers.scatter_add_gated(residual, torch.tensor([2, 5, 2]), out)
    y = fastlayers.scatter_add_gated(residual, torch.tensor([-1, 5, -1]), out)
    torch.testing.assert_close(y[5], residual[5] + out[1])


def test_rows_past_the_end_in_the_references(device, monkeypatch):
    """The references of gather_rows and scatter_add_gated (the ops' route without kernels) treat
    an index >= N as the kernels do: ValueError for CPU tensors (it was torch's IndexError), and on
    CUDA a zero row / no update (it was a device-side assert). Found by the differential fuzz."""
    x = rand(10, 8, dtype=torch.float32, device=device)
    out = rand(3, 8, dtype=torch.float32, device=device)
    idx = torch.tensor([3, 10, -1], device=device)
    if x.device.type == "cpu":
        with pytest.raises(ValueError, match=">= the number of rows"):
            ref.gather_rows(x, idx)
        with pytest.raises(ValueError, match=">= the number of rows"):
            ref.scatter_add_gated(x, idx, out, None)
        monkeypatch.setattr(fastlayers._ext, "C", None)  # (the ops' route without kernels)
        with pytest.raises(ValueError, match=">= the number of rows"):
            fastlayers.gather_rows(x, idx)
    else:
        rows = ref.gather_rows(x, idx)
        assert torch.equal(rows[0], x[3]) and bool((rows[1:] == 0).all())
        y = ref.scatter_add_gated(x, idx, out, None)
        torch.testing.assert_close(y[3], x[3] + out[0])
        assert torch.equal(y[:3], x[:3]) and torch.equal(y[4:], x[4:])
    assert torch.equal(ref.gather_rows(x[:0], idx[2:]), x.new_zeros(1, 8))  # (no row: padding)


# ------------------------------------------------------------------------------------------------
# RoutedSelfAttention
# ------------------------------------------------------------------------------------------------
def _dense_block(m, x, tokens):
    """The block on the given tokens of one sequence, with plain SDPA (is_causal on the gathered
    tokens in order is position-causal) and the model's own layers."""
    h = m.norm(x[tokens]) if m.norm is not None else x[tokens]
    pos = tokens
    n = tokens.shape[0]
    q = m.q_proj(h).view(n, m.num_heads, m.head_dim)
    k = m.k_proj(h).view(n, m.num_kv_heads, m.head_dim)
    v = m.v_proj(h).view(n, m.num_kv_heads, m.head_dim)
    from fastlayers.nn.skip import _rope

    q, k = _rope(q, pos, m.rope_theta), _rope(k, pos, m.rope_theta)
    rep = m.num_heads // m.num_kv_heads
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1),
        v.repeat_interleave(rep, 1).transpose(0, 1), is_causal=True,
    ).transpose(0, 1)  # fmt: skip
    gate = torch.sigmoid(m.router(x[tokens]).squeeze(-1))
    return x[tokens] + gate[:, None] * m.o_proj(o.reshape(n, -1))


@pytest.mark.parametrize("shape", [(2, 0), (0, 5), (0, 0)])
@pytest.mark.parametrize(
    "routing", [dict(capacity=0.5), dict(threshold=0.0), dict(capacity=0.5, granularity="sequence")]
)
def test_routed_self_attention_empty_inputs(device, shape, routing):
    """No tokens (or no sequences): an empty output of the input's shape, forward and backward."""
    m = fastlayers.RoutedSelfAttention(64, 4, num_kv_heads=2, device=device, **routing)
    x = torch.randn(*shape, 64, device=device, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("capacity", [0.25, 1.0])
def test_routed_self_attention_matches_dense_on_routed_tokens(device, capacity):
    m = fastlayers.RoutedSelfAttention(64, 4, num_kv_heads=2, capacity=capacity, device=device)
    x = rand(3, 20, 64, dtype=torch.float32, device=device)
    y = m(x)
    idx, cu = m.last_routing
    for b in range(3):
        tokens = idx[cu[b] : cu[b + 1]] - b * 20
        skipped = torch.ones(20, dtype=torch.bool, device=device)
        skipped[tokens] = False
        assert torch.equal(y[b][skipped], x[b][skipped])  # unrouted tokens pass through
        torch.testing.assert_close(
            y[b][tokens], _dense_block(m, x[b], tokens), rtol=1e-4, atol=1e-5
        )


def test_routed_self_attention_trains_the_router_and_sequences(device):
    m = fastlayers.RoutedSelfAttention(32, 2, capacity=0.5, device=device)
    x = rand(2, 16, 32, dtype=torch.float32, device=device).requires_grad_()
    m(x).square().sum().backward()
    assert m.router.weight.grad is not None and bool(m.router.weight.grad.abs().sum() > 0)
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    seq = fastlayers.RoutedSelfAttention(32, 2, capacity=1, granularity="sequence", device=device)
    x = rand(3, 10, 32, dtype=torch.float32, device=device)
    y = seq(x)
    changed = [(y[b] != x[b]).any().item() for b in range(3)]
    assert sum(changed) == 1  # one whole sequence routed, the others untouched
    thr = fastlayers.RoutedSelfAttention(32, 2, threshold=0.0, device=device)
    y = thr(x)
    idx, cu = thr.last_routing
    routed = torch.zeros(30, dtype=torch.bool, device=device)
    routed[idx[: int(cu[-1])]] = True
    assert torch.equal(y.reshape(30, 32)[~routed], x.reshape(30, 32)[~routed])
    with pytest.raises(ValueError, match="multiple"):
        fastlayers.RoutedSelfAttention(32, 3, num_kv_heads=2)
    for capacity in (2.0, -0.1, -1, True, "half"):
        with pytest.raises(ValueError, match="capacity must be"):
            fastlayers.RoutedSelfAttention(32, 2, capacity=capacity)
    with pytest.raises(ValueError, match="threshold must be finite"):
        fastlayers.RoutedSelfAttention(32, 2, threshold=float("nan"))


def test_varlen_strided_inputs(device):
    """Non-contiguous q, k, v (a head-dim slice of wider tensors, transposed storage) give the
    same result as contiguous copies."""
    q, k, v, cu, pos = _routed(2, 40, 0.5, 4, 2, 32, torch.float32, device)
    wide = rand(q.shape[0], 4, 64, dtype=torch.float32, device=device)
    wide[..., ::2] = q
    qs = wide[..., ::2]
    kt = k.transpose(0, 1).contiguous().transpose(0, 1)  # same values, head-major storage
    assert not qs.is_contiguous() and not kt.is_contiguous()
    got = fastlayers.varlen_attention(qs, kt, v, cu, cu, pos, pos)
    torch.testing.assert_close(got, fastlayers.varlen_attention(q, k, v, cu, cu, pos, pos))


def test_routed_self_attention_decodes_with_a_routed_cache():
    """Threshold routing is causal: prefill, then one token at a time against a RoutedKVStore,
    equals one call over the whole sequence; only routed tokens are stored."""
    from fastlayers.nn.skip import RoutedKVStore

    torch.manual_seed(0)
    m = fastlayers.RoutedSelfAttention(64, 4, 2, threshold=0.0).eval()
    x = torch.randn(3, 13, 64)
    with torch.no_grad():
        full = m(x)
        cache = RoutedKVStore()
        parts = [m(x[:, :6], torch.arange(6).expand(3, 6), cache)]
        for t in range(6, 13):
            parts.append(m(x[:, t : t + 1], torch.full((3, 1), t), cache))
        routed = (m.router(x).squeeze(-1) > 0).sum(1).tolist()
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.lengths() == routed and 0 < sum(routed) < 39
    cache.crop_to(6)
    assert all(int(p.max()) < 6 for p in cache.positions if p.numel())
    with pytest.raises(ValueError, match="causal routing"):
        fastlayers.RoutedSelfAttention(64, 4, capacity=0.5)(x, cache=RoutedKVStore())
    with pytest.raises(TypeError, match="RoutedKVStore"):
        m(x, cache={})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_row_kernels_match_the_reference_and_autograd(device, dtype):
    """gather_rows / scatter_add_gated kernels: bit-exact with the reference (the scatter's
    product is exact in double); the fused backward against float64 autograd of the reference;
    padding (-1) rows; opcheck."""
    from fastlayers import reference as ref

    n, dim = 37, 67
    x = rand(n, dim, dtype=dtype, device=device)
    idx = torch.tensor([5, 0, -1, 36, 17, -1, 9], device=device)
    assert torch.equal(fastlayers.gather_rows(x, idx), ref.gather_rows(x, idx))
    out = rand(7, dim, dtype=dtype, device=device)
    gate = torch.rand(7, device=device)
    for g in (gate, None):
        got = fastlayers.scatter_add_gated(x, idx, out, g)
        assert torch.equal(got, ref.scatter_add_gated(x, idx, out, g))
    leaves = [t.clone().requires_grad_() for t in (x, out, gate)]
    y = fastlayers.scatter_add_gated(leaves[0], idx, leaves[1], leaves[2])
    dy = rand(n, dim, dtype=dtype, device=device)
    grads = torch.autograd.grad(y, leaves, dy)
    l64 = [t.detach().double().requires_grad_() for t in (x, out, gate)]
    want = torch.autograd.grad(ref.scatter_add_gated(l64[0], idx, l64[1], l64[2]), l64, dy.double())
    assert torch.equal(grads[0], dy)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(grads[1].double(), want[1], rtol=tol, atol=tol)
    torch.testing.assert_close(grads[2].double(), want[2], rtol=1e-5, atol=1e-5)
    assert grads[2][2].item() == 0 and bool((grads[1][2] == 0).all())  # padding rows
    xg = x.clone().requires_grad_()
    dg = rand(7, dim, dtype=dtype, device=device)
    (gx,) = torch.autograd.grad(fastlayers.gather_rows(xg, idx), xg, dg)
    assert torch.equal(gx[5], dg[0]) and torch.equal(gx[36], dg[3]) and bool((gx[1] == 0).all())
    ops = torch.ops.fastlayers
    torch.library.opcheck(ops.gather_rows.default, (x, idx))
    torch.library.opcheck(ops.scatter_add_gated.default, (x, idx, out, gate))
    torch.library.opcheck(ops.scatter_add_gated_backward.default, (dy, idx, out, gate))


def test_row_ops_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="index is >= the number of rows"):
        fastlayers.gather_rows(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="out must be"):
        fastlayers.scatter_add_gated(x, torch.tensor([0, 1]), torch.randn(3, 8))
    with pytest.raises(ValueError, match="gate must be"):
        fastlayers.scatter_add_gated(x, torch.tensor([0, 1]), torch.randn(2, 8), torch.ones(3))
    with pytest.raises(ValueError, match="indices must be"):
        fastlayers.gather_rows(x, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_reads_cu_seqlens_clamped(cuda_device, dtype):
    """The CUDA route checks no cu_seqlens values on the host (that would synchronise): a negative,
    decreasing or too large one made its kernels read rows outside q / k / v (found by the
    differential fuzz under AddressSanitizer, emulated: cu_seqlens_k [-3, 22, 3] for 20 keys).
    Now they read cu_seqlens clamped to the tensors and made non-decreasing, forward and backward:
    the same results as for those clamped values given outright."""
    from fastlayers.ops.skip import _in_range

    q = rand(20, 4, 32, dtype=dtype, device=cuda_device).requires_grad_()
    k = rand(20, 2, 32, dtype=dtype, device=cuda_device).requires_grad_()
    v = rand(20, 2, 32, dtype=dtype, device=cuda_device).requires_grad_()
    pos = torch.arange(20, device=q.device)  # (increasing within any clamped sequence)
    cu = lambda *c: torch.tensor(c, dtype=torch.int32, device=q.device)  # noqa: E731
    assert torch.equal(_in_range(cu(0, 10, 20), 20), cu(0, 10, 20))
    for bad_q, bad_k, fixed_q, fixed_k in [
        (cu(0, 10, 20), cu(-3, 22, 3), cu(0, 10, 20), cu(0, 20, 20)),
        (cu(-5, 30, 7), cu(4, 2, 25), cu(0, 20, 20), cu(0, 2, 20)),
    ]:
        assert torch.equal(_in_range(bad_q, 20), fixed_q) and torch.equal(
            _in_range(bad_k, 20), fixed_k
        )
        got, want = [], []
        for c_q, c_k, into in ((bad_q, bad_k, got), (fixed_q, fixed_k, want)):
            out = fastlayers.varlen_attention(q, k, v, c_q, c_k, pos, pos)
            into.extend([out.detach(), *torch.autograd.grad(out.float().sum(), (q, k, v))])
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
