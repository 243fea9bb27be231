# SPDX-License-Identifier: Apache-2.0
"""RMSNorm backward (dx, dweight) through autograd, against the reference and float64 autograd."""

import os
import subprocess
import sys

import pytest
import torch

import fastlayers
from _tolerances import assert_close_to_oracle, rand
from fastlayers import reference as ref

HIDDEN_SIZES = [8, 111, 768, 769, 4096, 5120, 5125, 8192, 16384, 20000]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _float64_grads(fn, x, w, dy, *extra):
    """Exact gradients: autograd through the reference in float64 (no rounding anywhere)."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    out = fn(x64, w64, *extra)
    out.backward(dy.double())
    return x64.grad, w64.grad


@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_rms_norm_backward(device, hidden, dtype, weight_offset):
    x = rand(6, hidden, dtype=dtype, device=device, scale=2.0).requires_grad_()
    w = rand(hidden, dtype=dtype, device=device).requires_grad_()
    dy = rand(6, hidden, dtype=dtype, device=device)
    fastlayers.rms_norm(x, w, 1e-6, weight_offset).backward(dy)
    dx_ref, dw_ref = ref.rms_norm_backward(dy, x.detach(), w.detach(), 1e-6, weight_offset)
    dx64, dw64 = _float64_grads(lambda a, b: ref.rms_norm(a, b, 1e-6, weight_offset), x, w, dy)
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    assert_close_to_oracle(x.grad, dx_ref, dx64, name="dx")
    assert_close_to_oracle(w.grad, dw_ref, dw64, name="dw")


def test_reference_backward_matches_float64_autograd():
    """The reference backward formula is the derivative of the reference forward."""
    x = rand(4, 3, 257, dtype=torch.float64, device="cpu").requires_grad_()
    w = rand(257, dtype=torch.float64, device="cpu").requires_grad_()
    dy = rand(4, 3, 257, dtype=torch.float64, device="cpu")
    for offset in (0.0, 1.0):
        x.grad = w.grad = None
        ref.rms_norm(x, w, 1e-5, offset).backward(dy)
        dx, dw = ref.rms_norm_backward(dy, x.detach(), w.detach(), 1e-5, offset)
        torch.testing.assert_close(dx, x.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dw, w.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("hidden", [111, 4096, 5125])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_backward(device, hidden, dtype):
    x = rand(2, 3, hidden, dtype=dtype, device=device).requires_grad_()
    res = rand(2, 3, hidden, dtype=dtype, device=device).requires_grad_()
    w = rand(hidden, dtype=dtype, device=device).requires_grad_()
    dy = rand(2, 3, hidden, dtype=dtype, device=device)
    dres_out = rand(2, 3, hidden, dtype=dtype, device=device)
    y, new_res = fastlayers.fused_add_rms_norm(x, res, w)
    torch.autograd.backward([y, new_res], [dy, dres_out])

    s = (x + res).detach()
    dx_ref, dw_ref = ref.rms_norm_backward(dy, s, w.detach(), 1e-6, 0.0, dres_out)
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, res, w))
    y64, s64 = ref.fused_add_rms_norm(x64, r64, w64)
    torch.autograd.backward([y64, s64], [dy.double(), dres_out.double()])
    assert_close_to_oracle(x.grad, dx_ref, x64.grad, name="dx")
    assert torch.equal(x.grad, res.grad), "x and residual receive the same gradient"
    assert_close_to_oracle(w.grad, dw_ref, w64.grad, name="dw")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_float32_weight(device, dtype):
    x = rand(5, 769, dtype=dtype, device=device).requires_grad_()
    w = rand(769, dtype=torch.float32, device=device).requires_grad_()
    dy = rand(5, 769, dtype=dtype, device=device)
    fastlayers.rms_norm(x, w).backward(dy)
    assert w.grad.dtype == torch.float32 and x.grad.dtype == dtype
    dx_ref, dw_ref = ref.rms_norm_backward(dy, x.detach(), w.detach())
    dx64, dw64 = _float64_grads(ref.rms_norm, x, w, dy)
    assert_close_to_oracle(x.grad, dx_ref, dx64, name="dx")
    assert_close_to_oracle(w.grad, dw_ref, dw64, name="dw")


def test_backward_strided_input(device):
    base = rand(8, 4096 + 64, dtype=torch.bfloat16, device=device)
    x = base[:, 32 : 32 + 4096].requires_grad_()
    w = rand(4096, dtype=torch.bfloat16, device=device).requires_grad_()
    dy = rand(8, 4096, dtype=torch.bfloat16, device=device).t().contiguous().t()  # strided dy too
    fastlayers.rms_norm(x, w).backward(dy)
    dx_ref, dw_ref = ref.rms_norm_backward(dy, x.detach(), w.detach())
    dx64, dw64 = _float64_grads(ref.rms_norm, x, w, dy)
    assert_close_to_oracle(x.grad, dx_ref, dx64, name="dx")
    assert_close_to_oracle(w.grad, dw_ref, dw64, name="dw")


def test_strided_weight_forward_and_backward(device):
    """A non-contiguous weight (a view of every other element) is read correctly: the contiguous
    copy the kernels see must outlive the launch."""
    x = rand(6, 1000, dtype=torch.float32, device=device)
    w_base = rand(2000, dtype=torch.float32, device=device)
    for _ in range(3):  # repeated: a freed copy would be overwritten by later allocations
        w = w_base[::2].detach().requires_grad_()
        xg = x.clone().requires_grad_()
        y = fastlayers.rms_norm(xg, w)
        assert_close_to_oracle(y, ref.rms_norm(x, w.detach()), ref.rms_norm(x.double(), w.double()))
        dy = rand(6, 1000, dtype=torch.float32, device=device)
        y.backward(dy)
        dx_ref, dw_ref = ref.rms_norm_backward(dy, x, w.detach())
        dx64, dw64 = _float64_grads(ref.rms_norm, x, w, dy)
        assert_close_to_oracle(xg.grad, dx_ref, dx64, name="dx")
        assert_close_to_oracle(w.grad, dw_ref, dw64, name="dw")


def test_backward_empty_batch(device):
    x = rand(0, 256, dtype=torch.float32, device=device).requires_grad_()
    w = rand(256, dtype=torch.float32, device=device).requires_grad_()
    fastlayers.rms_norm(x, w).sum().backward()
    assert x.grad.shape == (0, 256)
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_backward_is_deterministic(device):
    x = rand(300, 4096, dtype=torch.bfloat16, device=device)
    w = rand(4096, dtype=torch.bfloat16, device=device)
    dy = rand(300, 4096, dtype=torch.bfloat16, device=device)
    first = fastlayers.rms_norm_backward(dy, x, w)
    for _ in range(3):
        again = fastlayers.rms_norm_backward(dy, x, w)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


_DW_SCRIPT = """
import hashlib, torch, fastlayers
torch.manual_seed(1)
x = torch.randn(999, 1000); w = torch.randn(1000); dy = torch.randn(999, 1000)
dx, dw = fastlayers.rms_norm_backward(dy, x, w)
print(hashlib.sha256(dw.numpy().tobytes()).hexdigest())
"""


def test_cpu_dweight_independent_of_thread_count():
    outs = []
    for threads in ("1", "2", "3"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        run = subprocess.run(
            [sys.executable, "-c", _DW_SCRIPT], env=env, capture_output=True, text=True, check=True
        )
        outs.append(run.stdout.strip().splitlines()[-1])
    assert len(outs[0]) == 64 and outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_once_backward(device, dtype):
    """round_once (torch.nn.RMSNorm's rounding): dweight takes the unrounded x * r, as the
    reference; the gradients meet the float64 oracle, and equal torch.nn.RMSNorm's autograd."""
    x = rand(6, 769, dtype=dtype, device=device, scale=2.0).requires_grad_()
    w = rand(769, dtype=dtype, device=device).requires_grad_()
    dy = rand(6, 769, dtype=dtype, device=device)
    fastlayers.rms_norm(x, w, 1e-6, round_once=True).backward(dy)
    dx_ref, dw_ref = ref.rms_norm_backward(
        dy, x.detach(), w.detach(), 1e-6, 0.0, None, round_once=True
    )
    dx64, dw64 = _float64_grads(lambda a, b: ref.rms_norm(a, b, 1e-6, 0.0, True), x, w, dy)
    assert_close_to_oracle(x.grad, dx_ref, dx64, name="dx")
    assert_close_to_oracle(w.grad, dw_ref, dw64, name="dw")
    theirs = torch.nn.RMSNorm(769, eps=1e-6, device=device, dtype=dtype)
    with torch.no_grad():
        theirs.weight.copy_(w)
    xt = x.detach().clone().requires_grad_()
    theirs(xt).backward(dy)
    assert_close_to_oracle(x.grad, xt.grad, dx64, name="dx vs torch.nn.RMSNorm")
    assert_close_to_oracle(w.grad, theirs.weight.grad, dw64, name="dw vs torch.nn.RMSNorm")
