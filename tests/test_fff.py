# SPDX-License-Identifier: Apache-2.0
"""FFF kernels (UltraFastBERT form forward + backward, classic FFF hard descent) against the float64
reference, on random trees.

Routing is discrete: a kernel that sums a dot product in another order may take the other branch
where the exact logit is within rounding of 0. Such a token is accepted only if, at the first level
where its path leaves the oracle's, the oracle's |logit| is below a rounding bound; every other
token must follow the oracle's path exactly, and its output is compared with the FlashAttention
rule.
"""

import math

import pytest
import torch

import fastlayers
from _tolerances import assert_close_to_oracle, rand
from fastlayers import reference as ref
from fastlayers.ops import fff_hard, ultrafast_ff
from fastlayers.reference.fff import ACTIVATIONS, activation_fn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ultra_params(nodes, d_in, d_out, dtype, device, bias):
    w_in = rand(nodes, d_in, dtype=dtype, device=device, scale=d_in**-0.5)
    w_out = rand(nodes, d_out, dtype=dtype, device=device, scale=0.5)
    b_in = rand(nodes, dtype=dtype, device=device, scale=0.1) if bias else None
    return w_in, w_out, b_in


def _d(t):
    return None if t is None else t.double()


def _agreeing_tokens(path, oracle_path, oracle_pre, x, w_in, rel=1e-4):
    """Tokens whose path equals the oracle's; a divergence is allowed only at a near-tie.

    ``path[:, l]`` is the node visited at level l, so where the paths first differ (level
    ``first`` >= 1: both start at the root) the branch was taken at level ``first - 1``, by the
    sign of that node's logit: that is the logit that must be near zero."""
    path, oracle_path = path.reshape(-1, path.shape[-1]), oracle_path.reshape(-1, path.shape[-1])
    differs = path != oracle_path
    assert not differs[:, 0].any(), "a path does not start at the root"
    bad = differs.any(-1)
    if bad.any():
        decided = differs.int().argmax(-1)[bad] - 1  # the level whose logit chose the branch
        a = oracle_pre.reshape(-1, path.shape[-1])[bad, decided].abs()
        rows = oracle_path[bad, decided].long()
        bound = (
            rel
            * x.reshape(-1, x.shape[-1])[bad].double().norm(dim=-1)
            * w_in.double()[rows].norm(dim=-1)
        )
        assert (a <= bound + 1e-6).all(), (
            f"{int(bad.sum())} tokens took another branch at logits {a.tolist()} (bound {bound})"
        )
    return ~bad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "depth,d_in,d_out,tokens",
    [(0, 8, 8, 5), (1, 33, 17, 64), (3, 64, 48, 100), (7, 111, 77, 257), (12, 96, 40, 300)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_ultrafast_forward(device, dtype, depth, d_in, d_out, tokens, bias):
    w_in, w_out, b_in = _ultra_params(2 ** (depth + 1) - 1, d_in, d_out, dtype, device, bias)
    x = rand(tokens, d_in, dtype=dtype, device=device)
    y, path, pre = ultrafast_ff(x, w_in, w_out, b_in)
    y_ref = ref.ultrafast_ff(x, w_in, w_out, b_in)[0]
    y64, path64, pre64 = ref.ultrafast_ff(x.double(), w_in.double(), w_out.double(), _d(b_in))
    assert path.dtype == torch.int32 and pre.dtype == torch.float32
    ok = _agreeing_tokens(path, path64, pre64, x, w_in)
    assert ok.float().mean() > 0.95
    assert_close_to_oracle(y[ok], y_ref[ok], y64[ok], name="y")
    torch.testing.assert_close(pre[ok].double(), pre64[ok], rtol=1e-4, atol=1e-4 * d_in**0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("skewed", [False, True])
def test_ultrafast_cpu_batched_descent_equals_per_token(dtype, skewed):
    """From 64 tokens the CPU kernel descends the bottom of the tree bucket by bucket (tokens
    grouped by node, depth first); below that, token by token. Same arithmetic: every output, path
    and pre-activation bit-equal, for odd batches, strided rows, and a tree that sends every token
    into one bucket (the worst case for the bucket workspace and the recursion)."""
    depth, d_in, d_out = 11, 72, 40
    w_in, w_out, b_in = _ultra_params(2 ** (depth + 1) - 1, d_in, d_out, dtype, "cpu", True)
    base = rand(1031, d_in + 5, dtype=dtype, device="cpu")
    x = base[:, 2 : 2 + d_in]  # row stride d_in + 5
    if skewed:  # top levels: every logit negative, every token goes left
        b_in[:63] = -100.0
    y, path, pre = ultrafast_ff(x, w_in, w_out, b_in)
    chunks = [ultrafast_ff(x[i : i + 50], w_in, w_out, b_in) for i in range(0, x.shape[0], 50)]
    assert torch.equal(y, torch.cat([c[0] for c in chunks]))
    assert torch.equal(path, torch.cat([c[1] for c in chunks]))
    assert torch.equal(pre, torch.cat([c[2] for c in chunks]))
    if skewed:
        assert (path[:, 5] == 31).all()
    # the descent really spread below the top (skewed: over the 32 leaves under node 63)
    assert len(torch.unique(path[:, -1])) > (20 if skewed else 300)
    y64, path64, pre64 = ref.ultrafast_ff(x.double(), w_in.double(), w_out.double(), b_in.double())
    ok = _agreeing_tokens(path, path64, pre64, x, w_in)
    assert ok.float().mean() > 0.95
    assert_close_to_oracle(y[ok], ref.ultrafast_ff(x, w_in, w_out, b_in)[0][ok], y64[ok])
    with torch.no_grad():  # the inference route (no path/preact kept) too
        y_inf = fastlayers.UltraFastFeedForward(d_in, d_out, depth, bias=True, dtype=dtype)
        y_inf.w_in.copy_(w_in), y_inf.w_out.copy_(w_out), y_inf.b_in.copy_(b_in)
        assert torch.equal(y_inf.eval()(x), y)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_ultrafast_activations_and_batch_shapes(device, activation):
    w_in, w_out, b_in = _ultra_params(31, 40, 24, torch.float32, device, True)
    for shape in [(40,), (3, 40), (2, 5, 40)]:
        x = rand(*shape, dtype=torch.float32, device=device)
        y, path, _ = ultrafast_ff(x, w_in, w_out, b_in, activation)
        y64, path64, pre64 = ref.ultrafast_ff(
            x.double(), w_in.double(), w_out.double(), b_in.double(), activation
        )
        assert y.shape == (*shape[:-1], 24) and path.shape == (*shape[:-1], 5)
        ok = _agreeing_tokens(path, path64, pre64, x, w_in).reshape(shape[:-1])
        assert_close_to_oracle(y[ok], ref.ultrafast_ff(x, w_in, w_out, b_in, activation)[0][ok],
                               y64[ok])  # fmt: skip


def test_ultrafast_strided_input(device):
    w_in, w_out, _ = _ultra_params(63, 48, 32, torch.float32, device, False)
    base = rand(20, 96, dtype=torch.float32, device=device)
    x = base[:, ::2]  # column stride 2
    xt = rand(48, 20, dtype=torch.float32, device=device).t()  # transposed
    for inp in (x, xt, base[3:17, 10:58]):
        y, path, _ = ultrafast_ff(inp, w_in, w_out)
        y_c, path_c, _ = ultrafast_ff(inp.contiguous(), w_in, w_out)
        torch.testing.assert_close(path, path_c, rtol=0, atol=0)
        torch.testing.assert_close(y, y_c)


def test_ultrafast_tie_goes_left_everywhere(device):
    """Zero rows give a logit of exactly 0: every backend must go left (node 2n+1)."""
    depth = 4
    w_in, w_out, _ = _ultra_params(2 ** (depth + 1) - 1, 16, 8, torch.float32, device, False)
    w_in = torch.zeros_like(w_in)
    x = rand(9, 16, dtype=torch.float32, device=device)
    _, path, pre = ultrafast_ff(x, w_in, w_out)
    left = torch.tensor([2**level - 1 for level in range(depth + 1)], dtype=torch.int32)
    assert (pre == 0).all()
    assert (path.cpu() == left).all()
    assert (ref.ultrafast_ff(x, w_in, w_out)[1].cpu() == left).all()


def test_ultrafast_gelu_at_plus_inf_is_inf(device):
    """A +inf logit: GELU(+inf) = +inf on every backend and in the reference, whatever the
    tensor's length (torch's vectorized CPU gelu alone says NaN); w_out rows of one sign then
    give +-inf, not NaN."""
    assert torch.isinf(activation_fn("gelu")(torch.full((33,), math.inf))).all()
    depth, d = 3, 16
    w_in, _, _ = _ultra_params(2 ** (depth + 1) - 1, d, 8, torch.float32, device, False)
    w_out = rand(2 ** (depth + 1) - 1, 8, dtype=torch.float32, device=device).abs() + 0.1
    x = rand(20, d, dtype=torch.float32, device=device)
    x[3, 0] = math.inf
    w_in[:, 0] = 1.0  # every logit of token 3 is +inf
    y, _, pre = ultrafast_ff(x, w_in, w_out)
    want = ref.ultrafast_ff(x, w_in, w_out)[0]
    assert (pre[3] == math.inf).all()
    assert (y[3] == math.inf).all() and (want[3] == math.inf).all()
    fin = torch.ones(20, dtype=torch.bool)
    fin[3] = False
    oracle = ref.ultrafast_ff(x.double(), w_in.double(), w_out.double())[0]
    assert_close_to_oracle(y[fin], want[fin], oracle[fin])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_ultrafast_backward_matches_autograd_of_reference(device, dtype, bias, activation):
    depth, d_in, d_out, tokens = 5, 37, 29, 150
    w_in, w_out, b_in = _ultra_params(2 ** (depth + 1) - 1, d_in, d_out, dtype, device, bias)
    x = rand(tokens, d_in, dtype=dtype, device=device)
    dy = rand(tokens, d_out, dtype=dtype, device=device)
    params = [t for t in (x, w_in, w_out, b_in) if t is not None]
    leaves = [t.detach().requires_grad_() for t in params]
    xl, wil, wol = leaves[:3]
    bl = leaves[3] if bias else None
    y, path, _ = ultrafast_ff(xl, wil, wol, bl, activation)
    grads = torch.autograd.grad(y, leaves, dy)

    # Oracle: autograd of the float64 reference along the kernel's own path, when the paths agree.
    leaves64 = [t.detach().double().requires_grad_() for t in params]
    x64, wi64, wo64 = leaves64[:3]
    b64 = leaves64[3] if bias else None
    y64, path64, pre64 = ref.ultrafast_ff(x64, wi64, wo64, b64, activation)
    ok = _agreeing_tokens(path, path64, pre64.detach(), x, w_in)
    assert ok.all(), "random data gave a near-tie; reseed"
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    leaves32 = [t.detach().float().requires_grad_() for t in params]
    y32 = ref.ultrafast_ff(*leaves32[:3], leaves32[3] if bias else None, activation)[0]
    grads32 = torch.autograd.grad(y32, leaves32, dy.float())
    names = ["dx", "dw_in", "dw_out", "db_in"][: len(grads)]
    for g, g32, g64, name in zip(grads, grads32, grads64, names, strict=True):
        assert g.dtype == dtype
        assert_close_to_oracle(g, g32.to(dtype), g64, factor=3.0, name=name)


def test_ultrafast_backward_is_deterministic(device):
    w_in, w_out, b_in = _ultra_params(127, 64, 32, torch.float32, device, True)
    x = rand(513, 64, dtype=torch.float32, device=device)
    dy = rand(513, 32, dtype=torch.float32, device=device)
    _, path, pre = ultrafast_ff(x, w_in, w_out, b_in)
    a = torch.ops.fastlayers.ultrafast_ff_backward(dy, x, w_in, w_out, path, pre, "gelu")
    b = torch.ops.fastlayers.ultrafast_ff_backward(dy, x, w_in, w_out, path, pre, "gelu")
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    # Rows no token visited get exactly zero.
    visited = torch.zeros(127, dtype=torch.bool, device=device)
    visited[path.reshape(-1).long()] = True
    assert (a[1][~visited] == 0).all() and (a[3][~visited] == 0).all()


def _hard_params(depth, d_in, width, d_out, dtype, device):
    leaves = 2**depth
    return (
        rand(leaves - 1, d_in, dtype=dtype, device=device, scale=d_in**-0.5),
        rand(leaves - 1, dtype=dtype, device=device, scale=0.1),
        rand(leaves, d_in, width, dtype=dtype, device=device, scale=d_in**-0.5),
        rand(leaves, width, dtype=dtype, device=device, scale=0.1),
        rand(leaves, width, d_out, dtype=dtype, device=device, scale=width**-0.5),
        rand(leaves, d_out, dtype=dtype, device=device, scale=0.1),
    )


def _hard_oracle(x, params, activation="gelu"):
    """Leaf, output and the smallest |logit| along each token's path, in float64."""
    p64 = [t.double() for t in params]
    y64, leaf64 = ref.fff_hard(x.double(), *p64, activation)
    nw, nb = p64[0], p64[1]
    xf = x.double().reshape(-1, x.shape[-1])
    node = torch.zeros(xf.shape[0], dtype=torch.long, device=x.device)
    min_logit = torch.full((xf.shape[0],), float("inf"), dtype=torch.float64, device=x.device)
    for _ in range(params[2].shape[0].bit_length() - 1):
        logit = (xf * nw[node]).sum(-1) + nb[node]
        min_logit = torch.minimum(min_logit, logit.abs())
        node = 2 * node + 1 + (logit > 0).long()
    return y64, leaf64, min_logit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "depth,d_in,width,d_out,tokens",
    [(0, 16, 4, 8, 10), (1, 33, 1, 17, 50), (3, 64, 8, 48, 100), (5, 111, 64, 77, 130),
     (9, 40, 3, 24, 200), (2, 40, 24, 33, 300)],  # the last one takes the per-leaf GEMM path
)  # fmt: skip
def test_fff_hard_forward(device, dtype, depth, d_in, width, d_out, tokens):
    params = _hard_params(depth, d_in, width, d_out, dtype, device)
    x = rand(tokens, d_in, dtype=dtype, device=device)
    y, leaf = fff_hard(x, *params)
    y_ref = ref.fff_hard(x, *params)[0]
    y64, leaf64, min_logit = _hard_oracle(x, params)
    differs = leaf != leaf64
    assert (min_logit[differs] < 1e-3).all(), "a leaf differs away from a near-tie"
    ok = ~differs
    assert ok.float().mean() > 0.95
    assert_close_to_oracle(y[ok], y_ref[ok], y64[ok], name="y")


def test_fff_hard_tie_goes_left(device):
    params = list(_hard_params(3, 16, 2, 8, torch.float32, device))
    params[0] = torch.zeros_like(params[0])
    params[1] = torch.zeros_like(params[1])
    x = rand(7, 16, dtype=torch.float32, device=device)
    assert (fff_hard(x, *params)[1] == 0).all()
    assert (ref.fff_hard(x, *params)[1] == 0).all()


def test_fff_hard_equals_soft_with_hard_decisions(device):
    params = _hard_params(4, 24, 5, 12, torch.float64, "cpu")
    x = rand(50, 24, dtype=torch.float64, device="cpu")
    y_hard, leaf = ref.fff_hard(x, *params)
    y_soft, _, mix = ref.fff_soft(x, *params, hard=True)
    torch.testing.assert_close(y_soft, y_hard)
    assert torch.equal(mix.argmax(-1).to(torch.int32), leaf)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [None, 500])  # 500 elements: one token per recomputed chunk
