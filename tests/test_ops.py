# SPDX-License-Identifier: Apache-2.0
"""Op registration: opcheck on every device, torch.compile without graph breaks, clear errors."""

import pytest
import torch

import fastlayers
from _tolerances import rand
from fastlayers import reference as ref


def _rms_args(device, dtype=torch.bfloat16, hidden=769):
    x = rand(3, 5, hidden, dtype=dtype, device=device)
    w = rand(hidden, dtype=dtype, device=device)
    r = rand(3, 5, hidden, dtype=dtype, device=device)
    return x, w, r


def _opcheck_cases(device):
    x, w, r = _rms_args(device)
    xf, wf, rf = _rms_args(device, torch.float32, 64)
    ops = torch.ops.fastlayers
    yield ops.rms_norm.default, (x, w, 1e-6, 0.0)
    yield ops.rms_norm.default, (xf.requires_grad_(), wf.requires_grad_(), 1e-5, 1.0)
    yield ops.fused_add_rms_norm.default, (x, r, w, 1e-6, 0.0)
    yield (
        ops.fused_add_rms_norm.default,
        (xf.detach().requires_grad_(), rf.requires_grad_(), wf, 1e-6, 1.0),
    )
    yield ops.rms_norm_fp8.default, (x, w, 1e-6)
    yield ops.fused_add_rms_norm_fp8.default, (x, r, w, 1e-6)
    yield ops.rms_norm_backward.default, (r, x, w, 1e-6, 0.0, None)
    yield ops.rms_norm_backward.default, (r, x, w, 1e-6, 1.0, r.clone())
    yield ops.rms_norm_out.default, (x, w, 1e-6, 0.0, torch.empty_like(x))
    yield ops.fused_add_rms_norm_inplace.default, (x.clone(), r.clone(), w, 1e-6, 1.0)


def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


