# SPDX-License-Identifier: Apache-2.0
"""FastFeedForward / UltraFastFeedForward modules: semantics, conversions, losses, training."""

import copy
import io

import pytest
import torch

import fastlayers
from fastlayers import reference as ref


def test_ultrafast_matches_ultrafastbert_masked_training_form():
    """UltraFastBERT trains with a dense masked layer: (GELU(X W_in^T + b) * M) W_out^T, M the
    one-hot-per-level hard path. Converted, our module must compute the same function."""
    depth, d_in, d_out = 4, 24, 16
    n = 2 ** (depth + 1) - 1
    lin_in, lin_out = torch.nn.Linear(d_in, n), torch.nn.Linear(n, d_out, bias=False)
    m = fastlayers.UltraFastFeedForward.from_ultrafastbert(lin_in, lin_out)
    x = torch.randn(64, d_in)
    a = lin_in(x)
    mask = torch.zeros_like(a)
    node = torch.zeros(64, dtype=torch.long)
    for _ in range(depth + 1):
        mask[torch.arange(64), node] = 1
        node = 2 * node + 1 + (a[torch.arange(64), node] > 0).long()
    expected = lin_out(torch.nn.functional.gelu(a) * mask)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bias"):
        fastlayers.UltraFastFeedForward.from_ultrafastbert(lin_in, torch.nn.Linear(n, d_out))
    with pytest.raises(ValueError, match="2\\^\\(depth\\+1\\)"):
        fastlayers.UltraFastFeedForward.from_ultrafastbert(torch.nn.Linear(d_in, 6), lin_out)


def test_ultrafast_gradients_reach_only_visited_rows():
    m = fastlayers.UltraFastFeedForward(16, 8, depth=6, bias=True)
    x = torch.randn(5, 16)
    _, path, _ = m.forward_with_path(x)
    m(x).square().sum().backward()
    visited = torch.zeros(m.n_nodes, dtype=torch.bool)
    visited[path.reshape(-1).long()] = True
    for g in (m.w_in.grad, m.w_out.grad):
        assert (g[~visited] == 0).all() and (g[visited].abs().sum(-1) > 0).all()
    assert (m.b_in.grad[~visited] == 0).all()


def test_ultrafast_leaf_usage_and_repr():
    m = fastlayers.UltraFastFeedForward(16, 8, depth=3)
    usage = m.leaf_usage(torch.randn(2, 50, 16))
    assert usage.shape == (8,) and usage.sum() == 100
    assert "depth=3" in repr(m)


def test_ultrafast_trains_under_torch_compile():
    torch.manual_seed(0)
    m = fastlayers.UltraFastFeedForward(16, 8, depth=3)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(12, 16)
    torch.testing.assert_close(compiled(x), m(x))
    compiled(x).sum().backward()
    g = m.w_in.grad.clone()
    m.zero_grad()
    m(x).sum().backward()
    torch.testing.assert_close(g, m.w_in.grad)


@pytest.mark.parametrize("master", [False, True])
def test_fff_eval_is_hard_limit_of_training_form(master):
    m = fastlayers.FastFeedForward(20, 12, depth=3, leaf_width=4, master_leaf=master).double()
    x = torch.randn(30, 20, dtype=torch.float64)
    m.eval()
    y = m(x)
    y_soft_hard = ref.fff_soft(x, *m._leaf_params(), m.activation, hard=True)[0]
    if master:
        y_soft_hard = y_soft_hard + m._master(x)
    torch.testing.assert_close(y, y_soft_hard)


def test_fff_training_losses():
    m = fastlayers.FastFeedForward(20, 12, depth=3, leaf_width=4, region_leak=0.1, dropout=0.1)
    with pytest.raises(RuntimeError, match="train"):
        m.hardening_loss()
    x = torch.randn(64, 20)
    y = m.train()(x)
    h, b = m.hardening_loss(), m.load_balancing_loss()
    assert 0 < h.item() <= torch.log(torch.tensor(2.0)).item() + 1e-6
    assert b.item() > 0
    (y.square().mean() + 0.1 * h + 0.01 * b).backward()
    assert m.node_weight.grad is not None and m.node_weight.grad.abs().sum() > 0
    assert m.leaf_w2.grad.abs().sum() > 0
    # Balance loss is 1 for perfectly uniform routing.
    uniform = torch.full((16, 8), 1 / 8)
    uniform[torch.arange(16), torch.arange(16) % 8] += 0.01
    assert abs(ref.fff.load_balancing_loss(uniform).item() - 1.0) < 0.02


