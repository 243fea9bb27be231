# SPDX-License-Identifier: Apache-2.0
"""patch_model on small Hugging Face Llama and Gemma models built from configs (no download):
logits against the unpatched model, generate() with the cache, state dict compatibility,
torch.compile, unpatching, and the quantizing / KV / skip-plan options."""

import copy

import pytest
import torch
from _decoders import assert_relative, on_both_routes

import fastlayers

transformers = pytest.importorskip("transformers")


def _llama(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _gemma():
    torch.manual_seed(0)
    cfg = transformers.GemmaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
        pad_token_id=0,
    )  # fmt: skip
    model = transformers.GemmaForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma's norms start at zero (1 + w); make them matter
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    return model


def _small(arch):
    def make():
        torch.manual_seed(0)
        cfg = getattr(transformers, f"{arch}Config")(
            vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            pad_token_id=0,
        )  # fmt: skip
        return getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()

    return make


CASES = [
    (_llama, torch.float32, 1e-4),
    (_llama, torch.bfloat16, 5e-2),
    (_gemma, None, 1e-4),
    (_small("Mistral"), None, 1e-4),
    (_small("Qwen2"), None, 1e-4),
]


@pytest.mark.parametrize("make,dtype,tol", CASES)
def test_rms_norm_patch_keeps_logits_cache_and_state_dict(make, dtype, tol):
    model = make(dtype) if dtype else make()
    ids = torch.randint(1, 128, (2, 10))
    with torch.no_grad():
        want = model(ids).logits
        ref_tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                    do_sample=False)  # fmt: skip
    keys = set(model.state_dict())
    report = fastlayers.patch_model(model)
    n_norms = sum(isinstance(m, fastlayers.RMSNorm) for m in model.modules())
    assert n_norms == 2 * model.config.num_hidden_layers + 1
    assert len(report.swapped) == n_norms and "fastlayers.RMSNorm" in str(report)
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        got = model(ids).logits
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                do_sample=False)  # fmt: skip
    if dtype != torch.bfloat16:  # bf16 rounding may flip a near-tie
        assert torch.equal(tokens, ref_tokens)
    fresh = make(dtype) if dtype else make()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits.float(), got.float(), rtol=tol, atol=tol)
    fastlayers.unpatch_model(model)
    assert not any(isinstance(m, fastlayers.RMSNorm) for m in model.modules())


PATCHES = {
    "linear": {"linear": "int4_fp8"},
    "kv_cache": {"kv_cache": "int4_rope_aware"},
    "mlp_fff": {"mlp": "fff"},
    "mlp_peer": {"mlp": "peer"},
}


@pytest.mark.parametrize("kind", ["rms_norm", "linear", "kv_cache", "mlp_fff", "mlp_peer"])
def test_patched_model_compiles(kind):
    """torch.compile of a model patched each way: the same logits, no graph break (the INT4 KV
    attention's query-scale cache looked at a version counter while compiling: 28 breaks), and,
    for the patches with autograd of their own, a compiled training step."""
    from torch._dynamo.utils import counters

    model = _llama()
    kw = PATCHES.get(kind, {})
    if kind == "kv_cache":
        kw = dict(kw, calibration=[torch.randint(1, 128, (2, 16))])
    fastlayers.patch_model(model, **kw)
    ids = torch.randint(1, 128, (1, 8))
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not counters["graph_break"], list(counters["graph_break"])
    if kind in ("linear", "kv_cache"):  # their own autograd (input gradient, straight-through)
        model.train()
        torch.compile(model)(ids, labels=ids).loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_quantize_kv_and_skip_options():
    model = _llama()
    ids = torch.randint(1, 128, (2, 16))
    calib = [torch.randint(1, 128, (2, 16)) for _ in range(2)]
    with torch.no_grad():
        want = model(ids).logits
    patched = copy.deepcopy(model)
    report = fastlayers.patch_model(
        patched, linear="int4_fp8", kv_cache="int4_rope_aware",
        skip_plan=fastlayers.SkipPlan.uniform(3, 1.5), calibration=calib,
    )  # fmt: skip
    text = str(report)
    assert "Int4Fp8Linear" in text and "INT4 KV" in text and "SkipPlan" in text
    assert isinstance(patched.lm_head, torch.nn.Linear)  # kept in float
    with torch.no_grad():
        got = patched(ids).logits
        cache = fastlayers.quant.Int4KVCache.for_model(patched)
        tokens = patched.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]),
                                  max_new_tokens=4, do_sample=False, cache=cache)  # fmt: skip
    assert torch.isfinite(got).all() and tokens.shape == (1, 20)
    assert ((got - want).norm() / want.norm()).item() < 1.0  # a degraded but sane model
    with pytest.raises(ValueError, match="calibration"):
        fastlayers.patch_model(copy.deepcopy(model), kv_cache="int4_rope_aware")
    with pytest.raises(ValueError, match="linear"):
        fastlayers.patch_model(copy.deepcopy(model), linear="int8")