def test_fff_hard_backward_matches_autograd_of_reference(device, dtype, chunk, monkeypatch):
    """x and the leaf weights get the gradient of the chosen leaf's computation; the routing is a
    hard decision, so the nodes get none (as in the reference's autograd)."""
    from fastlayers.ops import fff as fff_ops

    if chunk is not None:
        monkeypatch.setattr(fff_ops, "_HARD_BACKWARD_CHUNK_ELEMENTS", chunk)
    params = _hard_params(3, 37, 6, 29, dtype, device)
    x = rand(150, 37, dtype=dtype, device=device)
    dy = rand(150, 29, dtype=dtype, device=device)
    leaves = [t.detach().requires_grad_() for t in (x, *params)]
    y, leaf = fff_hard(*leaves)
    assert y.requires_grad and not leaf.requires_grad
    grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    assert grads[1] is None and grads[2] is None  # node_w, node_b
    assert torch.equal(leaf, _hard_oracle(x, params)[1]), "random data gave a near-tie; reseed"

    def reference_grads(dt):
        ls = [t.detach().to(dt).requires_grad_() for t in (x, *params)]
        return torch.autograd.grad(ref.fff_hard(*ls)[0], [ls[0], *ls[3:]], dy.to(dt))

    grads64, grads32 = reference_grads(torch.float64), reference_grads(torch.float32)
    names = ["dx", "dw1", "db1", "dw2", "db2"]
    for g, g32, g64, name in zip([grads[0], *grads[3:]], grads32, grads64, names, strict=True):
        assert g.dtype == dtype
        assert_close_to_oracle(g, g32.to(dtype), g64, factor=3.0, name=name)


