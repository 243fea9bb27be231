# SPDX-License-Identifier: Apache-2.0
"""PEER: the fused expert kernel (forward, backward, sparse gradients) against the float64
reference, product-key retrieval against brute force, and the module against peer-pytorch."""

import copy
import math

import pytest
import torch

import fastlayers
from _tolerances import ATOL, assert_close_to_oracle, rand
from fastlayers import reference as ref
from fastlayers.ops import peer_experts

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tables(n, dim, dtype, device):
    return (
        rand(n, dim, dtype=dtype, device=device, scale=dim**-0.5),
        rand(n, dim, dtype=dtype, device=device, scale=0.5),
    )


def _pairs(tokens, pairs, n, dtype, device, duplicates=True):
    idx = torch.randint(0, n, (tokens, pairs), device=device)
    if duplicates and pairs > 2:
        idx[:, 1] = idx[:, 0]  # the same expert twice in a token
        idx[1::2, 2] = idx[0::2, 2][: idx[1::2].shape[0]]  # shared across tokens
    gates = torch.rand(tokens, pairs, device=device).to(dtype)
    return idx, gates


def _d(*ts):
    return [t.double() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,dim,pairs,n",
    [(1, 8, 1, 16), (37, 45, 12, 100), (64, 128, 128, 4096), (9, 33, 512, 256)],
)
def test_experts_forward(device, dtype, tokens, dim, pairs, n):
    down, up = _tables(n, dim, dtype, device)
    idx, gates = _pairs(tokens, pairs, n, dtype, device)
    x = rand(tokens, dim, dtype=dtype, device=device)
    y, pre = peer_experts(x, idx, gates, down, up)
    y_ref = ref.peer_experts(x, idx, gates, down, up)[0]
    y64, pre64 = ref.peer_experts(*_d(x), idx, *_d(gates, down, up))
    # y sums `pairs` terms: a kernel summing them in order (the CUDA one) may be a few fp32 ulps of
    # |y| off where torch's blocked sums are closer (512 pairs: |y| 45, 6.7 ulps)
    atol = ATOL[dtype] + 8 * torch.finfo(torch.float32).eps * y64.abs().max().item()
    assert_close_to_oracle(y, y_ref, y64, atol=atol, name="y")
    torch.testing.assert_close(pre.double(), pre64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
def test_experts_activations_batch_shapes_and_strides(device, activation):
    down, up = _tables(64, 40, torch.float32, device)
    base = rand(2, 5, 80, dtype=torch.float32, device=device)
    x = base[..., ::2]  # column stride 2, batch dims
    idx, gates = _pairs(10, 6, 64, torch.float32, device)
    idx, gates = idx.reshape(2, 5, 6), gates.reshape(2, 5, 6)
    y, pre = peer_experts(x, idx, gates, down, up, activation)
    y64 = ref.peer_experts(*_d(x), idx, *_d(gates, down, up), activation)[0]
    assert y.shape == (2, 5, 40) and pre.shape == (2, 5, 6)
    assert_close_to_oracle(y, ref.peer_experts(x, idx, gates, down, up, activation)[0], y64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_experts_backward_matches_autograd(device, dtype):
    tokens, dim, pairs, n = 50, 36, 16, 64
    down, up = _tables(n, dim, dtype, device)
    idx, gates = _pairs(tokens, pairs, n, dtype, device)
    x = rand(tokens, dim, dtype=dtype, device=device)
    dy = rand(tokens, dim, dtype=dtype, device=device)
    leaves = [t.detach().requires_grad_() for t in (x, gates, down, up)]
    y, _ = peer_experts(leaves[0], idx, *leaves[1:])
    grads = torch.autograd.grad(y, leaves, dy)
    l64 = [t.detach().double().requires_grad_() for t in (x, gates, down, up)]
    g64 = torch.autograd.grad(ref.peer_experts(l64[0], idx, *l64[1:])[0], l64, dy.double())
    l32 = [t.detach().float().requires_grad_() for t in (x, gates, down, up)]
    g32 = torch.autograd.grad(ref.peer_experts(l32[0], idx, *l32[1:])[0], l32, dy.float())
    for g, r, o, name in zip(grads, g32, g64, ["dx", "dgates", "ddown", "dup"], strict=True):
        assert g.dtype == dtype and g.layout == torch.strided
        assert_close_to_oracle(g, r.to(dtype), o, factor=3.0, name=name)


def test_experts_sparse_grad_and_determinism(device):
    down, up = _tables(400, 24, torch.float32, device)
    idx, gates = _pairs(30, 8, 400, torch.float32, device)
    x = rand(30, 24, dtype=torch.float32, device=device)
    dy = rand(30, 24, dtype=torch.float32, device=device)
    d1, u1 = down.clone().requires_grad_(), up.clone().requires_grad_()
    y = torch.ops.fastlayers.peer_experts(x, idx, gates, d1, u1, "gelu", True)[0]
    sd, su = torch.autograd.grad(y, (d1, u1), dy)
    assert sd.layout == torch.sparse_coo and sd._nnz() == torch.unique(idx).numel()
    d2, u2 = down.clone().requires_grad_(), up.clone().requires_grad_()
    dd, du = torch.autograd.grad(peer_experts(x, idx, gates, d2, u2)[0], (d2, u2), dy)
    torch.testing.assert_close(sd.to_dense(), dd, rtol=0, atol=0)
    torch.testing.assert_close(su.to_dense(), du, rtol=0, atol=0)
    again = torch.autograd.grad(peer_experts(x, idx, gates, d2, u2)[0], (d2, u2), dy)
    assert torch.equal(again[0], dd) and torch.equal(again[1], du)


def test_experts_backward_dense_table_zero_tokens_and_opcheck(device):
    """Dense mode writes every table row (unselected ones 0) including when there are no tokens;
    the backward op passes opcheck in both modes."""
    down, up = _tables(300, 20, torch.float32, device)
    idx, gates = _pairs(7, 4, 300, torch.float32, device)
    x = rand(7, 20, dtype=torch.float32, device=device)
    dy = rand(7, 20, dtype=torch.float32, device=device)
    pre = peer_experts(x, idx, gates, down, up)[1]
    args = (dy, x, idx, gates, down, up, pre, "gelu")
    _, _, no_ids, dd, du = torch.ops.fastlayers.peer_experts_backward(*args, True)
    _, _, ids, rd, ru = torch.ops.fastlayers.peer_experts_backward(*args, False)
    assert no_ids.shape == (0,)  # dense: no row list (output shapes independent of the data)
    assert dd.shape == (300, 20) and rd.shape == (ids.numel(), 20)
    assert torch.equal(ids, torch.unique(idx))
    others = torch.ones(300, dtype=torch.bool, device=device)
    others[ids] = False
    assert int(others.sum()) == 300 - ids.numel() > 200
    assert torch.equal(dd[others], torch.zeros_like(dd[others]))
    assert torch.equal(du[others], torch.zeros_like(du[others]))
    assert torch.equal(dd[ids], rd) and torch.equal(du[ids], ru)
    empty = [t[:0] for t in (dy, x, idx, gates)]
    out = torch.ops.fastlayers.peer_experts_backward(
        *empty[:2], empty[2], empty[3], down, up, pre[:0], "gelu", True
    )
    assert out[0].shape == (0, 20) and torch.equal(out[3], torch.zeros_like(down))
    for dense in (True, False):
        torch.library.opcheck(torch.ops.fastlayers.peer_experts_backward, (*args, dense))


def test_experts_bad_input():
    down, up = _tables(10, 8, torch.float32, "cpu")
    x = torch.randn(3, 8)
    idx = torch.randint(0, 10, (3, 4))
    g = torch.rand(3, 4)
    with pytest.raises(ValueError, match="indices must lie"):
        peer_experts(x, idx + 10, g, down, up)
    with pytest.raises(TypeError, match="int64"):
        peer_experts(x, idx.int(), g, down, up)
    with pytest.raises(ValueError, match="gates"):
        peer_experts(x, idx, g[:, :2], down, up)
    with pytest.raises(ValueError, match="expert_down"):
        peer_experts(x, idx, g, down[:, :4], up)
    with pytest.raises(TypeError, match="expert_up"):
        peer_experts(x, idx, g, down, up.double())
    with pytest.raises(ValueError, match="activation"):
        peer_experts(x, idx, g, down, up, "tanh")


def test_experts_opcheck(device):
    down, up = _tables(32, 12, torch.float32, device)
    idx, gates = _pairs(5, 4, 32, torch.float32, device)
    x = rand(5, 12, dtype=torch.float32, device=device).requires_grad_()
    torch.library.opcheck(
        torch.ops.fastlayers.peer_experts, (x, idx, gates, down, up, "gelu", False)
    )


@pytest.mark.parametrize("n,topk", [(16, 1), (64, 4), (1024, 16), (4096, 64)])
def test_product_key_retrieval_equals_brute_force(n, topk):
    heads, dim_key = 3, 10
    k = math.isqrt(n)
    queries = torch.randn(20, heads, dim_key, dtype=torch.float64)
    keys = torch.randn(heads, 2, k, dim_key // 2, dtype=torch.float64)
    indices, gates = ref.peer_retrieve(queries, keys, topk, "softmax")
    full = _all_expert_scores64(queries, keys)  # every expert e = i * k + j: s1[i] + s2[j]
    best, best_idx = full.topk(topk, dim=-1)
    torch.testing.assert_close(full.gather(-1, indices), best)
    assert torch.equal(indices.sort(-1).values, best_idx.sort(-1).values)
    torch.testing.assert_close(gates.sum(-1), torch.ones(20, heads, dtype=torch.float64))


def test_peer_module_trains_and_reports_usage():
    torch.manual_seed(0)
    m = fastlayers.PEER(32, 256, heads=4, topk=8, dim_key=16)
    x = torch.randn(6, 32)
    y = m(x)
    assert y.shape == (6, 32)
    y.square().mean().backward()
    for p in (m.query.weight, m.keys, m.expert_down, m.expert_up):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert 1 <= m.expert_usage(x) <= 6 * 4 * 8


def test_retrieval_follows_the_keys_after_training_steps():
    """The kernel's sub-key panels are built once per keys tensor and version: after optimizer
    steps (in place), an in-place edit and a replaced tensor, retrieval equals a fresh module's
    with the same weights."""
    torch.manual_seed(0)
    m = fastlayers.PEER(32, 256, heads=4, topk=8, dim_key=16, query_norm="none")
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randn(6, 32)

    def fresh():
        f = fastlayers.PEER(32, 256, heads=4, topk=8, dim_key=16, query_norm="none")
        f.load_state_dict({k: v.clone() for k, v in m.state_dict().items()})
        return f

    for _ in range(3):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
        with torch.no_grad():
            got, want = m.retrieve(x), fresh().retrieve(x)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with torch.no_grad():
        m.keys.mul_(-1.0)  # in place
        assert torch.equal(m.retrieve(x)[0], fresh().retrieve(x)[0])
        m.keys = torch.nn.Parameter(torch.randn_like(m.keys))  # replaced
        assert torch.equal(m.retrieve(x)[0], fresh().retrieve(x)[0])


def test_peer_sparse_grad_with_sparse_adam():
    torch.manual_seed(0)
    m = fastlayers.PEER(16, 1024, heads=2, topk=4, dim_key=8, sparse_grad=True, query_norm="none")
    opt_sparse = torch.optim.SparseAdam([m.expert_down, m.expert_up], lr=1e-2)
    before = m.expert_down.detach().clone()
    m(torch.randn(5, 16)).sum().backward()
    assert m.expert_down.grad.layout == torch.sparse_coo
    opt_sparse.step()
    changed = (m.expert_down != before).any(-1)
    assert 0 < changed.sum() <= 5 * 2 * 4


def test_peer_separate_experts_per_head():
    m = fastlayers.PEER(16, 64, heads=3, topk=2, dim_key=8, separate_experts_per_head=True)
    assert m.expert_down.shape == (3 * 64, 16)
    idx, _ = m.retrieve(torch.randn(4, 16))
    heads_of = idx.reshape(4, 3, 2) // 64
    assert torch.equal(heads_of, torch.arange(3).view(1, 3, 1).expand(4, 3, 2))


@torch.no_grad()
@pytest.mark.parametrize("separate", [False, True])
def test_module_inference_skips_the_index_range_check(monkeypatch, separate):
    """In eager CPU inference the module's experts trust its own retrieval's indices (no range
    check: a reduction and a host sync per call) and give the bits of the checked op, NaN inputs
    included (the retrieval's indices stay valid); with gradients the checked op runs."""
    from fastlayers.ops import _common, peer

    checks = []
    real = peer.check_index_range
    monkeypatch.setattr(peer, "check_index_range", lambda *a: checks.append(1) or real(*a))
    assert _common.check_index_range is real
    m = fastlayers.PEER(24, 256, heads=3, topk=4, dim_key=16, separate_experts_per_head=separate)
    m.eval()
    x = rand(5, 7, 24, dtype=torch.float32, device="cpu")
    x[1, 2] = float("nan")
    got = m(x)
    assert checks == []
    idx, gates = m.retrieve(x)
    want = peer_experts(x, idx, gates, m.expert_down, m.expert_up, m.activation)[0]
    assert len(checks) == 1
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # the same bits
    assert torch.isnan(got[1, 2]).all() and torch.isfinite(got[0]).all()
    plain = m(x[0])  # (one batch shape: the query projection's bits depend on it)
    with torch.enable_grad():
        y = m(x[0].clone().requires_grad_())
    assert len(checks) == 2 and torch.equal(y.detach(), plain)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_experts": 10}, {"dim_key": 7}, {"score": "sigmoid"}, {"query_norm": "layernorm"},
     {"topk": 0}, {"activation": "tanh"}],
)  # fmt: skip
def test_peer_bad_arguments(kwargs):
    args = {"dim": 16, "num_experts": 64, **kwargs}
    with pytest.raises(ValueError):
        fastlayers.PEER(**args)


def test_peer_bad_and_empty_input():
    """A wrong feature size or dtype names x (it used to surface as a matmul error); no tokens give
    an empty output (it used to crash in a reshape)."""
    m = fastlayers.PEER(16, 16, heads=2, topk=2).eval()
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 16\]"):
        m(torch.randn(3, 15))
    with pytest.raises(TypeError, match="module's dtype"):
        m(torch.randn(3, 16, dtype=torch.float64))
    with torch.no_grad():
        for shape in ((0, 16), (2, 0, 16)):
            assert m(torch.randn(*shape)).shape == shape
            indices, gates = m.retrieve(torch.randn(*shape))
            assert indices.shape == (*shape[:-1], 4) and gates.shape == indices.shape