def test_linear_takes_a_quantize_config():
    """linear=QuantizeConfig(...): every quantized layer has that config's group size, and finer
    groups quantize closer (groups of 32 against the default 128, on the same model, round to
    nearest so both see the same weights); a config made invalid after construction and other
    types are refused before the model changes."""
    model = _llama()
    ids = torch.randint(1, 128, (2, 16))
    with torch.no_grad():
        want = model(ids).logits
    errors = {}
    for g in (32, 128):
        patched = copy.deepcopy(model)
        config = fastlayers.QuantizeConfig(group_size=g, method="rtn", progress=False)
        report = fastlayers.patch_model(patched, rms_norm=False, linear=config)
        layers = [m for m in patched.modules() if isinstance(m, fastlayers.Int4Fp8Linear)]
        assert len(layers) == 3 * 7 and len(report.swapped) == len(layers)
        assert all(m.group_size == g for m in layers)
        with torch.no_grad():
            errors[g] = ((patched(ids).logits - want).norm() / want.norm()).item()
    assert 0 < errors[32] < errors[128]
    bad = fastlayers.QuantizeConfig(progress=False)
    bad.group_size = 33
    untouched = copy.deepcopy(model)
    with pytest.raises(ValueError, match="group_size"):
        fastlayers.patch_model(untouched, linear=bad)
    assert not any(isinstance(m, fastlayers.Int4Fp8Linear) for m in untouched.modules())
    with pytest.raises(ValueError, match="QuantizeConfig"):
        fastlayers.patch_model(copy.deepcopy(model), linear={"group_size": 32})


def test_demo_quick_runs_every_family():
    from fastlayers import demo

    text = demo.run(torch.device("cpu"), quick=True)
    for row in ("RMSNorm", "INT4 x FP8 linears", "RoPE-aware INT4 KV cache",
                "SkipPlan.uniform(1.5x)", "all of the above"):  # fmt: skip
        assert row in text
    rms = next(line for line in text.splitlines() if line.startswith("RMSNorm"))
    assert float(rms.split()[2]) < 1e-3  # max |dlogit| of the exact swap