def test_fff_leaf_usage_and_state_dict():
    m = fastlayers.FastFeedForward(10, 6, depth=2, leaf_width=3, master_leaf=True)
    assert m.leaf_usage(torch.randn(40, 10)).sum() == 40
    keys = set(m.state_dict())
    assert {"node_weight", "node_bias", "leaf_w1", "leaf_b2", "master_w1", "master_b2"} <= keys


def test_fff_copies_after_a_training_step():
    """copy.deepcopy and torch.save of a FastFeedForward after a training forward (an EMA copy, a
    checkpoint): the module kept that forward's node probabilities, part of its autograd graph,
    which deepcopy refused (found by the differential fuzz). A copy has the same weights and
    output and no last forward of its own; the original keeps its auxiliary losses."""
    m = fastlayers.FastFeedForward(10, 6, depth=2, leaf_width=3).train()
    x = torch.randn(7, 10)
    m(x).sum().backward()
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(m), torch.load(buffer, weights_only=False)):
        with pytest.raises(RuntimeError, match="forward pass in train"):
            twin.hardening_loss()
        torch.testing.assert_close(twin(x), m(x), rtol=0, atol=0)
    assert m.hardening_loss().requires_grad and m.load_balancing_loss().requires_grad


def test_fff_depth_zero_is_one_leaf():
    m = fastlayers.FastFeedForward(10, 6, depth=0, leaf_width=3).eval()
    x = torch.randn(7, 10)
    expected = (
        torch.nn.functional.gelu(x @ m.leaf_w1[0] + m.leaf_b1[0]) @ m.leaf_w2[0] + m.leaf_b2[0]
    )
    torch.testing.assert_close(m(x), expected)
    torch.testing.assert_close(m.train()(x), expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"depth": -1},
        {"depth": 2.0},
        {"leaf_width": 0},
        {"activation": "tanh"},
        {"dropout": 1.5},
        {"region_leak": -0.1},
    ],
)
def test_fff_bad_arguments(kwargs):
    args = {"in_features": 8, "out_features": 4, "depth": 2, "leaf_width": 2, **kwargs}
    with pytest.raises(ValueError):
        fastlayers.FastFeedForward(**args)


def test_from_fastfeedforward_is_exact():
    fff_pkg = pytest.importorskip("fastfeedforward")
    torch.manual_seed(0)
    for act in (torch.nn.ReLU(), torch.nn.GELU()):
        pkg = fff_pkg.FFF(32, 4, 16, 3, activation=act)
        ours = fastlayers.FastFeedForward.from_fastfeedforward(pkg)
        x = torch.randn(50, 32)
        with torch.no_grad():
            pkg.train()
            expected_hard = pkg.training_forward(x, use_hard_decisions=True)
            expected_soft = pkg.training_forward(x)
            torch.testing.assert_close(ours.eval()(x), expected_hard)
            torch.testing.assert_close(ours.train()(x), expected_soft)
    with pytest.raises(ValueError, match="Tanh"):
        fastlayers.FastFeedForward.from_fastfeedforward(
            fff_pkg.FFF(8, 2, 4, 1, activation=torch.nn.Tanh())
        )


# ----------------------------------------------------------------------------------------------
# The inference route of UltraFastFeedForward (grad mode off; CPU or CUDA weights): y only, weights
# validated once
# ----------------------------------------------------------------------------------------------
def _op_y(m, x):
    return fastlayers.ultrafast_ff(x, m.w_in, m.w_out, m.b_in, m.activation)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "shape,d_out", [((1, 96), 96), ((3, 5, 96), 40), ((96,), 96), ((7, 96), 96)]
)
def test_ultrafast_inference_route_equals_the_op(device, dtype, bias, shape, d_out):
    torch.manual_seed(0)
    m = fastlayers.UltraFastFeedForward(96, d_out, depth=5, bias=bias, dtype=dtype, device=device)
    m.eval()
    x = torch.randn(shape).to(device=device, dtype=dtype)
    with torch.no_grad():
        y = m(x)
        assert m._infer_plan is not None and m._infer_plan.dtype == dtype  # the route was taken
        assert y.shape == (*shape[:-1], d_out) and y.dtype == dtype
        assert torch.equal(y, _op_y(m, x))  # the same kernel arithmetic: the same bits
    with torch.inference_mode():
        assert torch.equal(m(x), y)
    y_grad_mode = m(x)  # grad mode on: the op's route, differentiable
    assert y_grad_mode.requires_grad and torch.equal(y_grad_mode.detach(), y)