@pytest.mark.parametrize("non_competing", [True, False])
def test_from_peer_pytorch_is_exact(non_competing):
    peer_pkg = pytest.importorskip("PEER_pytorch")
    torch.manual_seed(0)
    theirs = peer_pkg.PEER(
        dim=32, heads=4, num_experts=256, num_experts_per_head=8,
        non_competing_scores=non_competing,
    )  # fmt: skip
    torch.nn.init.normal_(theirs.weight_down_embed.weight, std=0.2)
    ours = fastlayers.PEER.from_peer_pytorch(theirs)
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    # Gradients agree too (to the queries, keys and both tables).
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    torch.testing.assert_close(ours.expert_up.grad, theirs.weight_up_embed.weight.grad)
    torch.testing.assert_close(ours.keys.grad, theirs.keys.grad.permute(0, 2, 1, 3))


# ---- peer_retrieve: the fused product-key retrieval ----------------------------------------------


def _half_scores64(queries, keys):
    """float64 sub-key scores ``[..., heads, 2, K]`` of the exact (dtype-rounded) inputs."""
    half = keys.shape[-1]
    q = queries.double().reshape(*queries.shape[:-1], 2, half)
    return torch.einsum("...hpd,hpkd->...hpk", q, keys.double())


def _all_expert_scores64(queries, keys):
    """float64 scores ``[..., heads, K * K]`` of every expert ``i * K + j``: brute force."""
    s = _half_scores64(queries, keys)
    return (s[..., 0, :, None] + s[..., 1, None, :]).flatten(-2)


