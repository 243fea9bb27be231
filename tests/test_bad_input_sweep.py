# SPDX-License-Identifier: Apache-2.0
"""A sweep of bad input over every public op and module: each argument of a valid call is replaced,
one at a time, by a wrong dtype, a wrong or empty shape, a 0-dim or transposed tensor, a meta
tensor, non-finite values, a wrong scalar (0, -1, NaN, inf, 10**12), None, a list or a string.

The call must either work or raise ValueError/TypeError (the library's promise: a clear error
naming the argument, nothing that crashes the process or leaks an internal error). Whether a
working call computes the right thing is the family tests' business.
"""

import warnings

import pytest
import torch

import fastlayers
from _tolerances import rand
from fastlayers import quant
from fastlayers.ops import fff_hard, peer_experts, rms_norm_backward, ultrafast_ff
from fastlayers.ops.kvint4 import (
    int4_kv_attention,
    int4_kv_decode,
    kv_cache_write,
    kv_quantize,
    q_quantize,
)
from fastlayers.ops.kvint4_paged import (
    int4_kv_attention_paged,
    int4_kv_attention_paged_planned,
    int4_kv_attention_paged_varlen,
    int4_kv_decode_paged,
    kv_cache_write_paged,
    kv_cache_write_paged_planned,
)


def _r(*shape, dtype=torch.float32):
    return rand(*shape, dtype=dtype, device="cpu")