def test_fff_hard_backward_takes_no_tokens(device):
    params = [t.requires_grad_() for t in _hard_params(2, 12, 3, 6, torch.float32, device)]
    x = rand(0, 12, dtype=torch.float32, device=device).requires_grad_()
    y, _ = fff_hard(x, *params)
    grads = torch.autograd.grad(y.sum(), [x, *params[2:]])
    assert grads[0].shape == x.shape
    for g, p in zip(grads[1:], params[2:], strict=True):
        assert g.shape == p.shape and bool((g == 0).all())


@pytest.mark.parametrize(
    "call",
    [
        lambda x, w, o: ultrafast_ff(x, w[:6], o[:6]),  # not 2^k - 1 rows
        lambda x, w, o: ultrafast_ff(x, w[:, :-1], o),  # in_features mismatch
        lambda x, w, o: ultrafast_ff(x, w, o[:3]),  # w_out rows mismatch
        lambda x, w, o: ultrafast_ff(x, w, o, torch.zeros(2)),  # bias shape
        lambda x, w, o: ultrafast_ff(x, w, o, None, "tanh"),  # unknown activation
        lambda x, w, o: ultrafast_ff(x.double(), w, o),  # dtype
        lambda x, w, o: ultrafast_ff(x, w.half(), o),  # weight dtype differs from x
        lambda x, w, o: ultrafast_ff(x.int(), w, o),  # not floating
        lambda x, w, o: ultrafast_ff(x[0, 0], w, o),  # 0-dim
    ],
)
def test_ultrafast_bad_input(call):
    x, w, o = torch.randn(4, 8), torch.randn(7, 8), torch.randn(7, 5)
    with pytest.raises((ValueError, TypeError)):
        call(x, w, o)


