# SPDX-License-Identifier: Apache-2.0
"""fastlayers.RMSNorm as a drop-in for torch.nn.RMSNorm and the Hugging Face Llama/Gemma norms."""

import pytest
import torch

import fastlayers
from _tolerances import assert_close_to_oracle, rand
from fastlayers import reference as ref


class HFLlamaRMSNorm(torch.nn.Module):
    """transformers' LlamaRMSNorm, verbatim in its arithmetic (transformers is not a dependency)."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(torch.nn.Module):
    """transformers' GemmaRMSNorm arithmetic: (1 + w) in fp32, one cast at the end."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        output = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _randomize(module, device, dtype):
    module.to(device=device, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(rand(*module.weight.shape, dtype=dtype, device=device))
    return module


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_hf_llama_rmsnorm(device, dtype):
    hf = _randomize(HFLlamaRMSNorm(4096, eps=1e-5), device, dtype)
    ours = fastlayers.RMSNorm(4096, eps=1e-5, device=device, dtype=dtype)
    ours.load_state_dict(hf.state_dict())  # same key: "weight"
    x = rand(2, 7, 4096, dtype=dtype, device=device, scale=3.0)
    y_hf = hf(x)
    assert y_hf.dtype == dtype
    # Same rounding points as HF; only the order of the fp32 sum of squares differs.
    oracle = ref.rms_norm(x.double(), hf.weight.double(), 1e-5)
    assert_close_to_oracle(ours(x), y_hf, oracle)
    if dtype != torch.float32:
        assert (ours(x) != y_hf).float().mean().item() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_nn_rmsnorm(device, dtype):
    theirs = _randomize(torch.nn.RMSNorm(769, eps=1e-6), device, dtype)
    ours = fastlayers.RMSNorm(769, eps=1e-6, device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    x = rand(5, 769, dtype=dtype, device=device)
    oracle = ref.rms_norm(x.double(), theirs.weight.double(), 1e-6)
    with torch.no_grad():
        assert_close_to_oracle(ours(x), theirs(x), oracle)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_gemma_rmsnorm(device, dtype):
    gemma = _randomize(GemmaRMSNorm(2048), device, dtype)
    ours = fastlayers.RMSNorm(2048, weight_offset=1.0, device=device, dtype=dtype)
    assert torch.equal(ours.weight, torch.zeros_like(ours.weight)), "Gemma weights start at 0"
    ours.load_state_dict(gemma.state_dict())
    x = rand(3, 2048, dtype=dtype, device=device, scale=5.0)
    oracle = ref.rms_norm(x.double(), gemma.weight.double(), 1e-6, 1.0)
    with torch.no_grad():
        assert_close_to_oracle(ours(x), gemma(x), oracle)


def test_residual_forward_matches_hf_decoder_order(device):
    norm = _randomize(fastlayers.RMSNorm(1024), device, torch.bfloat16)
    hf = HFLlamaRMSNorm(1024).to(device=device, dtype=torch.bfloat16)
    hf.load_state_dict(norm.state_dict())
    h = rand(4, 1024, dtype=torch.bfloat16, device=device)
    residual = rand(4, 1024, dtype=torch.bfloat16, device=device)
    y, new_residual = norm(h, residual)
    # HF decoder layer: hidden_states = residual + hidden_states, then norm(hidden_states)
    s = residual + h
    assert torch.equal(new_residual, s)
    with torch.no_grad():
        assert_close_to_oracle(y, hf(s), ref.rms_norm(s.double(), hf.weight.double()))


def test_module_api():
    m = fastlayers.RMSNorm(64, eps=1e-5)
    assert list(m.state_dict()) == ["weight"]
    assert m.variance_epsilon == 1e-5
    assert repr(m) == "RMSNorm(64, eps=1e-05)"
    assert "weight_offset=1.0" in repr(fastlayers.RMSNorm(64, weight_offset=1.0))
    assert fastlayers.RMSNorm([64]).hidden_size == 64  # torch.nn.RMSNorm-style normalized_shape
    with pytest.raises(ValueError, match="hidden_size"):
        fastlayers.RMSNorm((4, 64))
    with pytest.raises(ValueError, match="eps"):
        fastlayers.RMSNorm(64, eps=-1.0)
    m.weight.data.mul_(3)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_replaces_torch_nn_rmsnorm_with_its_rounding_and_eps(device, dtype, eps):
    """torch.nn.RMSNorm multiplies by the weight in fp32 and rounds once, and its eps=None is
    float32's epsilon for 16-bit inputs too: from_module (patch_model uses it) takes both. Before,
    bf16 outputs differed by one ulp on ~26 % of the elements, and eps=None became bf16's
    epsilon (0.0078), far off for small activations like these."""
    theirs = _randomize(torch.nn.RMSNorm(769, eps=eps), device, dtype)
    ours = fastlayers.RMSNorm.from_module(theirs)
    assert ours.round_once and ours.weight is theirs.weight
    x = rand(64, 769, dtype=dtype, device=device, scale=1e-2)
    with torch.no_grad():
        y, want = ours(x), theirs(x)
    if dtype == torch.float32:  # (summation order: a few ulp)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-7)
    else:
        assert (y != want).float().mean().item() < 0.01
    model = torch.nn.Sequential(torch.nn.RMSNorm(769, eps=eps).to(device=device, dtype=dtype))
    model[0].weight = theirs.weight
    fastlayers.patch_model(model)
    assert isinstance(model[0], fastlayers.RMSNorm) and model[0].round_once
    with torch.no_grad():
        assert torch.equal(model(x), y)


def test_from_module_shares_weight_and_reads_eps():
    hf = HFLlamaRMSNorm(128, eps=1e-5)
    m = fastlayers.RMSNorm.from_module(hf)
    assert m.weight is hf.weight and m.eps == 1e-5 and m.weight_offset == 0.0
    t = torch.nn.RMSNorm(128)  # eps=None: torch uses finfo(dtype).eps
    assert fastlayers.RMSNorm.from_module(t).eps == torch.finfo(torch.float32).eps
    assert fastlayers.RMSNorm.from_module(GemmaRMSNorm(128)).weight_offset == 1.0
    with pytest.raises(TypeError, match="module"):
        fastlayers.RMSNorm.from_module(torch.nn.ReLU())


def test_trains_like_hf(device):
    """A few SGD steps give the same weights as the HF module (up to fp32 rounding)."""
    torch.manual_seed(3)
    hf = _randomize(HFLlamaRMSNorm(256), device, torch.float32)
    ours = fastlayers.RMSNorm(256, device=device)
    ours.load_state_dict(hf.state_dict())
    opt_hf = torch.optim.SGD(hf.parameters(), lr=0.1)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    for _ in range(3):
        x = rand(8, 256, dtype=torch.float32, device=device)
        target = rand(8, 256, dtype=torch.float32, device=device)
        for mod, opt in ((hf, opt_hf), (ours, opt_ours)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(mod(x), target).backward()
            opt.step()
    torch.testing.assert_close(ours.weight, hf.weight, rtol=1e-5, atol=1e-6)
