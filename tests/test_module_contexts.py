# SPDX-License-Identifier: Apache-2.0
"""The modules in the contexts users run them in. Under ``torch.autocast`` (CPU bfloat16: the
projections inside PEER and the routed attention then return bfloat16 while the tables and the
residual stay float32; both raised a dtype error before). In eval mode with an input that
requires grad: the input gets a gradient (FastFeedForward's hard descent and Int4Fp8Linear gave
none, only a warning). Built on the meta device and materialized with ``to_empty`` (how large
models are loaded): Int4Fp8Linear raised "Cannot copy out of meta tensor"."""

import pytest
import torch
from test_inference_mode import CASES

import fastlayers


def _first(y):
    return y[0] if isinstance(y, tuple) else y


@pytest.mark.parametrize("name", list(CASES))
def test_module_under_autocast(name):
    make, make_inputs = CASES[name]
    torch.manual_seed(0)
    module, inputs = make().eval(), make_inputs()
    with torch.no_grad():
        want = _first(module(*inputs)).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _first(module(*inputs))
    assert got.shape == want.shape and bool(torch.isfinite(got).all())
    # bfloat16 projections (8 bits of mantissa) feeding float32 math: a few percent at most
    assert ((got.float() - want).norm() / want.norm()).item() < 0.05


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("autocast", [False, True])
def test_module_input_gets_a_gradient_in_eval(name, autocast):
    make, make_inputs = CASES[name]
    torch.manual_seed(0)
    module = make().eval()
    x, *rest = make_inputs()
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = _first(module(x, *rest))
    y.float().square().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert bool(torch.isfinite(x.grad).all()) and bool(x.grad.abs().sum() > 0)


def _rand(*shape):
    return torch.randn(*shape).requires_grad_()


# inference ops: they run on inputs that require grad; a backward through them raises
NO_BACKWARD = {
    "rms_norm_fp8": lambda: fastlayers.rms_norm_fp8(_rand(3, 32), torch.rand(32))[1],
    "fused_add_rms_norm_fp8": lambda: fastlayers.rms_norm_fp8(
        _rand(3, 32), torch.rand(32), residual=torch.randn(3, 32)
    )[1],
    "q_quantize": lambda: fastlayers.ops.q_quantize(_rand(1, 2, 3, 16), None, fp8=True),
    "kv_quantize": lambda: fastlayers.ops.kv_quantize(_rand(1, 2, 3, 16), 16)[1].float(),
}


@pytest.mark.parametrize("op", list(NO_BACKWARD))
def test_inference_ops_refuse_a_backward(op):
    y = NO_BACKWARD[op]()
    assert y.requires_grad
    with pytest.raises(RuntimeError, match=f"fastlayers.{op} has no backward"):
        y.float().sum().backward()


def test_inference_op_compiles_with_inputs_that_require_grad():
    """torch.compile traces the backward of a graph whose inputs require grad even when it never
    runs: an op without a backward must not fail that trace (it did), and the compiled backward
    raises when it is run, as eager does."""

    def f(x, w):
        y, scale = fastlayers.rms_norm_fp8(x, w)
        return y.float() * scale

    x, w = torch.randn(3, 32), torch.rand(32).requires_grad_()
    got = torch.compile(f, fullgraph=True)(x, w)
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), f(x, w).detach(), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="fastlayers.rms_norm_fp8 has no backward"):
        got.sum().backward()


@pytest.mark.parametrize("name", list(CASES))
def test_module_built_on_meta_then_to_empty(name):
    make, make_inputs = CASES[name]
    torch.manual_seed(0)
    module, inputs = make().eval(), make_inputs()
    with torch.no_grad():
        want = _first(module(*inputs))
    with torch.device("meta"):
        lazy = make()
    lazy = lazy.to_empty(device="cpu").eval()
    lazy.load_state_dict(module.state_dict())
    with torch.no_grad():
        got = _first(lazy(*inputs))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_quant_attention_built_on_meta_then_to_empty():
    post = torch.rand(2, 32) + 0.5
    module = fastlayers.RopeAwareQuantAttention(4, 2, 32, 16, post)
    with torch.device("meta"):
        lazy = fastlayers.RopeAwareQuantAttention(4, 2, 32, 16, post.to("meta"))
    lazy = lazy.to_empty(device="cpu")
    assert lazy.post_scale.dtype == torch.float32 and lazy.post_scale.device.type == "cpu"
    lazy.load_state_dict(module.state_dict())
    q, k, v = torch.randn(1, 4, 5, 32), torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32)
    cos, sin = torch.rand(5, 32), torch.rand(5, 32)
    torch.testing.assert_close(lazy(q, k, v, cos, sin), module(q, k, v, cos, sin), rtol=0, atol=0)