def test_fff_hard_bad_input():
    params = list(_hard_params(2, 8, 3, 5, torch.float32, "cpu"))
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="w1"):
        fff_hard(x, params[0], params[1], params[2][:3], *params[3:])
    with pytest.raises(ValueError, match="node_w"):
        fff_hard(x, params[0][:2], *params[1:])
    with pytest.raises(ValueError, match="b2"):
        fff_hard(x, *params[:5], params[5][:, :2])
    with pytest.raises(TypeError, match="w2"):
        fff_hard(x, *params[:4], params[4].double(), params[5])


def test_ops_opcheck(device):
    w_in, w_out, b_in = _ultra_params(15, 12, 6, torch.float32, device, True)
    x = rand(5, 12, dtype=torch.float32, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.fastlayers.ultrafast_ff, (x, w_in, b_in, w_out, "gelu"))
    torch.library.opcheck(torch.ops.fastlayers.ultrafast_ff, (x, w_in, None, w_out, "relu"))
    params = _hard_params(2, 12, 3, 6, torch.float32, device)
    torch.library.opcheck(torch.ops.fastlayers.fff_hard, (x.detach(), *params, "gelu"))
    leaf_params = [t.detach().requires_grad_() for t in params]
    torch.library.opcheck(torch.ops.fastlayers.fff_hard, (x, *leaf_params, "gelu"))
    _, path, pre = ultrafast_ff(x.detach(), w_in, w_out, b_in)
    dy = rand(5, 6, dtype=torch.float32, device=device)
    torch.library.opcheck(
        torch.ops.fastlayers.ultrafast_ff_backward, (dy, x.detach(), w_in, w_out, path, pre, "gelu")
    )