def _cases():
    """name -> (callable, valid positional arguments)."""
    torch.manual_seed(0)
    x, w = _r(5, 64), _r(64)
    qw = fastlayers.quantize_int4(_r(48, 256), 128)
    xq, xs = fastlayers.quantize_fp8_per_token(_r(5, 256))
    idx, cu = fastlayers.route_topk(torch.randn(2, 20), 0.5)
    pos, n = idx % 20, idx.shape[0]
    k, ks = quant.quantize_kv_int4(_r(2, 2, 12, 32), 16)
    v, vs = quant.quantize_kv_int4(_r(2, 2, 12, 32), 16)
    kp, ksp = quant.quantize_kv_int4(_r(3, 2, 8, 32), 16)  # 3 pages of 8 tokens
    table, seq_lens = (
        torch.tensor([[0, 1], [2, 0]], dtype=torch.int32),
        torch.tensor([10, 5], dtype=torch.int32),
    )
    cu_q = torch.tensor([0, 3, 5], dtype=torch.int32)
    step = quant.plan_paged_step(table, seq_lens, cu_q, 8, 3)  # (3 + 2 new tokens)
    nodes, leaves = 15, 4
    return {
        "rms_norm": (fastlayers.rms_norm, [x, w, 1e-6, 0.0]),
        "rms_norm(out=)": (lambda a, b, o: fastlayers.rms_norm(a, b, out=o), [x, w, _r(5, 64)]),
        "fused_add_rms_norm": (fastlayers.fused_add_rms_norm, [x, _r(5, 64), w]),
        "fused_add_rms_norm_": (fastlayers.fused_add_rms_norm_, [_r(5, 64), _r(5, 64), w]),
        "rms_norm_fp8": (fastlayers.rms_norm_fp8, [x, w, 1e-6, _r(5, 64)]),
        "rms_norm_backward": (rms_norm_backward, [_r(5, 64), x, w]),
        "ultrafast_ff": (
            ultrafast_ff,
            [_r(7, 32), _r(nodes, 32), _r(nodes, 16), _r(nodes), "gelu"],
        ),  # fmt: skip
        "fff_hard": (
            fff_hard,
            [
                _r(7, 32),
                _r(3, 32),
                _r(3),
                _r(leaves, 32, 8),
                _r(leaves, 8),
                _r(leaves, 8, 16),
                _r(leaves, 16),
            ],
        ),  # fmt: skip
        "peer_retrieve": (fastlayers.peer_retrieve, [_r(6, 2, 16), _r(2, 2, 8, 8), 4, "softmax"]),
        "peer_experts": (
            peer_experts,
            [_r(6, 24), torch.randint(0, 50, (6, 8)), torch.rand(6, 8), _r(50, 24), _r(50, 24)],
        ),
        "quantize_int4": (fastlayers.quantize_int4, [_r(48, 256), 128]),
        "quantize_fp8_per_token": (fastlayers.quantize_fp8_per_token, [_r(5, 256)]),
        "int4_fp8_gemm": (fastlayers.int4_fp8_gemm, [xq, xs, qw, _r(48), torch.bfloat16]),
        "varlen_attention": (
            fastlayers.varlen_attention,
            [_r(n, 4, 32), _r(n, 2, 32), _r(n, 2, 32), cu, cu, pos, pos],
        ),
        "route_topk": (fastlayers.route_topk, [torch.randn(2, 20), 0.5]),
        "route_threshold": (fastlayers.route_threshold, [torch.randn(2, 20), 0.1]),
        "gather_rows": (fastlayers.gather_rows, [_r(10, 8), torch.tensor([3, 1, -1])]),
        "scatter_add_gated": (
            fastlayers.scatter_add_gated,
            [_r(10, 8), torch.tensor([3, 1, -1]), _r(3, 8), torch.rand(3)],
        ),
        "kv_quantize": (kv_quantize, [_r(2, 2, 12, 32), 16]),
        "kv_cache_write": (
            kv_cache_write,
            [
                _r(2, 2, 3, 32),
                torch.zeros(2, 2, 12, 16, dtype=torch.uint8),
                torch.zeros(2, 2, 12, 2, dtype=torch.float8_e4m3fn),
                5,
                _r(2, 32).abs(),
            ],
        ),  # fmt: skip
        "q_quantize": (q_quantize, [_r(2, 4, 3, 32), _r(4, 32), _r(3, 32), _r(3, 32)]),
        "int4_kv_decode": (int4_kv_decode, [_r(2, 4, 32), k, ks, v, vs, 10]),
        "int4_kv_decode(starts)": (
            int4_kv_decode,
            [_r(2, 4, 32), k, ks, v, vs, 10, None, torch.tensor([0, 4], dtype=torch.int32)],
        ),
        "int4_kv_attention": (int4_kv_attention, [_r(2, 4, 3, 32), k, ks, v, vs, 10]),
        "int4_kv_attention_paged": (
            int4_kv_attention_paged,
            [_r(2, 4, 3, 32), kp, ksp, kp, ksp, table, seq_lens, 0.2, 1.5],
        ),
        "int4_kv_attention_paged_varlen": (
            int4_kv_attention_paged_varlen,
            [
                _r(5, 4, 32),
                kp,
                ksp,
                kp,
                ksp,
                table,
                seq_lens,
                torch.tensor([0, 3, 5], dtype=torch.int32),
                3,
                0.2,
                1.5,
                _r(4),
            ],
        ),  # fmt: skip
        "int4_kv_attention_paged_planned": (
            int4_kv_attention_paged_planned,
            [_r(5, 4, 32), kp, ksp, kp, ksp, step, 0.2, 1.5, _r(4)],
        ),
        "kv_cache_write_paged_planned": (
            kv_cache_write_paged_planned,
            [_r(5, 2, 32), kp.clone(), ksp.clone(), step, _r(2, 32).abs(), _r(5, 32), _r(5, 32)],
        ),
        "kv_cache_write_paged": (
            kv_cache_write_paged,
            [
                _r(3, 2, 32),
                kp.clone(),
                ksp.clone(),
                torch.tensor([5, -1, 17]),
                _r(2, 32).abs(),
                _r(3, 32),
                _r(3, 32),
            ],
        ),  # fmt: skip
        "int4_kv_decode_paged": (
            int4_kv_decode_paged,
            [_r(2, 4, 32), kp, ksp, kp, ksp, table, seq_lens, 0.2, 1.5, None, 2],
        ),
        "int4_kv_decode(softcap)": (
            int4_kv_decode,
            [_r(2, 4, 32), k, ks, v, vs, 10, 0.2, None, 2.0],
        ),
        "int4_kv_decode(num_splits)": (
            int4_kv_decode,
            [_r(2, 4, 32), k, ks, v, vs, 10, None, None, None, None, 3],
        ),
        "int4_kv_attention(softcap)": (
            int4_kv_attention,
            [_r(2, 4, 3, 32), k, ks, v, vs, 10, 0.2, 2.0],
        ),
        "RMSNorm": (fastlayers.RMSNorm(64), [x]),
        "UltraFastFeedForward": (fastlayers.UltraFastFeedForward(32, 16, depth=3), [_r(7, 32)]),
        "FastFeedForward": (
            fastlayers.FastFeedForward(32, 16, depth=2, leaf_width=4).eval(),
            [_r(7, 32)],
        ),
        "PEER": (fastlayers.PEER(32, 64, heads=2, topk=4, dim_key=8), [_r(3, 32)]),
        "Int4Fp8Linear": (int4_linear, [_r(5, 256)]),
        "Int4Fp8Linear((xq, xs))": (lambda a, b: int4_linear((a, b)), [xq, xs]),
    }