def _expert_scores64(queries, keys, indices):
    s = _half_scores64(queries, keys)
    k = keys.shape[2]
    return s[..., 0, :].gather(-1, indices // k) + s[..., 1, :].gather(-1, indices % k)


def _check_selection(queries, keys, indices, topk, atol):
    """The selection is a valid top-k: distinct in-range experts whose exact scores equal the exact
    best topk scores up to atol (so any order of near-tied experts passes, a wrong one fails)."""
    k = keys.shape[2]
    assert indices.dtype == torch.int64 and indices.shape[-1] == topk
    assert int(indices.min()) >= 0 and int(indices.max()) < k * k
    assert torch.equal(indices.sort(-1).values.diff(dim=-1).clamp(max=1), torch.ones_like(
        indices[..., 1:]))  # fmt: skip
    best = _all_expert_scores64(queries, keys).topk(topk, dim=-1).values
    got = _expert_scores64(queries, keys, indices).sort(-1, descending=True).values
    torch.testing.assert_close(got, best, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", ["softmax", "relu"])
@pytest.mark.parametrize(
    "lead,heads,dim_key,n_keys,topk",
    [
        ((1,), 1, 2, 4, 1),
        ((37,), 3, 18, 23, 7),  # odd K (padded key tile), partial token block
        ((2, 33), 8, 64, 32, 16),
        ((5,), 2, 8, 4, 16),  # topk = K^2: every expert
        ((20,), 2, 16, 64, 64),  # topk 64
        ((9,), 2, 32, 512, 16),  # K >> topk: the vector-filtered selection
        ((3,), 1, 6, 1024, 5),
    ],
)
def test_retrieve_matches_reference(device, dtype, score, lead, heads, dim_key, n_keys, topk):
    queries = rand(*lead, heads, dim_key, dtype=dtype, device=device)
    keys = rand(heads, 2, n_keys, dim_key // 2, dtype=dtype, device=device)
    indices, gates = fastlayers.peer_retrieve(queries, keys, topk, score)
    assert indices.shape == gates.shape == (*lead, heads, topk) and gates.dtype == dtype
    scale = dim_key * 4.0  # |score| bound of these inputs: fp32 sums err ~1e-7 of it
    _check_selection(queries, keys, indices, topk, atol=scale * 1e-6)
    # Gates: softmax / relu of the exact scores of the selected experts, in selection order.
    s64 = _expert_scores64(queries, keys, indices)
    g64 = torch.softmax(s64, -1) if score == "softmax" else torch.relu(s64)
    r_idx, r_gates = ref.peer_retrieve(queries, keys, topk, score)
    r64 = _expert_scores64(queries, keys, r_idx)
    r64 = torch.softmax(r64, -1) if score == "softmax" else torch.relu(r64)
    torch.testing.assert_close(r_gates.double(), r64, rtol=ATOL[dtype], atol=1e-5 + ATOL[dtype])
    assert_close_to_oracle(gates, g64.to(dtype), g64, name="gates")
    # Where the k-th and (k+1)-th best scores are well apart, the reference selects the same set.
    full = _all_expert_scores64(queries, keys)
    if topk < full.shape[-1]:
        top = full.topk(topk + 1, dim=-1).values
        clear = (top[..., -2] - top[..., -1]) > scale * 1e-5
        assert clear.float().mean() > 0.5
        assert torch.equal(indices.sort(-1).values[clear], r_idx.sort(-1).values[clear])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", ["softmax", "relu"])
def test_retrieve_backward_matches_autograd(device, dtype, score):
    heads, dim_key, n_keys, topk = 3, 20, 12, 8
    queries = rand(17, heads, dim_key, dtype=dtype, device=device)
    keys = rand(heads, 2, n_keys, dim_key // 2, dtype=dtype, device=device, scale=0.3)
    w = rand(17, heads, topk, dtype=dtype, device=device)
    leaves = [queries.clone().requires_grad_(), keys.clone().requires_grad_()]
    indices, gates = fastlayers.peer_retrieve(*leaves, topk, score)
    grads = torch.autograd.grad(gates, leaves, w)
    # Oracle: float64 autograd through the reference with the same selection.
    r_idx = ref.peer_retrieve(queries.double(), keys.double(), topk, score)[0]
    assert torch.equal(r_idx, indices), "selection differs from the float64 reference"
    l64 = [t.detach().double().requires_grad_() for t in (queries, keys)]
    g64 = torch.autograd.grad(ref.peer_retrieve(*l64, topk, score)[1], l64, w.double())
    l32 = [t.detach().float().requires_grad_() for t in (queries, keys)]
    g32 = torch.autograd.grad(ref.peer_retrieve(*l32, topk, score)[1], l32, w.float())
    for g, r, o, name in zip(grads, g32, g64, ["dqueries", "dkeys"], strict=True):
        assert g.dtype == dtype
        assert_close_to_oracle(g, r.to(dtype), o, factor=3.0, name=name)


# candidates fit the filter buffer (lane-maxima bound; chunk bound) / overflow it
@pytest.mark.parametrize("n_keys", [64, 256, 512])
def test_retrieve_exact_ties_take_the_lower_candidate(device, n_keys):
    """All sub-keys equal: every score ties, so the top-k of each half is its first kh keys and the
    merge takes candidates in (row, column) order: expert j of row 0 for the first kh."""
    queries = rand(6, 2, 8, dtype=torch.float32, device=device)
    keys = rand(1, 1, 1, 4, dtype=torch.float32, device=device).expand(2, 2, n_keys, 4).contiguous()
    indices, gates = fastlayers.peer_retrieve(queries, keys, 16)
    expected = torch.arange(16, device=device).expand(6, 2, 16)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(gates, torch.full_like(gates, 1 / 16))


@pytest.mark.parametrize("n_keys", [9, 64, 512])  # no bound / lane-maxima bound / chunk bound
def test_retrieve_strided_queries_and_nan(device, n_keys):
    heads, dim_key, topk = 2, 12, 5
    base = rand(11, heads, 3 * dim_key, dtype=torch.float32, device=device)
    queries = base[..., dim_key : 2 * dim_key]  # non-contiguous
    keys = rand(heads, 2, n_keys, dim_key // 2, dtype=torch.float32, device=device)
    indices, gates = fastlayers.peer_retrieve(queries, keys, topk)
    i2, g2 = fastlayers.peer_retrieve(queries.contiguous(), keys, topk)
    assert torch.equal(indices, i2) and torch.equal(gates, g2)
    queries = queries.clone()
    queries[3] = float("nan")  # garbage in: indices stay valid, gates NaN, nothing crashes
    indices, gates = fastlayers.peer_retrieve(queries, keys, topk)
    assert int(indices.min()) >= 0 and int(indices.max()) < n_keys * n_keys
    assert torch.isnan(gates[3]).all() and torch.isfinite(gates[torch.arange(11) != 3]).all()


def test_retrieve_bad_input_and_opcheck(device):
    q = rand(4, 2, 8, dtype=torch.float32, device=device)
    keys = rand(2, 2, 5, 4, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="queries must have shape"):
        fastlayers.peer_retrieve(q[..., :6], keys, 3)
    with pytest.raises(ValueError, match="keys must have shape"):
        fastlayers.peer_retrieve(q, keys[:, :1], 3)
    with pytest.raises(TypeError, match="keys must have queries' dtype"):
        fastlayers.peer_retrieve(q, keys.double(), 3)
    with pytest.raises(ValueError, match="topk"):
        fastlayers.peer_retrieve(q, keys, 26)
    with pytest.raises(ValueError, match="topk"):
        fastlayers.peer_retrieve(q, keys, 0)
    with pytest.raises(ValueError, match="score"):
        fastlayers.peer_retrieve(q, keys, 3, "sigmoid")
    with pytest.raises(TypeError, match="queries"):
        fastlayers.peer_retrieve(q.int(), keys, 3)
    empty = fastlayers.peer_retrieve(q[:0], keys, 3)
    assert empty[0].shape == (0, 2, 3)
    op = torch.ops.fastlayers.peer_retrieve
    torch.library.opcheck(op, (q, keys, 3, "softmax"))
    # (opcheck's aot_dispatch test cannot sum an int64 first output into a float loss; the
    # gradients themselves are checked against float64 autograd above.)
    torch.library.opcheck(
        op,
        (q.requires_grad_(), keys.requires_grad_(), 3, "relu"),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_every_cpu_isa(cpu_isa):
    """Retrieval (unfiltered selection, the lane-maxima bound, the chunk bound), the expert forward
    and backward on each CPU kernel variant this machine runs, against the float64 reference."""
    for n_keys, topk in ((23, 7), (64, 8), (512, 16)):
        queries = rand(13, 3, 20, dtype=torch.float32, device="cpu")
        keys = rand(3, 2, n_keys, 10, dtype=torch.float32, device="cpu")
        indices, gates = fastlayers.peer_retrieve(queries, keys, topk)
        _check_selection(queries, keys, indices, topk, atol=1e-4)
        g64 = torch.softmax(_expert_scores64(queries, keys, indices), -1)
        torch.testing.assert_close(gates.double(), g64, rtol=1e-5, atol=1e-6)
    down, up = _tables(300, 45, torch.float32, "cpu")
    idx, gates = _pairs(21, 12, 300, torch.float32, "cpu")
    x = rand(21, 45, dtype=torch.float32, device="cpu")
    dy = rand(21, 45, dtype=torch.float32, device="cpu")
    y, pre = peer_experts(x, idx, gates, down, up)
    y64 = ref.peer_experts(*_d(x), idx, *_d(gates, down, up))[0]
    assert_close_to_oracle(y, ref.peer_experts(x, idx, gates, down, up)[0], y64)
    for dense in (True, False):
        got = torch.ops.fastlayers.peer_experts_backward(
            dy, x, idx, gates, down, up, pre, "gelu", dense
        )
        dx, dg, dd, du = ref.peer_experts_backward(dy, x, idx, gates, down, up, pre)
        if not dense:
            dd, du = dd[got[2]], du[got[2]]
        for g, e in zip((got[0], got[1], got[3], got[4]), (dx, dg, dd, du), strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    # bf16 rows: x . down[e] and dy . up[e] by vdpbf16ps under avx512_bf16 (a masked tail at dim
    # 45; 128- and 32-wide steps and a tail at 300), against float64
    for dim in (45, 300):
        down, up = _tables(300, dim, torch.bfloat16, "cpu")
        idx, gates = _pairs(21, 12, 300, torch.bfloat16, "cpu")
        x = rand(21, dim, dtype=torch.bfloat16, device="cpu")
        dy = rand(21, dim, dtype=torch.bfloat16, device="cpu")
        y, pre = peer_experts(x, idx, gates, down, up)
        y64, pre64 = ref.peer_experts(*_d(x), idx, *_d(gates, down, up))
        torch.testing.assert_close(pre.double(), pre64, rtol=1e-5, atol=1e-5)  # fp32 sums
        assert_close_to_oracle(y, ref.peer_experts(x, idx, gates, down, up)[0], y64)
        got = torch.ops.fastlayers.peer_experts_backward(
            dy, x, idx, gates, down, up, pre, "gelu", True
        )
        want = ref.peer_experts_backward(*_d(dy, x), idx, *_d(gates, down, up, pre))
        for g, e in zip((got[0], got[1], got[3], got[4]), want, strict=True):
            torch.testing.assert_close(g.double(), e, rtol=2e-2, atol=2e-2)


def test_reference_experts_take_no_tokens():
    """The reference (the specification, and the fallback path) on a batch without tokens: empty
    outputs and zero gradients, not a reshape error."""
    down, up = _tables(16, 8, torch.float32, "cpu")
    x = rand(0, 8, dtype=torch.float32, device="cpu")
    idx, gates = _pairs(0, 4, 16, torch.float32, "cpu")
    y, pre = ref.peer_experts(x, idx, gates, down, up)
    assert y.shape == (0, 8) and pre.shape == (0, 4)
    dx, dg, dd, du = ref.peer_experts_backward(y, x, idx, gates, down, up, pre)
    assert dx.shape == (0, 8) and dg.shape == (0, 4)
    assert dd.shape == down.shape and not dd.any() and not du.any()


def test_training_step_compiles_whole():
    """torch.compile of a PEER training step (dense table gradients): no output shape of the
    backward depends on the data, so inductor takes the step without a graph break (it refused
    the backward graph before) and matches eager."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    layer = fastlayers.PEER(48, 256, heads=2, topk=4)
    twin = copy.deepcopy(layer)
    x = rand(3, 5, 48, dtype=torch.float32, device="cpu")
    xs = [x.clone().requires_grad_() for _ in range(2)]
    compiled = torch.compile(layer)
    with torch._inductor.config.patch(force_disable_caches=True):  # (a cached graph hides it)
        for module, xi in ((compiled, xs[0]), (twin, xs[1])):
            module(xi).square().sum().backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(layer.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