@pytest.mark.parametrize("kind,cls", [("fff", "UltraFastFeedForward"), ("peer", "PEER")])
def test_mlp_swaps_are_new_modules_and_unpatch_restores(kind, cls):
    """mlp="fff" / "peer": every decoder feedforward becomes a fastlayers module of new parameters
    sized from the config (so outputs change), the model still runs forward and generate(), the
    module trains (gradients reach its parameters), and unpatch_model restores the original."""
    model = _llama()
    ids = torch.randint(1, 128, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
    report = fastlayers.patch_model(model, rms_norm=False, mlp=kind)
    mlps = [layer.mlp for layer in model.model.layers]
    assert all(type(m).__name__ == cls for m in mlps) and len(report.swapped) == 3
    if kind == "fff":  # 2^(depth+1) - 1 <= intermediate_size (256): depth 7, 255 neurons
        assert mlps[0].depth == 7 and mlps[0].n_nodes == 255
    else:  # K^2 >= 256 experts with K a power of two; queries min(256, hidden) per head
        m = mlps[0]
        assert (m.num_experts, m.heads, m.topk, m.dim_key) == (256, 8, 16, 128)
        from fastlayers.patch import _new_mlp

        big = _new_mlp("peer", 4096, 11008, torch.empty(0, device="meta"))  # a 7B Llama's sizes
        assert big.num_experts == 128**2 and big.query.weight.shape == (8 * 256, 4096)
    logits = model(ids).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, want)
    logits.float().pow(2).mean().backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in mlps[0].parameters())
    with torch.no_grad():
        out = model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=3,
                             do_sample=False)  # fmt: skip
    assert out.shape == (1, 15)
    fastlayers.unpatch_model(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


@pytest.mark.parametrize("kind", list(PATCHES))
def test_every_patch_runs_and_trains_in_bfloat16(kind):
    """A bf16 model patched each way: the forward is close to the fp32 model patched the same way
    (same weights), and a training step gives finite gradients (the INT4 KV attention without a
    cache mixed an fp32 key with bf16 queries before: 'expected scalar type Float')."""
    calib = [torch.randint(1, 128, (2, 16))]
    kw = dict(PATCHES[kind], calibration=calib) if kind == "kv_cache" else PATCHES[kind]
    ids = torch.randint(1, 128, (2, 10))
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _llama()
        torch.manual_seed(1)  # the same new parameters (fff / peer) for both dtypes
        fastlayers.patch_model(model, **kw)
        model.to(dtype)
        with torch.no_grad():
            logits[dtype] = model(ids).logits.float()
        model.train()
        model(ids, labels=ids).loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    want = logits[torch.float32]
    assert bool(torch.isfinite(logits[torch.bfloat16]).all())
    # bf16 moves this model's logits by ~0.8 % unpatched and ~5 % with INT4 weights or KV (its
    # roundings flip quantization levels); fff / peer route by hard decisions, which bf16 flips
    if not kind.startswith("mlp"):
        assert ((logits[torch.bfloat16] - want).norm() / want.norm()).item() < 0.1


_NORM = {"rms_norm_fwd", "rms_norm_bwd"}
_KERNELS = {  # what each patch's forward, generate and training step must reach on the CPU
    "rms_norm": _NORM,
    "linear": _NORM | {"int4_fp8_gemm", "quantize_fp8_per_token"},
    "kv_cache": _NORM | {"int4_kv_decode", "kv_quantize"},
    "mlp_fff": _NORM | {"fff_ultra_fwd", "fff_ultra_bwd"},
    "mlp_peer": _NORM | {"peer_retrieve", "peer_experts_fwd", "peer_experts_bwd"},
    "skip_plan": _NORM,
}
_KERNELS["all"] = _KERNELS["linear"] | _KERNELS["kv_cache"] | _KERNELS["mlp_fff"]


@pytest.mark.parametrize("kind", list(_KERNELS))
def test_patched_model_kernels_match_the_reference_route(kind, monkeypatch):
    """One patched model run twice, with its kernels and with the compiled part switched off (every
    op on its reference): the logits, a training step's loss and parameter gradients, greedy
    generate() (with the INT4 KV cache where the patch has one) and self-speculative decoding (no
    skip plan installed) agree (fp32: the two routes sum in different orders). The ops' own tests
    compare each kernel with its reference; this one the routes through a whole model (module
    caches and plans, skip plans, the cache)."""
    if fastlayers._ext.C is None:
        pytest.skip("needs the compiled extension")
    calib = [torch.randint(1, 128, (2, 16))]
    kw = {
        "rms_norm": {},
        "skip_plan": {"skip_plan": fastlayers.SkipPlan.uniform(3, 1.5)},
        "all": {"linear": "int4_fp8", "kv_cache": "int4_rope_aware", "mlp": "fff",
                "skip_plan": fastlayers.SkipPlan.uniform(3, 1.5)},
    }.get(kind, PATCHES.get(kind))  # fmt: skip
    if "kv_cache" in kw:
        kw = dict(kw, calibration=calib)
    model = _llama()
    torch.manual_seed(1)
    fastlayers.patch_model(model, **kw)
    ids = torch.randint(1, 128, (2, 12))

    def step(m):
        with torch.no_grad():
            logits = m(ids).logits
            cache = fastlayers.quant.Int4KVCache.for_model(m) if "kv_cache" in kw else None
            tokens = m.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]),
                                max_new_tokens=5, do_sample=False,
                                **({"cache": cache} if cache is not None else {}))  # fmt: skip
            draft = (None, None)  # (self-speculative decoding refuses a skip plan)
            if "skip_plan" not in kw:
                draft = fastlayers.self_speculative_generate(m, ids[:1], 1, 6, num_draft=3)
        m.train()
        loss = m(ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        return logits, tokens, loss.detach(), grads, draft

    got, want, used = on_both_routes(model, step, monkeypatch)
    assert _KERNELS[kind] <= used, sorted(used)
    (lk, tk, sk, gk, dk), (lr, tr, sr, gr, dr) = got, want
    assert_relative(lk, lr, 1e-5, "logits")
    assert torch.equal(tk, tr)
    assert dk[1] == dr[1] and (dk[0] is None or torch.equal(dk[0], dr[0]))  # (drafts accepted)
    torch.testing.assert_close(sk, sr, rtol=1e-5, atol=1e-6)
    assert gk.keys() == gr.keys() and gk
    for n in gr:
        assert_relative(gk[n], gr[n], 1e-4, n)