int4_linear = fastlayers.Int4Fp8Linear.from_linear(torch.nn.Linear(256, 48))


def _api_cases():
    """Constructors, the quantisation helpers and the RoPE-aware attention: name -> (callable,
    valid arguments)."""
    torch.manual_seed(0)
    from test_quant_attention import _tables

    cos, sin = _tables(9, 32)
    k_pre = _r(40, 2, 32)
    paged = quant.Int4PagedKVCache(1, 8, 4, 2, 32, 16)
    plan = paged.plan([paged.new_sequence()], 3)
    packed, scales = quant.quantize_kv_int4(_r(3, 32), 16)
    return {
        "RMSNorm()": (fastlayers.RMSNorm, [64, 1e-6, 0.0]),
        "UltraFastFeedForward()": (fastlayers.UltraFastFeedForward, [32, 16, 3, "gelu"]),
        "FastFeedForward()": (fastlayers.FastFeedForward, [32, 16, 2, 4, "gelu", 0.0, 0.0]),
        "PEER()": (fastlayers.PEER, [32, 64, 2, 4, 8]),
        "Int4Fp8Linear()": (fastlayers.Int4Fp8Linear, [256, 48, True, 128]),
        "RoutedSelfAttention()": (fastlayers.RoutedSelfAttention, [64, 4, 2, 16, 0.5]),
        "RopeAwareQuantAttention()": (fastlayers.RopeAwareQuantAttention, [4, 2, 32, 16]),
        "Int4PagedKVCache()": (quant.Int4PagedKVCache, [1, 8, 4, 2, 32, 16, 32]),
        "plan_paged_step": (
            quant.plan_paged_step,
            [
                torch.tensor([[0, 1], [2, 0]], dtype=torch.int32),
                torch.tensor([10, 5], dtype=torch.int32),
                torch.tensor([0, 3, 5]),
                8,
                3,
            ],
        ),  # fmt: skip
        "RopeAwareQuantAttention": (
            fastlayers.RopeAwareQuantAttention(4, 2, 32, 16),
            [_r(2, 4, 9, 32), _r(2, 2, 9, 32), _r(2, 2, 9, 32), cos, sin],
        ),
        "RopeAwareQuantAttention.forward_paged": (
            fastlayers.RopeAwareQuantAttention(4, 2, 32, 16).forward_paged,
            [_r(3, 4, 32), _r(3, 2, 32), _r(3, 2, 32), cos[:3], sin[:3], paged, 0, plan],
        ),
        "apply_rope": (quant.apply_rope, [_r(2, 2, 9, 32), cos, sin, "half"]),
        "rotate_pairs": (quant.rotate_pairs, [_r(2, 9, 32), "interleaved"]),
        "compute_pre_rope_scales": (quant.compute_pre_rope_scales, [k_pre, 8.0, "half"]),
        "compute_post_rope_scales": (quant.compute_post_rope_scales, [k_pre, 8.0, 4, "half"]),
        "quantize_kv_int4": (quant.quantize_kv_int4, [_r(3, 32), 16]),
        "dequantize_kv_int4": (quant.dequantize_kv_int4, [packed, scales]),
        "quantize_q_fp8": (quant.quantize_q_fp8, [_r(2, 4, 9, 32)]),
        "SkipPlan.uniform": (fastlayers.SkipPlan.uniform, [12, 1.5, 1, 1]),
        "SkipPlan.drop_attention": (fastlayers.SkipPlan.drop_attention, [12, 0.5]),
        "dequantize_int4": (
            fastlayers.dequantize_int4,
            [fastlayers.quantize_int4(_r(48, 256), 128), True],
        ),  # fmt: skip
    }