def test_ultrafast_inference_route_strided_input_and_poisoned_output(device):
    m = fastlayers.UltraFastFeedForward(64, 64, depth=4, device=device).eval()
    wide = torch.randn(6, 128, device=device)
    x = wide[:, ::2]  # not contiguous
    fastlayers.ops.set_poison_outputs(True)
    try:
        with torch.no_grad():
            y, y1 = m(x), m(x[:1].contiguous())
    finally:
        fastlayers.ops.set_poison_outputs(False)
    assert torch.isfinite(y).all() and torch.isfinite(y1).all()
    assert torch.equal(y, _op_y(m, x.contiguous())) and torch.equal(y1, y[:1])


def test_ultrafast_inference_route_follows_weight_changes():
    torch.manual_seed(1)
    m = fastlayers.UltraFastFeedForward(32, 32, depth=3).eval()
    x = torch.randn(2, 32)
    with torch.no_grad():
        first = m(x)
        m.w_out.mul_(2.0)  # in place: same memory, the kernel reads the new values
        assert torch.equal(m(x), _op_y(m, x)) and not torch.equal(m(x), first)
        plan = m._infer_plan
        m.w_in.data = torch.randn(15, 32)  # new memory: a new plan
        assert torch.equal(m(x), _op_y(m, x)) and m._infer_plan is not plan
        m.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        assert torch.equal(m(xb), _op_y(m, xb)) and m._infer_plan.dtype == torch.bfloat16
        with pytest.raises(
            TypeError, match="dtype"
        ):  # a float32 x no longer matches: the op's error
            m(x)
        m.w_in.data = torch.randn(15, 32)  # float32 w_in in a bfloat16 module: not eligible
        with pytest.raises(TypeError, match="w_out"):  # the op's route and its error
            m(torch.randn(2, 32))
        assert m._infer_plan.dtype is None


def test_ultrafast_inference_route_under_compile():
    m = fastlayers.UltraFastFeedForward(48, 48, depth=3).eval()
    x = torch.randn(4, 48)
    with torch.no_grad():
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("shape,width", [((1, 48), 1), ((3, 4, 48), 8), ((48,), 2)])
def test_fff_inference_route_equals_the_op(device, dtype, master, shape, width):
    torch.manual_seed(0)
    m = fastlayers.FastFeedForward(48, 48, depth=4, leaf_width=width, master_leaf=master,
                                   dtype=dtype, device=device).eval()  # fmt: skip
    x = torch.randn(shape).to(device=device, dtype=dtype)
    with torch.no_grad():
        y = m(x)
        assert m._infer_plan is not None and m._infer_plan.dtype == dtype  # the route was taken
        want = m._hard(x)[0] + (m._master(x) if master else 0)
        assert torch.equal(y, want)
        m.leaf_w2.mul_(2.0)  # in place: the kernel reads the new values
        assert torch.equal(m(x), m._hard(x)[0] + (m._master(x) if master else 0))
        plan = m._infer_plan
        m.node_weight.data = m.node_weight.data.clone()  # new memory: a new plan
        m(x)
        assert m._infer_plan is not plan
    y_grad = m(x)  # grad mode: the op route (not differentiable in eval: the hard path)
    assert y_grad.shape == y.shape


def test_fff_inference_route_leaves_large_batches_to_the_grouped_gemms():
    m = fastlayers.FastFeedForward(64, 64, depth=2, leaf_width=32).eval()
    x = torch.randn(512, 64)  # 4 leaves x 128 tokens: the leaf-grouped GEMM path
    from fastlayers.ops.fff import _use_grouped, fff_hard_infer

    with torch.no_grad():
        m(x[:1])
        assert _use_grouped(512, 4, 32) and fff_hard_infer(x, m._infer_plan) is None
        torch.testing.assert_close(m(x), m._hard(x)[0], rtol=0, atol=0)
        compiled = torch.compile(m, fullgraph=True)(x[:3])
    torch.testing.assert_close(compiled, m._hard(x[:3])[0], rtol=1e-6, atol=1e-6)