class _Block(torch.nn.Module):
    """A decoder-style block: pre-norm, projection, fused residual norm."""

    def __init__(self, hidden):
        super().__init__()
        self.norm1 = fastlayers.RMSNorm(hidden)
        self.proj = torch.nn.Linear(hidden, hidden)
        self.norm2 = fastlayers.RMSNorm(hidden, weight_offset=1.0)

    def forward(self, x):
        h = self.proj(self.norm1(x))
        y, residual = self.norm2(h, x)
        return y + residual


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    block = _Block(256).to(device)
    x = rand(4, 256, dtype=torch.float32, device=device)
    compiled = torch.compile(block, fullgraph=True, backend=backend)  # raises on any graph break
    torch.testing.assert_close(compiled(x), block(x))
    # Training through the compiled graph uses the registered backward.
    x.requires_grad_()
    compiled(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert block.norm1.weight.grad is not None


def test_torch_compile_fp8(device):
    torch._dynamo.reset()
    x, w, r = _rms_args(device, hidden=4096)
    fn = torch.compile(
        lambda a, b, c: fastlayers.rms_norm_fp8(a, b, residual=c),
        fullgraph=True,
        backend="aot_eager",
    )
    q, scale, s = fn(x, w, r)
    q_ref, scale_ref, s_ref = ref.rms_norm_fp8(x, w, residual=r)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad input: a ValueError/TypeError naming the argument, never a crash or a wrong result.
# ---------------------------------------------------------------------------------------------
def _bad_calls(device):
    x, w, r = _rms_args(device, torch.float32, 64)
    yield (
        "wrong x dtype",
        lambda: fastlayers.rms_norm(x.double(), w),
        TypeError,
        "x must be float32",
    )
    yield "integer x", lambda: fastlayers.rms_norm(x.int(), w), TypeError, "x must be float32"
    yield (
        "0-dim x",
        lambda: fastlayers.rms_norm(x[0, 0, 0], w),
        ValueError,
        "at least one dimension",
    )
    yield (
        "x not a tensor",
        lambda: fastlayers.rms_norm(x.tolist(), w),
        TypeError,
        "x must be a torch.Tensor",
    )
    yield (
        "hidden mismatch",
        lambda: fastlayers.rms_norm(x, w[:63]),
        ValueError,
        "weight must have shape (64,)",
    )
    yield (
        "2-D weight",
        lambda: fastlayers.rms_norm(x, w[None]),
        ValueError,
        "weight must have shape",
    )
    yield (
        "weight dtype",
        lambda: fastlayers.rms_norm(x.half(), w.bfloat16()),
        TypeError,
        "weight must have x's dtype",
    )
    yield (
        "weight on meta",
        lambda: fastlayers.rms_norm(x, w.to("meta")),
        ValueError,
        "weight is on meta",
    )
    yield (
        "negative eps",
        lambda: fastlayers.rms_norm(x, w, -1.0),
        ValueError,
        "eps must be finite and >= 0",
    )
    yield (
        "eps not a number",
        lambda: fastlayers.rms_norm(x, w, "1e-6"),
        TypeError,
        "eps must be a float",
    )
    yield (
        "residual shape",
        lambda: fastlayers.fused_add_rms_norm(x, r[:, :1], w),
        ValueError,
        "residual must have x's shape",
    )
    yield (
        "residual dtype",
        lambda: fastlayers.fused_add_rms_norm(x, r.half(), w),
        TypeError,
        "residual must have x's dtype",
    )
    yield (
        "fp8 residual",
        lambda: fastlayers.rms_norm_fp8(x, w, residual=r.bfloat16()),
        TypeError,
        "residual must have x's dtype",
    )
    yield (
        "grad_y shape",
        lambda: fastlayers.rms_norm_backward(r[:1], x, w),
        ValueError,
        "grad_y must have x's shape",
    )
    yield (
        "hidden size 0",
        lambda: fastlayers.rms_norm(x[..., :0], w[:0]),
        ValueError,
        "hidden size 0",
    )


def test_bad_input_raises_clear_errors(device):
    for name, call, exc, message in _bad_calls(device):
        try:
            call()
        except exc as e:
            assert message in str(e), f"{name}: {type(e).__name__}: {e}"
        else:
            pytest.fail(f"{name}: no {exc.__name__} raised")


def test_reference_runs_on_devices_without_kernels():
    """Meta tensors go through the fake; other devices get the reference."""
    x = torch.empty(2, 3, 8, device="meta")
    w = torch.empty(8, device="meta")
    assert fastlayers.rms_norm(x, w).shape == (2, 3, 8)
    q, scale = fastlayers.rms_norm_fp8(x, w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (2, 3, 1)


def test_poisoned_outputs_are_nan():
    """The poisoning the other tests rely on really fills fresh outputs."""
    from fastlayers.ops import _common

    t = _common.empty((4, 5), torch.bfloat16, torch.device("cpu"))
    assert torch.isnan(t.float()).all()
    q = _common.empty((3,), torch.float8_e4m3fn, torch.device("cpu"))
    assert torch.isnan(q.float()).all()


def test_direct_call_only_where_the_dispatcher_would_do_nothing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastlayers.ops._common import direct_call_ok

    x, w = torch.randn(4, 8), torch.nn.Parameter(torch.randn(8))
    assert not direct_call_ok(x, w)  # w requires grad and grad mode is on
    with torch.no_grad():
        assert direct_call_ok(x, w, None)
        with FakeTensorMode():
            assert not direct_call_ok(torch.empty(4, 8), torch.empty(8))

        class Sub(torch.Tensor):
            pass

        assert not direct_call_ok(x.as_subclass(Sub), w)
        assert not torch.vmap(lambda r: torch.tensor(direct_call_ok(r)))(x).any()
    # Both routes compute the same thing.
    with torch.no_grad():
        direct = fastlayers.rms_norm(x, w)
    torch.testing.assert_close(direct, torch.ops.fastlayers.rms_norm(x, w, 1e-6, 0.0).detach())


@pytest.mark.parametrize("compiled", [True, False], ids=["kernels", "reference"])
@pytest.mark.parametrize("op", ["ultrafast_ff", "fff_hard", "peer_experts"])
def test_outputs_of_differentiable_ops_take_in_place_changes(op, compiled, monkeypatch):
    """The outputs of an op with several outputs, its inputs requiring grad, may be changed in
    place (Falcon's ``mlp_output += attention_output``): on the reference route they were views
    (a reshape last), which autograd refuses to change for a function with several outputs."""
    from fastlayers import ops

    if not compiled:
        monkeypatch.setattr(fastlayers._ext, "C", None)

    def mk(*shape):
        return torch.randn(*shape, requires_grad=True)

    x = mk(2, 3, 16)
    out = {
        "ultrafast_ff": lambda: ops.fff.ultrafast_ff(x, mk(7, 16), mk(7, 16), mk(7)),
        "fff_hard": lambda: ops.fff.fff_hard(
            x, mk(3, 16), mk(3), mk(4, 16, 8), mk(4, 8), mk(4, 8, 16), mk(4, 16)
        ),
        "peer_experts": lambda: ops.peer.peer_experts(
            x, torch.randint(0, 10, (2, 3, 4)), mk(2, 3, 4), mk(10, 16), mk(10, 16)
        ),
    }[op]()
    y = out[0]
    want = y.detach() + 1
    y.add_(1.0)
    torch.testing.assert_close(y.detach(), want)
    y.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