def _training_cases():
    """Modules called with autograd on (training paths): name -> (callable, valid arguments)."""
    torch.manual_seed(0)
    return {
        "UltraFastFeedForward (train)": (
            fastlayers.UltraFastFeedForward(32, 16, depth=3),
            [_r(7, 32)],
        ),  # fmt: skip
        "FastFeedForward (train)": (
            fastlayers.FastFeedForward(32, 16, depth=2, leaf_width=4).train(),
            [_r(7, 32)],
        ),  # fmt: skip
        "PEER (train)": (fastlayers.PEER(32, 64, heads=2, topk=4, dim_key=8), [_r(3, 32)]),
        "RMSNorm (train)": (fastlayers.RMSNorm(64), [_r(5, 64), _r(5, 64)]),
        "RoutedSelfAttention (train)": (
            fastlayers.RoutedSelfAttention(64, 4, 2, capacity=0.5),
            [_r(2, 10, 64)],
        ),  # fmt: skip
    }


def _mutations(a, huge: bool = True):
    """(label, replacement) for one argument (``huge``: include the scalar 10**12, which sizes of a
    constructor or plan cannot take: the allocation fails, as for torch.nn.Linear)."""
    if isinstance(a, torch.Tensor):
        fp8 = a.dtype == torch.float8_e4m3fn
        yield "float64", a.double() if not fp8 else a.float().double()
        yield "int", a.to(torch.int64) if a.is_floating_point() else a.to(torch.int16)
        yield "bool", (a.view(torch.uint8) if fp8 else a).bool()
        if a.is_floating_point():
            yield "float16", a.float().half()
            yield "nan", torch.full_like(a.float(), float("nan")).to(a.dtype)
            yield "inf", torch.full_like(a.float(), float("inf")).to(a.dtype)
        if a.dim() and a.shape[-1] > 1:
            yield "last dim - 1", a[..., :-1]
            yield "last dim + 1", torch.cat([a, a[..., :1]], -1)
        if a.dim() and a.shape[0] > 1:
            yield "first dim - 1", a[:-1]
        if a.dim():
            yield "empty first dim", a[:0]
            yield "empty last dim", a[..., :0]
            yield "flattened", a.reshape(-1)
            yield "0-dim", a.reshape(-1)[0]
        yield "unsqueezed", a.unsqueeze(0)
        if a.dim() >= 2:
            yield "transposed", a.transpose(-1, -2)
            yield "column stride 2", torch.repeat_interleave(a, 2, dim=-1)[..., ::2]
        yield "meta", a.to("meta")
        if not a.is_floating_point():
            yield "negative", a - 1000
            yield "too large", a + 1_000_000
    elif isinstance(a, (int, float)):
        for v in (0, -1, -1.5, float("nan"), float("inf"), 10**12, 2.5, True):
            if huge or v != 10**12:
                yield f"{v!r}", v
    elif isinstance(a, str):
        yield "unknown name", "nonsense"
    elif isinstance(a, torch.dtype):
        yield "int32", torch.int32
        yield "float64", torch.float64
    yield "None", None
    yield "list", [1, 2]
    yield "str", "x"


CASES = _cases()
API = _api_cases()
TRAINING = _training_cases()


@pytest.mark.parametrize("name", sorted(CASES) + sorted(API) + sorted(TRAINING))
def test_bad_input_raises_value_or_type_error(name):
    fn, args = {**CASES, **API, **TRAINING}[name]
    grad = name in TRAINING
    with torch.set_grad_enabled(grad):
        fn(*args)  # the valid call works
    leaks = []
    for i, arg in enumerate(args):
        for label, bad in _mutations(arg, huge=name not in API):
            call = list(args)
            call[i] = bad
            try:
                with warnings.catch_warnings(), torch.set_grad_enabled(grad):
                    warnings.simplefilter("ignore")
                    fn(*call)
            except (ValueError, TypeError):
                pass
            except Exception as e:  # noqa: BLE001 - what this test looks for
                leaks.append(f"argument {i} {label}: {type(e).__name__}: {str(e)[:160]}")
    assert not leaks, f"{name}: " + "\n".join(leaks)


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