@pytest.mark.parametrize("dtype,d_in", [(torch.float32, 45), (torch.bfloat16, 45),
                                        (torch.bfloat16, 300)])  # fmt: skip
def test_every_cpu_isa(cpu_isa, dtype, d_in):
    """Forward, backward and the classic descent on each CPU kernel variant this machine runs (bf16
    dot products by vdpbf16ps under avx512_bf16: 128-wide steps, 32-wide steps and a masked tail
    at width 300, the tail alone at 45)."""
    w_in, w_out, b_in = _ultra_params(63, d_in, 37, dtype, "cpu", True)
    x = rand(70, d_in, dtype=dtype, device="cpu")
    dy = rand(70, 37, dtype=dtype, device="cpu")
    y, path, pre = ultrafast_ff(x, w_in, w_out, b_in)
    y64, path64, pre64 = ref.ultrafast_ff(x.double(), w_in.double(), w_out.double(), b_in.double())
    assert _agreeing_tokens(path, path64, pre64, x, w_in).all()
    assert_close_to_oracle(y, ref.ultrafast_ff(x, w_in, w_out, b_in)[0], y64)
    grads = torch.ops.fastlayers.ultrafast_ff_backward(dy, x, w_in, w_out, path, pre, "gelu")
    expected = ref.ultrafast_ff_backward(
        dy.double(), x.double(), w_in.double(), w_out.double(), path, pre.double(), "gelu"
    )
    for g, e in zip(grads, expected, strict=True):  # against float64, at the dtype's rounding
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol)
    params = _hard_params(4, d_in, 6, 37, dtype, "cpu")
    y, leaf = fff_hard(x, *params)
    if dtype == torch.float32:
        y_ref, leaf_ref = ref.fff_hard(x, *params)
        assert torch.equal(leaf, leaf_ref)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    else:  # against float64: a logit within bf16 rounding of 0 may take the other branch
        y_ref, leaf_ref = ref.fff_hard(x.double(), *(t.double() for t in params))
        ok = leaf == leaf_ref
        assert ok.float().mean() > 0.95
        torch.testing.assert_close(y[ok].double(), y_ref[ok], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fff_hard_grouped_and_per_token_paths_agree(device, dtype, monkeypatch):
    """Large batches with wide leaves run one GEMM pair per leaf: same function as per token."""
    from fastlayers.ops import fff as fff_ops

    params = _hard_params(3, 48, 20, 36, dtype, device)
    x = rand(400, 48, dtype=dtype, device=device)
    assert fff_ops._use_grouped(400, 8, 20)
    y_grouped, leaf_grouped = fff_hard(x, *params)
    monkeypatch.setattr(fff_ops, "_GROUPED_MIN_TOKENS_PER_LEAF", 10**9)
    y_tok, leaf_tok = fff_hard(x, *params)
    assert torch.equal(leaf_grouped, leaf_tok)
    y64 = _hard_oracle(x, params)[0]
    y_ref = ref.fff_hard(x, *params)[0]
    assert_close_to_oracle(y_grouped, y_ref, y64, name="grouped")
    assert_close_to_oracle(y_tok, y_ref, y64, name="per-token")


def test_reference_backward_takes_no_tokens():
    w_in, w_out, b_in = _ultra_params(7, 8, 5, torch.float32, "cpu", True)
    x = rand(0, 8, dtype=torch.float32, device="cpu")
    y, path, pre = ref.ultrafast_ff(x, w_in, w_out, b_in)
    assert y.shape == (0, 5) and path.shape == (0, 3)
    dx, dw_in, db_in, dw_out = ref.ultrafast_ff_backward(y, x, w_in, w_out, path, pre)
    assert dx.shape == (0, 8) and not dw_in.any() and not db_in.any() and not dw_out.any()
