# SPDX-License-Identifier: Apache-2.0
"""Every module built and run under ``torch.inference_mode`` (how serving code often loads and runs
a model): the same outputs as the same weights built and run outside it. Inference tensors have no
version counter, so nothing may key a cache on one (the modules' weight plans, the sub-key panels
of PEER and the inverse query scale of the INT4 KV attention did)."""

import copy

import pytest
import torch

import fastlayers
from _tolerances import rand as _rand


def rand(*shape):  # fresh random fp32 CPU inputs
    return _rand(*shape, dtype=torch.float32, device="cpu")


# name -> (module factory, input factory)
CASES = {
    "RMSNorm": (lambda: fastlayers.RMSNorm(40), lambda: (rand(3, 40),)),
    "UltraFastFeedForward batch 1": (
        lambda: fastlayers.UltraFastFeedForward(48, 40, 4),
        lambda: (rand(1, 48),),
    ),
    "UltraFastFeedForward bucketed": (
        lambda: fastlayers.UltraFastFeedForward(48, 40, 6),
        lambda: (rand(300, 48),),
    ),
    "FastFeedForward": (lambda: fastlayers.FastFeedForward(48, 40, 3, 8), lambda: (rand(5, 48),)),
    "PEER": (lambda: fastlayers.PEER(48, 256, heads=2, topk=4), lambda: (rand(2, 5, 48),)),
    "Int4Fp8Linear": (
        lambda: fastlayers.Int4Fp8Linear.from_linear(torch.nn.Linear(64, 24)),
        lambda: (rand(3, 64),),
    ),
    "RoutedSelfAttention": (
        lambda: fastlayers.RoutedSelfAttention(64, 4, num_kv_heads=2, capacity=0.5),
        lambda: (rand(2, 9, 64),),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_module_built_and_run_under_inference_mode(name):
    make, make_inputs = CASES[name]
    module, inputs = make().eval(), make_inputs()
    with torch.no_grad():
        want = module(*inputs)
    state = module.state_dict()
    with torch.inference_mode():
        inner = make().eval()  # built under inference mode: inference-tensor weights
        inner.load_state_dict(state)
        got = inner(*inputs)
        again = inner(*inputs)  # (any cache built by the first call is used or refused)
    assert not got.requires_grad
    for out in (got, again):
        torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_quant_attention_with_a_cache_under_inference_mode():
    """RopeAwareQuantAttention (its inverse query scale is cached per post_scale version): prefill
    and decode steps under inference mode, with a post_scale made and changed there."""
    hq, hkv, d = 4, 2, 64
    post = torch.rand(hkv, d) + 0.5
    q, k, v = rand(1, hq, 12, d), rand(1, hkv, 12, d), rand(1, hkv, 12, d)
    cos, sin = rand(12, d), rand(12, d)
    ref = fastlayers.RopeAwareQuantAttention(hq, hkv, d, 32, post)
    with torch.inference_mode():
        m = fastlayers.RopeAwareQuantAttention(hq, hkv, d, 32, post.clone())
        for scale in (1.0, 2.0):
            if scale != 1.0:
                m.post_scale.mul_(scale)  # in place, on an inference tensor: no version to see
            ref.post_scale.copy_(m.post_scale)
            caches = m.new_cache(), ref.new_cache()
            for lo, hi in ((0, 10), (10, 11), (11, 12)):
                sl = slice(lo, hi)
                args = (q[:, :, sl], k[:, :, sl], v[:, :, sl], cos[sl], sin[sl])
                got = m(*args, caches[0])
                with torch.no_grad():
                    want = ref.forward_reference(*args, caches[1])
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_patched_hugging_face_model_under_inference_mode():
    transformers = pytest.importorskip("transformers")
    from fastlayers import quant

    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 128, (1, 10))
    calib = [torch.randint(1, 128, (1, 16))]
    outside = copy.deepcopy(base)
    fastlayers.patch_model(outside, linear="int4_fp8", kv_cache="int4_rope_aware", mlp="fff",
                           calibration=calib)  # fmt: skip
    kw = dict(max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        want = outside.generate(ids, cache=quant.Int4KVCache.for_model(outside), **kw)
    with torch.inference_mode():
        inside = copy.deepcopy(base)
        fastlayers.patch_model(inside, linear="int4_fp8", kv_cache="int4_rope_aware", mlp="fff",
                               calibration=calib)  # fmt: skip
        inside.load_state_dict(outside.state_dict())
        got = inside.generate(ids, cache=quant.Int4KVCache.for_model(inside), **kw)
    assert torch.equal(got, want)