MODEL_CALLS = {
    "patch_model(None)": lambda m, ids: fastlayers.patch_model(None),
    "patch_model('llama')": lambda m, ids: fastlayers.patch_model("llama"),
    "patch_model(rms_norm='yes')": lambda m, ids: fastlayers.patch_model(m, rms_norm="yes"),
    "patch_model(linear='int8')": lambda m, ids: fastlayers.patch_model(m, linear="int8"),
    "patch_model(mlp='moe')": lambda m, ids: fastlayers.patch_model(m, mlp="moe"),
    "patch_model(kv_cache='fp8')": lambda m, ids: fastlayers.patch_model(m, kv_cache="fp8"),
    "patch_model(kv_cache, no calibration)": (
        lambda m, ids: fastlayers.patch_model(m, kv_cache="int4_rope_aware")
    ),
    "patch_model(skip_plan='half')": lambda m, ids: fastlayers.patch_model(m, skip_plan="half"),
    "unpatch_model(None)": lambda m, ids: fastlayers.unpatch_model(None),
    "apply_skip_plan(None, plan)": (
        lambda m, ids: fastlayers.apply_skip_plan(None, fastlayers.SkipPlan.uniform(3, 1.5))
    ),
    "apply_skip_plan(model, None)": lambda m, ids: fastlayers.apply_skip_plan(m, None),
    "apply_skip_plan(model, 5-layer plan)": (
        lambda m, ids: fastlayers.apply_skip_plan(m, fastlayers.SkipPlan.uniform(5, 1.5))
    ),
    "self_speculative_generate(None)": (
        lambda m, ids: fastlayers.self_speculative_generate(None, 1, ids)
    ),
    "self_speculative_generate(exit 0)": (
        lambda m, ids: fastlayers.self_speculative_generate(m, 0, ids)
    ),
    "self_speculative_generate(exit 99)": (
        lambda m, ids: fastlayers.self_speculative_generate(m, 99, ids)
    ),
    "self_speculative_generate(float ids)": (
        lambda m, ids: fastlayers.self_speculative_generate(m, 1, ids.float())
    ),
    "quantize_(None)": lambda m, ids: fastlayers.quantize_(None),
    "quantize_(model, 'int4')": lambda m, ids: fastlayers.quantize_(m, "int4"),
    "QuantizeConfig(group_size=3)": lambda m, ids: fastlayers.QuantizeConfig(group_size=3),
    "QuantizeConfig(method='awq')": lambda m, ids: fastlayers.QuantizeConfig(method="awq"),
    "Int4KVCache('x')": lambda m, ids: quant.Int4KVCache("x"),
    "Int4KVCache(group_size=0)": lambda m, ids: quant.Int4KVCache([None], 0),
    "calibrate_rope_aware_kv(None)": lambda m, ids: quant.calibrate_rope_aware_kv(None, [ids]),
    "calibrate_rope_aware_kv(model, [])": lambda m, ids: quant.calibrate_rope_aware_kv(m, []),
    "fold_pre_rope(None, None, n)": (
        lambda m, ids: quant.fold_pre_rope(None, None, torch.ones(2, 16))
    ),
    "fold_pre_rope(n='x')": (
        lambda m, ids: quant.fold_pre_rope(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32), "x")
    ),
    "SkipPlan.from_similarity(model, [])": (
        lambda m, ids: fastlayers.SkipPlan.from_similarity(m, [])
    ),
    "SkipPlan('xx')": lambda m, ids: fastlayers.SkipPlan("xx"),
    "SkipPlan([1])": lambda m, ids: fastlayers.SkipPlan([1]),
    "SkipPlan([])": lambda m, ids: fastlayers.SkipPlan([]),
    "LayerPlan('maybe')": lambda m, ids: fastlayers.LayerPlan("maybe"),
}


@pytest.mark.parametrize("name", sorted(MODEL_CALLS))
def test_model_level_bad_input(name):
    """Patching, quantisation, skip plans and the KV-cache helpers on a small Llama: bad
    arguments give ValueError/TypeError."""
    with pytest.raises((ValueError, TypeError)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MODEL_CALLS[name](_llama(), torch.randint(0, 100, (1, 8)))
