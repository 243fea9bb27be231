# SPDX-License-Identifier: Apache-2.0
"""The decoder structures fastlayers reads (fastlayers/_decoder.py) on small Hugging Face models
of several architectures, built from configs (no download): skip plans follow each layout's norms
(Llama-style; sandwich norms of Gemma 2/3, GLM-4, AFMoE, HyperCLOVA X; post-norms of OLMo 2 and
EXAONE 4; residual multipliers; parallel blocks of Cohere, Phi, StableLM and GPT-NeoX; GPT-2 and
GPT-Neo blocks), routed attention applies q/k norms (StableLM's and Phi's qk_layernorm included),
fused qkv projections (Phi-3, Persimmon, GPT-NeoX), the model's own RoPE (partial RoPE of StableLM
and GLM included), attention sinks (GPT-OSS) and sliding windows, the RoPE-aware KV calibration
and FireQ smoothing leave the float model's function unchanged (with Gemma 2's logit soft-capping
too), and what cannot be supported (q/k norms of unknown form, submodules no layout places,
layers whose output is not their names' layout, queries computed otherwise than from the
module's parts) is refused with a clear error before the model changes."""

import copy
import dataclasses
import math

import pytest
import torch
from _decoders import (
    assert_generate_equals_recompute,
    on_both_routes,
    relative,
    residual_norm_ratio,
)

import fastlayers
from fastlayers import quant
from fastlayers._decoder import (
    attention_name,
    attention_of,
    decoder_layers,
    decoder_layout,
    feedforward_name,
    head_counts,
    head_dim_of,
    qkv_projections,
    rope_layout,
)
from fastlayers.ops import _common
from fastlayers.quantize import _smooth
from fastlayers.skip_plan import LayerPlan, SkipPlan

transformers = pytest.importorskip("transformers")

ARCHS = {
    "Llama": {},
    "Qwen3": dict(head_dim=32),
    "Gemma": dict(head_dim=32),
    "Gemma2": dict(head_dim=32, attn_logit_softcapping=1.0),  # (a cap that matters here)
    "Gemma3": dict(
        head_dim=32, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
    ),
    "Olmo2": {},
    "Granite": dict(residual_multiplier=0.5, attention_multiplier=0.2, embedding_multiplier=4.0),
    "Cohere": {},
    "Phi3": {},
    "StableLm": {},  # RoPE on a quarter of each head (partial_rotary_factor in rope_parameters)
    "Glm": dict(head_dim=32),  # half of each head, interleaved pairs from rotate-half tables
    "Glm4": dict(head_dim=32),  # the same RoPE; GLM-4 sandwich norms
    "Afmoe": dict(
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        num_shared_experts=1,
        num_dense_layers=1,
        layer_types=["full_attention"] * 2,
    ),
    "HyperCLOVAX": dict(residual_multiplier=0.5, embedding_multiplier=4.0),  # Peri-LN norms
    "Apertus": {},  # attention_layernorm / feedforward_layernorm
    # post-norms, q/k norms; sliding_window kept on its full-attention modules too
    "Exaone4": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    "Phi": {},  # parallel blocks; RoPE on half of each head
    "Mistral": dict(sliding_window=4),  # a model-wide sliding window
    "StableLmParallel": dict(use_parallel_residual=True),  # GPT-NeoX's parallel block
    "SmolLM3": dict(no_rope_layers=[1, 0]),  # layer 1 without RoPE (NoPE)
    "StableLmQk": dict(qk_layernorm=True),  # a LayerNorm of its own per head (q_layernorm)
    "PhiQk": dict(qk_layernorm=True),  # one LayerNorm over each head's channels
    "HunYuanDenseV1": dict(head_dim=32),  # q/k norms after RoPE (query_layernorm)
    # one query_key_value of [heads, 3, head_dim] rows, multi-head, half of each head rotated;
    # per-head LayerNorms on q and k, or none (the pre-RoPE fold on the fused rows)
    "Persimmon": {},
    "PersimmonPlain": dict(qk_layernorm=False),
    # a MoE feedforward returning (out, router scores); sliding-window layers; attention sinks
    "GptOss": dict(head_dim=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=4),
    "BitNet": {},  # attn_sub_norm on the attention's output before o_proj
    # a softplus output gate per head (g_proj), 4 then 8 query heads, q/k norms, sliding window
    "Laguna": dict(
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        num_attention_heads_per_layer=[4, 8],
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    ),  # fmt: skip
    "NanoChat": {},  # q/k RMSNorms without weights; RoPE turning the other way
}
# queries scaled by position past original_max_position_embeddings (Llama 4's attention scale)
ARCHS["Ministral3"] = dict(head_dim=32)
# and past 4 positions (a scale that grows within these sequences)
ARCHS["Ministral3Scaled"] = dict(head_dim=32, rope_parameters=dict(
    transformers.Ministral3Config(head_dim=32).rope_parameters, llama_4_scaling_beta=0.5,
    original_max_position_embeddings=4))  # fmt: skip
# GPT-NeoX (Pythia): model.gpt_neox.layers[i].attention, query_key_value heads of [q, k, v], a
# quarter of each head rotated, LayerNorms; its parallel block has a norm for each sublayer
ARCHS["GPTNeoX"] = {}
ARCHS["GPTNeoXSequential"] = dict(use_parallel_residual=False)
# GPT-2: model.transformer.h[i].attn, ln_1 / ln_2, Conv1D projections, no RoPE
ARCHS["GPT2"] = {}
# GPT-Neo: blocks that return (hidden_states, attn_weights); local and global attention layers
ARCHS["GPTNeo"] = dict(attention_types=[[["global", "local"], 1]], window_size=4)
ARCHS["GPTBigCode"] = dict(multi_query=True)  # (StarCoder: one key/value head, c_attn)
# GPT-J: RoPE tables given as (sin, cos), one entry per interleaved pair, rotating one tensor at
# a time on the first rotary_dim channels; CodeGen: the same with a fused qkv_proj whose rows are
# in 4 model-parallel shards of [q | v | k]; both: model.transformer.wte / h / ln_f, parallel blocks
ARCHS["GPTJ"] = dict(rotary_dim=16)
ARCHS["CodeGen"] = dict(rotary_dim=16)
# Falcon: model.transformer.word_embeddings / h / ln_f, FalconLinear projections; a fused
# query_key_value of [q | k | v] with one key/value head and a parallel block with one norm
# (Falcon-7B), of [kv_heads, group + 2, head_dim] with two norms ln_attn / ln_mlp (the new decoder
# architecture: Falcon-40B / 180B), heads of [q, k, v] in a sequential block, or ALiBi instead of
# RoPE (Falcon-RW: a bias in the attention mask)
ARCHS["Falcon"] = dict(multi_query=True)
ARCHS["FalconNew"] = dict(new_decoder_architecture=True, num_kv_heads=2)
ARCHS["FalconSequential"] = dict(multi_query=False, parallel_attn=False)
ARCHS["FalconAlibi"] = dict(multi_query=False, parallel_attn=False, alibi=True)
# MiniCPM5-MoE: queries and sigmoid output gates from one q_gate_proj, [heads, 2, head_dim] (as
# Qwen3-Next's q_proj), a dense then a MoE layer
ARCHS["MiniCPM5Moe"] = dict(head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=64, n_group=1, topk_group=1)  # fmt: skip
# multi-head latent attention: a 16-channel RoPE part, values of 24 channels (keys: 32), as many
# key/value heads as query heads, queries through a low-rank q_a_proj / q_b_proj (V3: interleaved
# RoPE) or one q_proj (V2: complex tables)
_MLA = dict(qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24, kv_lora_rank=32,
            num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
            topk_group=1, first_k_dense_replace=1, moe_intermediate_size=64)  # fmt: skip
ARCHS["DeepseekV3"] = dict(_MLA, q_lora_rank=64)
# MiMo-V2-Flash: values of 48 channels (keys 32) times attention_value_scale, a sliding-window
# layer with twice the key/value heads and attention sinks, RoPE on int(32 * 0.334) = 10 channels
# (the partial factor in each layer type's rope_parameters)
ARCHS["MiMoV2Flash"] = dict(head_dim=32, v_head_dim=48, attention_value_scale=0.5,
                            layer_types=["full_attention", "sliding_attention"], sliding_window=4,
                            n_routed_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=64)  # fmt: skip
ARCHS["DeepseekV2"] = dict(_MLA, q_lora_rank=None)
# DeepSeek V3.2: a DSA indexer picks 4 keys per query (of up to 16 here), so that its top-k matters;
# 16 indexer heads: its scores are sums of ReLUs, exactly 0 (ties, picked in an order that depends
# on the shapes: with or without a cache) where every head's is negative, which 2 heads made common
ARCHS["DeepseekV32"] = dict(_MLA, q_lora_rank=64, index_topk=4, index_head_dim=16,
                            index_n_heads=16)  # fmt: skip
# HunYuan V4: multi-head latent attention with a DSA indexer, attention sinks and a gate_proj output
# gate (its layers mix the residual through hyper-connections: no skip plans)
ARCHS["HYV4"] = dict(_MLA, q_lora_rank=64, index_topk=4, index_head_dim=16, index_n_heads=16)
# MiniCPM3: multi-head latent attention, each residual branch times scale_depth / sqrt(layers), the
# embeddings times scale_emb, the LM head's input divided by hidden_size / dim_model_base
ARCHS["MiniCPM3"] = dict(qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24, kv_lora_rank=32,
                         num_key_value_heads=4, q_lora_rank=64)  # fmt: skip
# a feedforward named block_sparse_moe, residual multipliers (Granite MoE); feed_forward, a MoE
# answering its tokens flattened (Llama 4)
ARCHS["GraniteMoe"] = dict(num_local_experts=4, num_experts_per_tok=2, residual_multiplier=0.5)
ARCHS["Llama4Text"] = dict(head_dim=32, num_local_experts=4, intermediate_size_mlp=256,
                           interleave_moe_layer_step=1)  # fmt: skip
ARCHS["LagunaChannels"] = dict(ARCHS["Laguna"], gating="per-channel")  # a gate per channel
# Llama 4 with its layer 1 without RoPE, scaling its queries by position (temperature tuning; a
# floor scale of 4 positions so that the scale grows within these sequences)
ARCHS["Llama4TextNope"] = dict(ARCHS["Llama4Text"], no_rope_layers=[1, 0], floor_scale=4)


def _model(arch, **extra):
    torch.manual_seed(0)
    kw = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    kw.update(ARCHS[arch], **extra)
    for suffix in ("Parallel", "Qk", "Plain", "Channels", "Sequential", "Nope", "New", "Alibi",
                   "Scaled"):  # fmt: skip
        arch = arch.removesuffix(suffix)
    if arch in ("Persimmon", "GPTNeoX", "GPT2", "GPTNeo", "GPTBigCode", "GPTJ", "CodeGen",
                "Falcon"):  # fmt: skip
        del kw["num_key_value_heads"]
    cfg = getattr(transformers, "Gemma3TextConfig" if arch == "Gemma3" else f"{arch}Config")(**kw)
    head = {"GPT2": "GPT2LMHeadModel", "Llama4Text": "Llama4ForCausalLM"}.get(
        arch, f"{arch}ForCausalLM"
    )
    model = getattr(transformers, head)(cfg).eval()
    with torch.no_grad():  # norms away from their initial values, so that their placement matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5) if arch.startswith("Gemma") else p.uniform_(0.5, 1.5)
    return model


class _ZeroAttention(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class _ZeroMLP(torch.nn.Module):
    def __init__(self, pair: bool = False):
        super().__init__()
        self.pair = pair  # answer as GPT-OSS's MoE does: (out, router scores)

    def forward(self, x):
        return (torch.zeros_like(x), None) if self.pair else torch.zeros_like(x)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _left_padded(ids):
    """Pads ``ids``' row 0 on the left by 3 tokens (their ids set to 0, in place); returns
    generate()'s greedy kwargs with that attention mask, 6 new tokens and their scores."""
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[mask == 0] = 0
    return dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_scores=True,
                return_dict_in_generate=True)  # fmt: skip


LAYOUT_ARCHS = [
    "Llama",
    "Qwen3",
    "Gemma2",
    "Gemma3",
    "Olmo2",
    "Granite",
    "StableLm",
    "Glm4",
    "Afmoe",
    "HyperCLOVAX",
    "Apertus",
    "Exaone4",
    "Cohere",
    "Phi",
    "StableLmParallel",
    "GptOss",
    "GPTNeoX",
    "GPTNeoXSequential",
    "GPT2",
    "GPTNeo",
    "GPTJ",
    "CodeGen",
    "Falcon",
    "FalconNew",
    "FalconSequential",
    "GraniteMoe",
    "Llama4Text",
    "MiniCPM3",
]


@pytest.mark.parametrize("arch", LAYOUT_ARCHS)
def test_skip_plans_follow_each_layout(arch):
    """A full plan is the model; a skipped sublayer is the model with that sublayer's output
    zeroed (every layout's post-norm maps zero to zero; parallel blocks of Cohere, Phi and
    StableLM: refused before; GPT-OSS, whose MoE answers (out, router scores): refused before, the
    layout check could not run its layer; MiniCPM3's residual branches times scale_depth /
    sqrt(layers), its residual_scale: refused before; Falcon's parallel blocks of one norm or of
    ln_attn / ln_mlp and its sequential one)."""
    ids = torch.randint(3, 128, (2, 12))
    want = _logits(_model(arch), ids)
    full = fastlayers.apply_skip_plan(_model(arch), SkipPlan.full(2))
    assert torch.equal(_logits(full, ids), want)
    for sub in ("attn", "ffn"):
        ref = _model(arch)
        layer = decoder_layers(ref)[1]
        if sub == "attn":
            setattr(layer, attention_name(layer), _ZeroAttention())
        else:
            setattr(layer, feedforward_name(layer), _ZeroMLP(pair=arch in ("GptOss", "Llama4Text")))
        plan = SkipPlan([LayerPlan(), LayerPlan(**{sub: "skip"})])
        planned = fastlayers.apply_skip_plan(_model(arch), plan)
        assert torch.equal(_logits(planned, ids), _logits(ref, ids)), sub


@pytest.mark.parametrize(
    "arch",
    ["Llama", "Qwen3", "Gemma2", "Gemma3", "Olmo2", "Granite", "StableLm", "Glm", "Glm4",
     "HyperCLOVAX", "Exaone4", "SmolLM3", "Cohere", "Phi", "StableLmParallel", "StableLmQk",
     "PhiQk", "Afmoe", "HunYuanDenseV1", "Phi3", "Persimmon", "PersimmonPlain", "GptOss",
     "BitNet", "Laguna", "LagunaChannels", "NanoChat", "GPTNeoX", "GPTNeoXSequential",
     "GraniteMoe", "Llama4Text", "GPT2", "GPTBigCode", "DeepseekV3", "DeepseekV2",
     "MiMoV2Flash", "MiniCPM3", "GPTJ", "CodeGen", "Falcon", "FalconNew", "FalconSequential",
     "MiniCPM5Moe"],
)  # fmt: skip
def test_routed_attention_with_every_token_routed_is_each_models_layer(arch):
    """Routing every token, ungated, is the layer's own attention: the q/k norms (Qwen3, Gemma 3
    per head, OLMo 2 over the projection), partial RoPE (StableLM, GLM), no RoPE on NoPE layers
    (EXAONE 4's global layer, SmolLM3's ``no_rope_layers``; rotated before), the post-attention
    norm and the residual multiplier applied as the model does, parallel blocks (Cohere, Phi with
    its output projection ``dense``, StableLM) adding the feedforward of the layer's input (the
    routed layer is layer 1: Gemma 3's and EXAONE 4's full-attention one), fused qkv projections
    split as the model splits them (Phi-3's ``[q | k | v]``, Persimmon's heads of ``[q, k, v]``;
    refused before), GPT-OSS's attention sinks and its RoPE tables of one entry per pair, BitNet's
    norm and Laguna's gate on the attention's output, Laguna's head count per layer, NanoChat's
    weightless q/k norms and its RoPE turning the other way, Llama 4's complex RoPE tables and
    its one L2 ``qk_norm`` after RoPE, GPT-2's and GPT-BigCode's (multi-query) ``Conv1D``
    projections without RoPE, DeepSeek V2's and V3's multi-head latent attention (values of
    another size than the keys; each refused before), MiMo-V2-Flash's scaled values of their own
    head size, its window layer's doubled key/value heads and sinks; GPT-J's and CodeGen's RoPE
    (tables as (sin, cos), one tensor rotated at a time) and CodeGen's sharded qkv_proj (refused
    before); Falcon's three query_key_value layouts and MiniCPM5-MoE's q_gate_proj (queries and
    output gates; refused before)."""
    ids = torch.randint(3, 128, (2, 12))
    want = _logits(_model(arch), ids)
    routed = LayerPlan(attn="routed", router_threshold=-1e30, router_gate=False)
    model = fastlayers.apply_skip_plan(_model(arch), SkipPlan([LayerPlan(), routed]))
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "arch",
    ["Gemma2", "Gemma3", "Mistral", "Exaone4", "Qwen3", "Olmo2", "StableLm", "Glm4", "Cohere",
     "Phi", "StableLmQk", "Afmoe", "HunYuanDenseV1", "Phi3", "Persimmon", "GptOss", "GPTNeoX",
     "DeepseekV3", "MiMoV2Flash"],
)  # fmt: skip
def test_routed_attention_on_each_architecture_and_sliding_windows(arch):
    """Routed attention keeps a layer's sliding window (Gemma 3's and EXAONE 4's local layer 0,
    Mistral's model-wide window; 4 positions here, sequences of 12) and no other (EXAONE 4's
    global layer keeps ``sliding_window`` on its module: windowed before): every token routed is
    the model's layer,
    and generate() with half the tokens routed and a LayerSkipCache equals recomputing the whole
    sequence at every step (decode steps past the window; Gemma 3 passes no use_cache to its
    layers, where the routed keys were once not kept)."""
    from fastlayers.skip_plan import LayerSkipCache

    ids = torch.randint(3, 128, (2, 12))
    want = _logits(_model(arch), ids)
    every = LayerPlan(attn="routed", router_threshold=-1e30, router_gate=False)
    model = fastlayers.apply_skip_plan(_model(arch), SkipPlan([every, LayerPlan()]))
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)
    model = fastlayers.apply_skip_plan(_model(arch), SkipPlan([LayerPlan(attn="routed")] * 2))
    for layer in decoder_layers(model):
        with torch.no_grad():
            layer.fastlayers_router.weight.normal_(0.0, 0.5)
            layer.fastlayers_router.bias.zero_()
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_scores=True,
              return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        out = model.generate(ids[:1], cache=LayerSkipCache(), **kw)
        assert_generate_equals_recompute(model, ids[:1], out)
    if arch in ("Gemma3", "Mistral", "Exaone4"):  # a static cache's window layers: the window
        with torch.no_grad(), pytest.raises(ValueError, match="takes a dynamic cache"):
            model.generate(ids[:1], cache_implementation="static", **kw)


def test_unsupported_structures_are_refused_before_the_model_changes():
    routed = SkipPlan([LayerPlan(), LayerPlan(attn="routed")])
    both = _model("Llama")  # separate projections and a fused one: which is which?
    both.model.layers[1].self_attn.qkv_proj = torch.nn.Linear(128, 256)
    cases = [
        (both, routed, ValueError, "neither separate q_proj / k_proj / v_proj nor one fused"),
    ]  # fmt: skip
    for model, plan, error, match in cases:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(error, match=match):
            fastlayers.apply_skip_plan(model, plan)
        with pytest.raises(error, match=match):
            fastlayers.patch_model(model, linear="int4_fp8", skip_plan=plan)
        after = model.state_dict()
        assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
        assert not hasattr(model, "_fastlayers_skip_plan")
    calib = [torch.randint(3, 128, (1, 16))]
    sinks = _model("Llama")  # sinks its forward does not give its attention
    sinks.model.layers[1].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))
    own = _model("Llama")  # an attention with a parameter of its own
    own.model.layers[1].self_attn.temperature = torch.nn.Parameter(torch.ones(4))
    odd_norm = _model("StableLmQk")  # a k norm over 7 channels: neither a head nor the projection
    odd_norm.model.layers[1].self_attn.k_layernorm = torch.nn.LayerNorm(7)
    lone_norm = _model("Llama")  # a q norm without a k norm: nothing to pair it with
    lone_norm.model.layers[1].self_attn.q_norm = torch.nn.RMSNorm(32)
    unknown = _model("Llama")  # a submodule of unknown role
    unknown.model.layers[1].self_attn.extra = torch.nn.Linear(128, 128)
    odd_proj = _model("Llama")  # a projection that is not a linear layer (Moshi's MoshiLinear)
    odd_proj.model.layers[1].self_attn.q_proj = torch.nn.Sequential(torch.nn.Linear(128, 128))
    narrow = _model("Phi3")  # a fused projection without room for the keys and values
    narrow.model.layers[1].self_attn.qkv_proj = torch.nn.Linear(128, 192, bias=False)
    grouped = _model("Llama")  # heads of [q, k, v] rows, but fewer key/value heads than query
    for name in ("q_proj", "k_proj", "v_proj"):
        delattr(grouped.model.layers[1].self_attn, name)
    grouped.model.layers[1].self_attn.query_key_value = torch.nn.Linear(128, 256)
    for model, match in ((narrow, "qkv_proj has 192 outputs, not 256"),
                         (grouped, "interleaves heads, but it has 4 query and 2 key/value"),
                         (odd_proj, "q_proj are not linear layers"),
                         (odd_norm, "k norm \\(LayerNorm\\) normalises neither each head"),
                         (lone_norm, "q/k norms fastlayers cannot pair: q_norm"),
                         (unknown, "submodules fastlayers does not know: extra"),
                         (sinks, "given other sinks \\(s_aux\\) than its sinks parameter"),
                         (own, "parameters fastlayers does not know: temperature")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            fastlayers.apply_skip_plan(model, routed)
        with pytest.raises(ValueError, match=match):
            fastlayers.patch_model(model, kv_cache="int4_rope_aware", calibration=calib)
        assert not any(isinstance(m, fastlayers.RMSNorm) for m in model.modules())


def test_routing_an_attention_that_does_not_compute_what_its_parts_say_is_refused():
    """Routed attention recomputes a module from its parts, the INT4 KV calibration its keys; the
    module is run once with an attention function that records what it is given
    (attention_mismatch), so a module that does more than its parts say is refused, not
    approximated: here one that doubles its output, one that scales its keys, one that passes
    another scaling than its attribute."""
    import types

    routed = SkipPlan([LayerPlan(), LayerPlan(attn="routed")])

    def doubled(self, *args, **kwargs):
        out = type(self).forward(self, *args, **kwargs)
        return out[0] * 2, out[1]

    class Times(torch.nn.Module):
        def __init__(self, inner, factor):
            super().__init__()
            self.inner, self.factor = inner, factor

        def forward(self, x):
            return self.inner(x) * self.factor

    def scaled_keys(self, hidden_states, *args, **kwargs):
        k_proj = self.k_proj
        self._modules["k_proj"] = Times(k_proj, 1.5)  # (inside the module's own forward only)
        try:
            return type(self).forward(self, hidden_states, *args, **kwargs)
        finally:
            self._modules["k_proj"] = k_proj

    def other_scaling(self, *args, **kwargs):
        scaling = self.scaling
        self.scaling = scaling * 2  # (inside the module's own forward only)
        try:
            return type(self).forward(self, *args, **kwargs)
        finally:
            self.scaling = scaling

    for forward, match in ((doubled, "'s output are not what"),
                           (scaled_keys, "'s keys are not what"),
                           (other_scaling, " scales its scores by 0.35")):  # fmt: skip
        model = _model("Llama")
        attn = model.model.layers[1].self_attn
        attn.forward = types.MethodType(forward, attn)
        with pytest.raises(ValueError, match="layer 1 cannot be routed: LlamaAttention" + match):
            fastlayers.apply_skip_plan(model, routed)
        assert not hasattr(model, "_fastlayers_skip_plan")
        with pytest.raises(ValueError, match="layer 1: LlamaAttention" + match):  # (the INT4 KV)
            fastlayers.patch_model(model, kv_cache="int4_rope_aware",
                                   calibration=[torch.randint(3, 128, (1, 8))])  # fmt: skip
    model = _model("Llama")
    model.model.layers[1].self_attn.scaling = 1.0  # (the module passes its attribute: agrees)
    fastlayers.apply_skip_plan(model, routed)
    model = _model("Granite")  # its attention_multiplier, read from the module's scaling
    fastlayers.apply_skip_plan(model, routed)

    def other_sinks(self, *args, **kwargs):  # its attention given sinks other than its parameter
        sinks = self.sinks
        self.sinks = torch.nn.Parameter(sinks.detach() + 1.0)
        try:
            return type(self).forward(self, *args, **kwargs)
        finally:
            self.sinks = sinks

    model = _model("GptOss")
    attn = model.model.layers[1].self_attn
    attn.forward = types.MethodType(other_sinks, attn)
    match = "GptOssAttention's attention is given other sinks"
    with pytest.raises(ValueError, match=match):
        fastlayers.apply_skip_plan(model, routed)
    with pytest.raises(ValueError, match=match):
        fastlayers.patch_model(model, kv_cache="int4_rope_aware",
                               calibration=[torch.randint(3, 128, (1, 8))])  # fmt: skip
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    cfg = DeepseekV2Config(vocab_size=128, hidden_size=128, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=4, qk_rope_head_dim=16,
                           qk_nope_head_dim=16, v_head_dim=32, kv_lora_rank=32, q_lora_rank=64,
                           head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=64, first_k_dense_replace=2)  # fmt: skip
    model = DeepseekV2ForCausalLM(cfg).eval()  # (multi-head latent attention)
    model.model.layers[1].self_attn.extra = torch.nn.Linear(2, 2)  # (a part DeepSeek's has not)
    with pytest.raises(ValueError, match="multi-head latent attention with other parts .*extra"):
        fastlayers.apply_skip_plan(model, routed)
    fastlayers.apply_skip_plan(model, SkipPlan([LayerPlan(), LayerPlan("skip")]))  # (plans: yes)
    model = _model("GptOss")  # sinks of another shape than one per query head
    model.model.layers[1].self_attn.sinks = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="sinks are not one logit per query head"):
        fastlayers.apply_skip_plan(model, routed)


def test_a_layer_with_a_submodule_no_layout_places_is_refused():
    """A norm (or anything else) that no known layout places is refused, not run in a Llama-shaped
    guess: before, GLM-4's post_self_attn_layernorm / post_mlp_layernorm were ignored."""
    model = _model("Llama")
    model.model.layers[1].extra_norm = torch.nn.RMSNorm(128)
    listed = r"\(extra_norm, input_layernorm, post_attention_layernorm\)"
    with pytest.raises(TypeError, match=listed):
        fastlayers.apply_skip_plan(model, SkipPlan.full(2))
    with pytest.raises(TypeError, match="extra_norm"):
        SkipPlan.from_similarity(model, [torch.randint(3, 128, (1, 8))], num_ffn_skip=1)


def _sequential_one_norm(self, hidden_states, *args, **kwargs):
    """A layer with Cohere's names that is not a parallel block: h + attn(n(h)), then + mlp(h)."""
    h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), *args, **kwargs)[0]
    return h + self.mlp(h)


def _parallel_two_norms(self, hidden_states, *args, **kwargs):
    """GPT-NeoX's parallel block under Llama's names: h + attn(n1(h)) + mlp(n2(h))."""
    a = self.self_attn(self.input_layernorm(hidden_states), *args, **kwargs)[0]
    return hidden_states + a + self.mlp(self.post_attention_layernorm(hidden_states))


def _depth_scaled(self, hidden_states, position_embeddings, *args, **kwargs):
    """Beam's depth-scaled residuals under Llama's names (and a required position_embeddings
    argument, which once kept the check from running it): h * s + attn(n(h)) / sqrt(i)."""
    kwargs["position_embeddings"] = position_embeddings
    a = self.self_attn(self.input_layernorm(hidden_states), *args, **kwargs)[0]
    h = hidden_states * 0.8 + a * 0.5
    return h * 0.8 + self.mlp(self.post_attention_layernorm(h)) * 0.5


def test_a_layer_whose_output_is_not_its_names_layout_is_refused():
    """Names are checked by running the layer once with its attention answering a fixed tensor:
    a one-norm layer that is not a parallel block, or depth-scaled residuals under Llama's names,
    are refused instead of run in the layout their names suggest; so is a layer that cannot be run
    (here: on the meta device). Llama's names on GPT-NeoX's parallel block (a norm for each
    sublayer) are read as that block, which the run shows (refused before GPT-NeoX's support)."""
    import types

    from fastlayers._decoder import _layout_holds

    for arch, forward, names in (
        ("Cohere", _sequential_one_norm, r"h \+ attn\(n\(h\)\) \+ mlp\(n\(h\)\)"),
        ("Llama", _depth_scaled, r"h = h \+ mlp\(post_attention_layernorm\(h\)\)"),
    ):
        model = _model(arch)
        layer = model.model.layers[1]
        layer.forward = types.MethodType(forward, layer)
        with pytest.raises(TypeError, match="does not compute what the names of its norms say"):
            fastlayers.apply_skip_plan(model, SkipPlan.full(2))
        with pytest.raises(TypeError, match=names):
            decoder_layout(layer)
        assert not hasattr(model, "_fastlayers_skip_plan")
        good = decoder_layout(model.model.layers[0])  # (the layer of the model's own forward)
        assert _layout_holds(model.model.layers[0], good) is True
        assert _layout_holds(layer, good) is False
    model = _model("Llama")
    layer = model.model.layers[1]
    layer.forward = types.MethodType(_parallel_two_norms, layer)
    layout = decoder_layout(layer)
    assert layout.parallel and (layout.attn_pre, layout.ffn_pre) == (
        "input_layernorm", "post_attention_layernorm")  # fmt: skip
    assert not decoder_layout(model.model.layers[0]).parallel
    cohere = decoder_layout(_model("Cohere").model.layers[0])
    sequential = dataclasses.replace(cohere, parallel=False)  # (the same names, one by one)
    assert _layout_holds(_model("Cohere").model.layers[0], sequential) is False
    for arch in ("Llama", "Cohere"):
        with torch.device("meta"):
            layer = _model(arch).model.layers[0]
        with pytest.raises(TypeError, match="could not be run to check"):
            decoder_layout(layer)


def test_layouts_and_rope_pairings_read_from_the_models():
    assert decoder_layout(_model("Llama").model.layers[0]).ffn_pre == "post_attention_layernorm"
    gemma2 = decoder_layout(_model("Gemma2").model.layers[0])
    assert (gemma2.attn_post, gemma2.ffn_pre) == ("post_attention_layernorm",
                                                   "pre_feedforward_layernorm")  # fmt: skip
    olmo2 = decoder_layout(_model("Olmo2").model.layers[0])
    assert (olmo2.attn_pre, olmo2.ffn_pre) == (None, None)
    assert olmo2.attn_post == "post_attention_layernorm"
    assert decoder_layout(_model("Granite").model.layers[0]).residual_multiplier == 0.5
    glm4 = decoder_layout(_model("Glm4").model.layers[0])
    names = ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm",
             "post_mlp_layernorm")  # fmt: skip
    assert dataclasses.astuple(glm4) == (*names, 1.0, False, None)
    for arch in ("Cohere", "Phi", "StableLmParallel"):
        layout = decoder_layout(_model(arch).model.layers[0])
        assert layout.parallel and layout.attn_pre == layout.ffn_pre == "input_layernorm", arch
    hcx = decoder_layout(_model("HyperCLOVAX").model.layers[0])
    assert (hcx.attn_post, hcx.ffn_pre, hcx.ffn_post) == ("post_norm1", "post_attention_layernorm",
                                                          "post_norm2")  # fmt: skip
    assert hcx.residual_multiplier == 0.5
    ropes = (
        ("Llama", "half", 32),
        ("Cohere", "interleaved", 32),
        ("StableLm", "half", 8),
        ("Glm", "interleaved", 16),
    )  # (GLM: interleaved pairs from rotate-half tables)
    for arch, pairing, rotary_dim in ropes:
        rope = rope_layout(_model(arch).model.layers[0].self_attn)
        assert (rope.pairing, rope.rotary_dim) == (pairing, rotary_dim), arch
    with pytest.raises(ValueError, match="pairing='half', but the model's RoPE pairs channels"):
        quant.calibrate_rope_aware_kv(_model("Cohere"), [torch.randint(3, 128, (1, 8))],
                                      pairing="half")  # fmt: skip


@pytest.mark.parametrize(
    "arch",
    [
        "Llama",
        "Qwen3",
        "Gemma2",
        "Gemma3",
        "Olmo2",
        "Cohere",
        "Granite",
        "StableLm",
        "Glm",
        "Glm4",
        "Phi",
        "StableLmQk",
        "PhiQk",
        "Afmoe",
        "HunYuanDenseV1",
        "Phi3",
        "Persimmon",
        "PersimmonPlain",
        "GptOss",
        "BitNet",
        "Laguna",
        "NanoChat",
        "Ministral3",
        "GPTNeoX",
        "GraniteMoe",
        "Llama4Text",
        "Llama4TextNope",
        "GPT2",
        "GPTBigCode",
        "GPTJ",
        "CodeGen",
        "Falcon",
        "FalconNew",
        "FalconSequential",
        "FalconAlibi",
        "MiniCPM5Moe",
        "DeepseekV3",
        "DeepseekV2",
        "DeepseekV32",
        "HYV4",
        "MiMoV2Flash",
        "MiniCPM3",
    ],
)
def test_rope_aware_kv_scales_keep_the_float_model_and_generate_matches(arch):
    """Calibration (pre-RoPE scales folded where no q/k norm follows the projections, post-RoPE
    scales on the keys, their inverse on the queries) with quantization off is the float model;
    with INT4 on, generate() with the INT4 cache is generate() without a cache. Fused qkv
    projections (Phi-3, Persimmon without q/k norms) get the fold on their query and key rows;
    GPT-OSS's sinks join the INT4 attention's softmax (decode, prefill and masked paths);
    Ministral 3's queries, scaled by position, are taken as the module gives them, as are those
    of Llama 4's NoPE layer (its attention temperature tuning); Llama 4's complex RoPE tables;
    GPT-2's and GPT-BigCode's ``Conv1D`` ``c_attn`` (the fold on its columns), no RoPE;
    DeepSeek V3's and V2's multi-head latent attention (the cached latent and RoPE key part
    quantized, values of another head size than the keys); MiMo-V2-Flash's values of their own
    head size (the INT4 kernels with a value head size; one group dividing both, 16), its window
    layer with sinks and doubled key/value heads, RoPE on 10 channels of 32; DeepSeek V3.2's DSA
    indexer picking 4 of the keys per query (its picks applied to the INT4 attention's mask, its
    keys cached beside the INT4 latent, here as they come: FP8 keys would change the picks of a
    model without a cache); HunYuan V4's latent attention with an indexer, sinks and
    an output gate; GPT-J and CodeGen (the fold on their interleaved partial RoPE; CodeGen's on its
    sharded qkv_proj rows); Falcon's three query_key_value layouts (refused before) and ALiBi (the
    bias in the mask: the INT4 cache's masked path); MiniCPM5-MoE's q_gate_proj (the fold on its
    query rows, the gates left alone; refused before)."""
    ids = torch.randint(3, 128, (3, 10))
    want = _logits(_model(arch), ids)
    calib = [torch.randint(3, 128, (1, 24))]
    model = _model(arch)
    post = quant.calibrate_rope_aware_kv(model, calib)
    quant.apply_rope_aware_kv(model, post, q_fp8=False, quantize_keys=False,
                              quantize_values=False)  # fmt: skip
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)
    model = _model(arch)
    report = fastlayers.patch_model(model, rms_norm=False, kv_cache="int4_rope_aware",
                                    calibration=calib)  # fmt: skip
    with_norms = ("Qwen3", "Gemma3", "Olmo2", "StableLmQk", "PhiQk", "Afmoe", "HunYuanDenseV1",
                  "Persimmon", "Laguna", "NanoChat", "Llama4Text", "Llama4TextNope")  # fmt: skip
    assert ("post-RoPE scales only (q_norm" in str(report)) == (arch in with_norms)
    latent = arch.startswith("Deepseek") or arch in ("MiniCPM3", "HYV4")
    assert ("INT4 latent" in str(report)) == latent
    if arch in ("DeepseekV32", "HYV4"):  # (the indexer's keys kept beside the INT4 latent)
        assert model.config._attn_implementation == "fastlayers_int4kv_masked"
    kw = _left_padded(ids)
    with torch.no_grad():
        cache = quant.Int4KVCache.for_model(model, indexer_fp8=False)
        cached = model.generate(ids, cache=cache, **kw)
        plain = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.scores, plain.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "arch",
    ["Qwen3", "Olmo2", "Cohere", "StableLm", "Glm", "Exaone4", "StableLmQk", "PhiQk",
     "HunYuanDenseV1", "Phi3", "Persimmon", "GptOss", "GPTNeoX", "Qwen3-bf16", "Glm-bf16",
     "HunYuanDenseV1-bf16"],
)  # fmt: skip
def test_kv_calibration_reads_the_keys_the_model_attends_with(arch):
    """The post-RoPE scales come from the keys the model's attention is given: after its k norm
    (per head, over the projection, StableLM's norm per head, Phi's LayerNorm; HunYuan's after
    RoPE), its RoPE (pairs, partial) or none (EXAONE 4's global layer). Compared with the scales
    of the keys a registered attention function sees (a norm applied over the wrong axis moves
    them); in bf16 too, where layer 0's keys are the model's to the bit (the calibration runs the
    routed path's attention_qkv on the projections' input; it rotated in fp32 before)."""
    import sys

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    seen = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        seen.setdefault(module.layer_idx, []).append(key.transpose(1, 2).flatten(0, 1).float())
        # the model's own eager attention (GPT-OSS's with its sinks: sdpa has none, and the next
        # layer's keys would differ)
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("fastlayers_test_capture", capture)
    AttentionMaskInterface.register("fastlayers_test_capture", eager_mask)  # (eager's masks)
    calib = [torch.randint(3, 128, (2, 24))]
    arch, _, dtype = arch.partition("-")
    model = _model(arch).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    post = quant.calibrate_rope_aware_kv(model, calib, pre_rope=False, top_k=4)
    model.set_attn_implementation("fastlayers_test_capture")
    with torch.no_grad():
        model(calib[0])
    for i, layer in enumerate(decoder_layers(model)):
        rope = rope_layout(attention_of(layer))
        want = quant.compute_post_rope_scales(torch.cat(seen[i]), 8.0, 4, rope.pairing,
                                              rope.rotary_dim)  # fmt: skip
        if dtype == "bf16" and i == 0:  # (later layers: the calibration ran the model's own
            assert torch.equal(post[i], want)  # attention, which rounds otherwise than eager's)
        elif dtype == "bf16":
            torch.testing.assert_close(post[i], want, rtol=3e-2, atol=3e-2)
        else:
            torch.testing.assert_close(post[i], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "arch",
    ["Llama", "Gemma", "Gemma2", "Gemma3", "Olmo2", "Cohere", "StableLmParallel", "GPTNeoX",
     "GPTNeoXSequential"],
)  # fmt: skip
def test_smoothing_keeps_the_float_model(arch):
    """FireQ smoothing moves scales between a producer and its consumers: the float function must
    not change. The norm feeding the feedforward is the producer only in Llama-style and GPT-NeoX
    layers (in Gemma 2/3 ``post_attention_layernorm`` normalises the attention's output, OLMo 2
    has no norm before its feedforward, a Gemma ``1 + w`` norm cannot take ``w / lambda``, and the
    one norm of a Cohere / StableLM parallel block feeds the attention too; GPT-NeoX's parallel
    block has a norm of its own for the feedforward, a LayerNorm whose bias is scaled too)."""
    ids = torch.randint(3, 128, (2, 12))
    model = _model(arch)
    if arch.startswith("GPTNeoX"):  # (LayerNorm biases away from zero)
        with torch.no_grad():
            for layer in decoder_layers(model):
                layer.post_attention_layernorm.bias.uniform_(-0.5, 0.5)
    want = _logits(model, ids)
    done = [producer for producer, _ in _smooth(model)]
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)
    norms = [p for p in done if "norm" in p]
    prefix = "gpt_neox" if arch.startswith("GPTNeoX") else "model"
    expected = [f"{prefix}.layers.{i}.post_attention_layernorm" for i in range(2)]
    assert norms == (expected if arch in ("Llama", "GPTNeoX", "GPTNeoXSequential") else [])
    ups = sum(p.endswith("mlp.up_proj") for p in done)
    assert ups == (0 if arch.startswith("GPTNeoX") else 2)  # (GELU MLPs: no up -> down pair)


@pytest.mark.parametrize(
    "arch", ["Gemma2", "Olmo2", "Granite", "Glm4", "HyperCLOVAX", "Cohere", "Phi"]
)
def test_from_similarity_measures_the_residual_stream_of_each_layout(arch):
    """With a layer's attention zeroed, its feedforward's residual-norm ratio is |h_out| / |h_in|
    of the layer itself: what from_similarity must measure whatever norms surround the sublayer
    (before, it read Gemma 2's attention output as the feedforward's input and missed Granite's
    residual multiplier)."""
    model = _model(arch)
    model.model.layers[1].self_attn = _ZeroAttention()
    batch = torch.randint(3, 128, (2, 12))
    plan = SkipPlan.from_similarity(model, [batch], num_ffn_skip=2)
    ratio = residual_norm_ratio(model, model.model.layers[1], batch)
    assert math.isclose(plan.layers[1].ffn_scale, ratio, rel_tol=1e-4)
    assert plan.layers[1].ffn == "skip" and plan.layers[0].ffn == "skip"


@pytest.mark.parametrize(
    "arch",
    ["Qwen3", "Gemma2", "Gemma3", "Olmo2", "Cohere", "Glm4", "Granite", "HyperCLOVAX", "Phi",
     "StableLmParallel", "GptOss", "Phi3", "Persimmon", "GPTNeoX", "GPTNeoXSequential",
     "Llama4Text", "GraniteMoe", "MiniCPM3", "GPTJ", "CodeGen", "Falcon", "FalconNew", "GPT2",
     "GPTBigCode", "MiniCPM5Moe"],
)  # fmt: skip
def test_self_speculative_generate_is_greedy_decoding_on_each_architecture(arch):
    """Early-exit drafting and verification reproduce greedy decoding past the sliding window
    (Gemma 2 with a window of 4, Gemma 3's local layers), with Gemma 3's local/global RoPE, with
    the embedding multipliers of Granite and HyperCLOVA X (ignored before: other tokens) and on
    parallel blocks (Cohere, Phi with its final_layernorm: refused before, StableLM); MiniCPM3's
    LM head input divided by its logits_scaling (refused before); GPT-J's and CodeGen's wte and
    ln_f, Falcon's word_embeddings, GPT-2's and GPT-BigCode's learned positions (wpe, no RoPE)
    added at each drafted token's position (refused before)."""
    from fastlayers.skip_plan import self_speculative_generate

    model = _model(arch)
    if arch == "Gemma2":
        model.config.sliding_window = 4
        for layer in model.model.layers:
            if layer.self_attn.sliding_window is not None:
                layer.self_attn.sliding_window = 4
    ids = torch.randint(3, 128, (1, 8))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
    for exit_layer, num_draft in ((1, 3), (1, 1)):
        got, _ = self_speculative_generate(model, ids, exit_layer, 10, num_draft=num_draft)
        assert torch.equal(got, want), (exit_layer, num_draft)
    if arch == "Qwen3":  # an embedding transform it does not know is refused, not guessed
        model.model.embedding_multiplier = 2.0  # (read by fastlayers, not applied by Qwen3)
        with pytest.raises(TypeError, match="transforms its token embeddings"):
            self_speculative_generate(model, ids, 1, 4)


@pytest.mark.parametrize("arch", ["Llama", "Gemma3", "Olmo2", "Phi3"])
def test_rms_norm_patch_reproduces_each_norm_in_bf16(arch):
    """patch_model finds each norm's form by running it: OLMo 2 multiplies by its weight in fp32
    before the cast (one rounding) where Llama casts first; the logits of the bf16 model match."""
    from fastlayers.nn.rmsnorm import rms_norm_form

    model = _model(arch).to(torch.bfloat16)
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    want_form = {"Llama": (0.0, False), "Gemma3": (1.0, False), "Olmo2": (0.0, True)}
    assert {rms_norm_form(m) for m in norms} == {want_form.get(arch, (0.0, False))}
    ids = torch.randint(3, 128, (2, 12))
    want = _logits(model, ids)
    report = fastlayers.patch_model(model)
    assert len(report.swapped) == len(norms) and not report.left
    torch.testing.assert_close(_logits(model, ids), want, rtol=2e-2, atol=2e-2)
    for norm in (m for m in model.modules() if isinstance(m, fastlayers.RMSNorm)):
        x = torch.randn(64, norm.weight.shape[0]).to(torch.bfloat16)
        original = next(m for m in norms if m.weight is norm.weight)
        with torch.no_grad():
            got, ref = norm(x), original(x)
        # the same bits but where the fp32 sum of squares rounds differently in the kernel's
        # reduction order (a form that is not the module's differs in ~25 % of the elements)
        assert (got != ref).float().mean().item() < 0.01


class _HalfPrecisionRMSNorm(torch.nn.Module):
    """An RMSNorm whose statistics are taken in the input's dtype: none of fastlayers' forms."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.eps = 1e-6

    def forward(self, x):
        return self.weight.to(x.dtype) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def test_rms_norm_of_no_known_form_is_left_and_reported():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), _HalfPrecisionRMSNorm(64))
    report = fastlayers.patch_model(model)
    assert isinstance(model[1], _HalfPrecisionRMSNorm) and not report.swapped
    assert report.left == [("1", "its rounding matches none of fastlayers.RMSNorm's forms")]


def test_a_parallel_blocks_skipped_sublayer_rescales_its_residual():
    """Skipped sublayers of a parallel block: ``h * scale + mlp(n(h))`` (AdaSkip's rescale on the
    residual, the feedforward still reading the layer's own input)."""
    for sub, scale in (("attn", 0.5), ("ffn", 1.25)):
        plan = SkipPlan([LayerPlan(), LayerPlan(**{sub: "skip", f"{sub}_scale": scale})])
        model = fastlayers.apply_skip_plan(_model("Cohere"), plan)
        layer, seen = model.model.layers[1], {}

        def hook(mod, args, kwargs, out, seen=seen):
            seen["in"], seen["out"] = (args[0] if args else kwargs["hidden_states"]), out

        handle = layer.register_forward_hook(hook, with_kwargs=True)
        pos = torch.arange(12)[None]
        with torch.no_grad():
            model(torch.randint(3, 128, (1, 12)), position_ids=pos)
            h = seen["in"]
            normed = layer.input_layernorm(h)
            if sub == "attn":
                want = h * scale + layer.mlp(normed)
            else:
                emb = model.model.rotary_emb(h, pos)
                want = h * scale + layer.self_attn(normed, position_embeddings=emb,
                                                   attention_mask=None)[0]  # fmt: skip
        handle.remove()
        torch.testing.assert_close(seen["out"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["skip", "routed"])
def test_assisted_generation_with_a_model_wide_window_and_generates_own_cache(attn):
    """Mistral's model-wide window makes every cache layer a sliding one; a layer whose attention
    never writes it stayed uninitialised, and transformers' crop of it after rejected prompt-lookup
    candidates raised AttributeError. Now it equals greedy decoding by recomputation (and a
    static cache still works with the layer skipped)."""
    model = fastlayers.apply_skip_plan(_model("Mistral"), SkipPlan([LayerPlan(), LayerPlan(attn)]))
    if attn == "routed":
        with torch.no_grad():
            model.model.layers[1].fastlayers_router.weight.normal_(0.0, 0.5)
            model.model.layers[1].fastlayers_router.bias.zero_()
    ids = torch.randint(3, 128, (1, 12))
    ids = torch.cat([ids, ids[:, :6]], 1)  # (a repeat for the prompt lookup to find)
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        got = model.generate(ids, prompt_lookup_num_tokens=3, **kw)
        seq = ids
        for _ in range(12):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(got, seq)
        if attn == "skip":
            static = model.generate(ids, cache_implementation="static", **kw)
            assert torch.equal(static, seq)


def test_self_speculative_generate_refuses_a_forward_it_does_not_reproduce():
    """Running the layers one by one must give the LM head what the model's own forward gives it
    on the prompt (checked once per call): a forward that does more between its layers than
    fastlayers runs (here a shift of layer 1's input, as Gemma 3n's per-layer inputs would) is
    refused, not decoded as another model; a layer that cannot run alone is a TypeError."""
    from fastlayers.skip_plan import self_speculative_generate

    model = _model("Llama")
    forward = model.model.forward

    def shifted(*args, **kwargs):
        hook = model.model.layers[1].register_forward_pre_hook(
            lambda mod, args, kwargs: (
                ((args[0] + 0.5, *args[1:]), kwargs)
                if args
                else (args, {**kwargs, "hidden_states": kwargs["hidden_states"] + 0.5})
            ),
            with_kwargs=True,
        )
        try:
            return forward(*args, **kwargs)
        finally:
            hook.remove()

    model.model.forward = shifted
    ids = torch.randint(3, 128, (1, 8))
    with pytest.raises(ValueError, match="does not reproduce its forward"):
        self_speculative_generate(model, ids, 1, 4)
    model = _model("Llama")

    def fails(self, *args, **kwargs):
        raise RuntimeError("a layer that needs its model's own state")

    import types

    model.model.layers[1].forward = types.MethodType(fails, model.model.layers[1])
    with pytest.raises(TypeError, match="cannot run this model's layers one by one"):
        self_speculative_generate(model, ids, 1, 4)


@pytest.mark.parametrize("arch", ["GPT2", "GPTNeoX", "GPTNeoXSequential", "GPTNeo"])
def test_skip_plans_generate_on_older_architectures(arch):
    """A skip plan (layer 0's attention, layer 1's feedforward skipped) on GPT-2 (blocks called
    with the cache by position), GPT-NeoX (the cache passed as ``layer_past``) and GPT-Neo (blocks
    returning a tuple: a planned layer answering a bare tensor gave the model the batch's first
    sequence, 69 % off): generate() on a left-padded batch with the model's cache and with a
    LayerSkipCache equals recomputing without a cache (refused before: other attribute names)."""
    from fastlayers.skip_plan import LayerSkipCache

    model = _model(arch)
    fastlayers.apply_skip_plan(model, SkipPlan([LayerPlan(attn="skip"), LayerPlan(ffn="skip")]))
    ids = torch.randint(3, 128, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_scores=True,
              return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        plain = model.generate(ids, use_cache=False, **kw)
        for cache in (None, LayerSkipCache()):
            got = model.generate(ids, cache=cache, **kw)
            assert torch.equal(got.sequences, plain.sequences)
            for a, b in zip(got.scores, plain.scores, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["GPT2", "GPTNeoX"])
@pytest.mark.parametrize("mlp", ["fff", "peer"])
def test_mlp_swaps_read_the_sizes_of_feedforwards_that_name_none(arch, mlp):
    """GPT-2's and GPT-NeoX's feedforwards name no sizes: the swap reads them from the first
    linear layer (GPT-2's Conv1D ``c_fc``; left unswapped before); unpatch_model restores them."""
    model = _model(arch)
    want = _logits(model, torch.randint(3, 128, (1, 5)))
    originals = [layer.mlp for layer in decoder_layers(model)]
    report = fastlayers.patch_model(model, rms_norm=False, mlp=mlp)
    assert len(report.swapped) == 2 and not report.left
    got = _logits(model, torch.randint(3, 128, (1, 5)))
    assert got.shape == want.shape and bool(torch.isfinite(got).all())
    new = decoder_layers(model)[0].mlp
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert new.eval()(x).shape == (3, 128)
    fastlayers.unpatch_model(model)
    assert all(a is b.mlp for a, b in zip(originals, decoder_layers(model), strict=True))


def test_int4_linears_on_gpt2s_conv1d_projections():
    """GPT-2's projections are Conv1D (``x @ W + b`` with ``W [in, out]``): quantize_ takes their
    transposed weight (left in float before), and the patched model's output stays close; routed
    attention then reads the quantized c_attn like the Conv1D (every token routed: the quantized
    model)."""
    model = _model("GPT2")
    ids = torch.randint(3, 128, (2, 10))
    want = _logits(model, ids)
    convs = {n: m.weight.detach().t().clone() for n, m in model.named_modules()
             if type(m).__name__ == "Conv1D"}  # fmt: skip
    report = fastlayers.patch_model(model, rms_norm=False, linear="int4_fp8")
    swapped = {name: kind for name, kind, _ in report.swapped}
    assert len(convs) == 8 and all(swapped.get(n) == "Conv1D" for n in convs)
    for name, w in convs.items():
        q = model.get_submodule(name)
        assert isinstance(q, fastlayers.Int4Fp8Linear) and q.dequantize().shape == w.shape
        assert float((q.dequantize() - w).norm() / w.norm()) < 0.15  # (INT4 of random weights)
    got = _logits(model, ids)
    assert float((got - want).norm() / want.norm()) < 0.3
    every = LayerPlan(attn="routed", router_threshold=-1e30, router_gate=False)
    fastlayers.apply_skip_plan(model, SkipPlan([LayerPlan(), every]))
    torch.testing.assert_close(_logits(model, ids), got, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["CodeGen", "Llama"])
def test_checks_of_a_bf16_model_with_int4_projections_run_in_bf16(arch):
    """An attention whose every projection is an INT4 linear holds no bf16 tensor (the linears keep
    float32 channel scales through ``model.to(torch.bfloat16)``): the checks that run it (the INT4
    cache's, on a copy of the model) and the routers apply_skip_plan adds take the linears'
    output dtype. They took the scales': CodeGen's copy was refused by ``Int4KVCache.for_model``
    (probed in float32, its bf16 keys failed the float32 tolerance), and the routers were float32,
    a RuntimeError (mat1 and mat2 dtypes) at the routed model's first forward."""
    from fastlayers.skip_plan import LayerSkipCache

    model = _model(arch)
    fastlayers.patch_model(model, linear="int4_fp8", kv_cache="int4_rope_aware",
                           calibration=[torch.randint(3, 128, (1, 16))])  # fmt: skip
    model.to(torch.bfloat16)
    attn = attention_of(decoder_layers(model)[0])
    assert not [p for p in attn.parameters() if p.dtype == torch.bfloat16]  # (all INT4)
    ids = torch.randint(3, 128, (2, 8))
    kw = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        want = model.generate(ids, cache=quant.Int4KVCache.for_model(model), **kw)
        twin = copy.deepcopy(model)
        assert torch.equal(twin.generate(ids, cache=quant.Int4KVCache.for_model(twin), **kw), want)
    routed = _model(arch)
    fastlayers.patch_model(routed, linear="int4_fp8")
    routed.to(torch.bfloat16)
    every = LayerPlan(attn="routed", router_threshold=-1e30, router_gate=False)
    want = _logits(routed, ids)
    fastlayers.apply_skip_plan(routed, SkipPlan([every] * 2))
    assert {layer.fastlayers_router.weight.dtype for layer in decoder_layers(routed)} == {
        torch.bfloat16
    }
    # (every token routed: the same model, up to bf16 rounding and the FP8 flips that follow)
    assert relative(_logits(routed, ids), want) < 5e-2
    with torch.no_grad():
        assert routed.generate(ids, cache=LayerSkipCache(), **kw).shape == (2, 12)


def test_int4_linears_leave_moe_routers_in_float():
    """quantize_ leaves mixture-of-experts routers in float by default (HunYuan's ``gate.wg``,
    Qwen2-MoE's ``shared_expert_gate``): INT4 noise there moves tokens to other experts. HunYuan's
    router reads ``wg.weight.dtype``; a quantized layer's ``.weight`` (dequantized) keeps such
    code running (an AttributeError before)."""
    base = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4,
                moe_intermediate_size=64)  # fmt: skip
    torch.manual_seed(0)
    hunyuan = transformers.HunYuanMoEV1ForCausalLM(
        transformers.HunYuanMoEV1Config(moe_topk=2, **base)
    ).eval()
    qwen = transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(
            num_experts_per_tok=2, shared_expert_intermediate_size=64, **base
        )  # fmt: skip
    ).eval()
    ids = torch.randint(3, 128, (1, 8))
    for model, router in ((hunyuan, "mlp.gate.wg"), (qwen, "mlp.shared_expert_gate")):
        want = _logits(model, ids)
        report = fastlayers.quantize_(model, fastlayers.QuantizeConfig(progress=False))
        for i in range(2):
            assert f"model.layers.{i}.{router}" in report.skipped
            assert type(model.get_submodule(f"model.layers.{i}.{router}")) is torch.nn.Linear
            assert isinstance(model.model.layers[i].self_attn.q_proj, fastlayers.Int4Fp8Linear)
        got = _logits(model, ids)
        assert ((got - want).norm() / want.norm()).item() < 0.5  # (INT4 of a random tiny model)
    gate = fastlayers.Int4Fp8Linear.from_linear(hunyuan.model.layers[0].mlp.gate.wg)
    hunyuan.model.layers[0].mlp.gate.wg = gate  # (quantized anyway: its .weight is read)
    with torch.no_grad():
        assert torch.isfinite(hunyuan(ids).logits).all()


@pytest.mark.parametrize("arch", ["Llama4TextNope", "Ministral3Scaled"])
def test_queries_scaled_by_place_are_routed_as_the_model_scales_them(arch):
    """Llama 4's NoPE layer (attention temperature tuning: a scale from the token's column in the
    cache, past ``floor_scale`` = 4 here) and Ministral 3 (``llama_4_scaling_beta``: from the
    position id, past ``original_max_position_embeddings`` = 4 here) scale their queries by
    place; routed attention applies the same scale (both refused before): every token routed is
    the model, and generate() with left padding (columns and position ids then differ) gives the
    model's scores, decode steps included."""
    from fastlayers.skip_plan import LayerSkipCache

    ids = torch.randint(3, 128, (2, 12))
    want = _logits(_model(arch), ids)
    every = LayerPlan(attn="routed", router_threshold=-1e30, router_gate=False)
    model = fastlayers.apply_skip_plan(_model(arch), SkipPlan([every, every]))
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)
    kw = _left_padded(ids)
    with torch.no_grad():
        got = model.generate(ids, cache=LayerSkipCache(), **kw)
        ref = _model(arch).generate(ids, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_query_scale_by_place_the_module_does_not_apply_is_refused(monkeypatch):
    """The probe compares the scaled queries with the module's at a place far out: a scale of
    another beta than the module's is refused, not routed."""
    from fastlayers import _decoder

    wrong = _decoder.PositionQueryScale(0.3, 4.0, 0.0, False)
    monkeypatch.setattr(_decoder, "query_position_scale", lambda attn: wrong)
    routed = SkipPlan([LayerPlan(), LayerPlan(attn="routed")])
    with pytest.raises(ValueError, match="Ministral3Attention's queries are not what"):
        fastlayers.apply_skip_plan(_model("Ministral3Scaled"), routed)


def test_per_layer_head_counts_and_rotary_dims():
    """MiMo-V2-Flash's window layer has twice the config's key/value heads (its module's
    num_key_value_groups says so) and RoPE on int(head_dim * 0.334) channels, the factor in its
    layer type's rope_parameters (rounding 10.7 to 11 or reading 1.0 mis-paired the pre-RoPE fold:
    0.9 % off the float model with quantization off, found by the sweep); LFM3's proportional
    RoPE rotates the whole head whatever its factor (tables of the whole head)."""
    model = _model("MiMoV2Flash")
    attns = [attention_of(layer) for layer in decoder_layers(model)]
    assert [head_counts(a) for a in attns] == [(4, 2), (4, 4)]
    assert [rope_layout(a).rotary_dim for a in attns] == [10, 10]
    assert qkv_projections(attns[1]).value_dim == 48 and qkv_projections(attns[1]).v_scale == 0.5
    cfg = transformers.AutoConfig.for_model("lfm3", num_hidden_layers=2, hidden_size=128,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            layer_types=["full_attention", "conv"])  # fmt: skip
    lfm3 = transformers.Lfm3ForCausalLM(cfg)
    attn = attention_of(decoder_layers(lfm3)[0])
    assert cfg.rope_parameters["full_attention"]["rope_type"] == "proportional"
    assert rope_layout(attn).rotary_dim == head_dim_of(attn)


def test_gptj_and_codegen_rope_and_projections():
    """GPT-J and CodeGen rotate one tensor at a time (``apply_rotary_pos_emb(tensor, sin, cos)``)
    on their first ``rotary_dim`` channels, interleaved pairs, tables given as ``(sin, cos)`` with
    one entry per pair (the probe failed on the 3-argument function before); CodeGen's fused
    ``qkv_proj`` holds 4 shards of ``[q | v | k]`` rows: the split gives the module's own
    queries, keys and values, and the fold's rows are theirs."""
    from fastlayers._decoder import cos_sin

    for arch in ("GPTJ", "CodeGen"):
        attn = attention_of(decoder_layers(_model(arch))[0])
        rope = rope_layout(attn)
        assert (rope.pairing, rope.rotary_dim, rope.table_width, rope.sin_first) == (
            "interleaved", 16, 8, True
        )  # fmt: skip
        cos, sin = torch.rand(1, 3, 8), torch.rand(1, 3, 8)
        assert rope.module_tables(cos, sin) == (sin, cos)
        assert cos_sin((sin, cos), attn) == (cos, sin)
    qkv = qkv_projections(attn)  # (CodeGen's)
    assert qkv.fused == "shards" and qkv.shards == 4
    x = torch.randn(5, 128)
    q, k, v, _ = qkv.project(x)
    rows = qkv.q(x).view(5, 4, 3, 32)  # (the module's own view: shards of [q | v | k])
    assert torch.equal(q, rows[:, :, 0].reshape(5, -1))
    assert torch.equal(v, rows[:, :, 1].reshape(5, -1))
    assert torch.equal(k, rows[:, :, 2].reshape(5, -1))
    assert torch.equal(qkv.q(x)[:, qkv.rows("q")], q)
    assert torch.equal(qkv.q(x)[:, qkv.rows("k")], k)


@pytest.mark.parametrize("arch", ["DeepseekV3", "DeepseekV2", "DeepseekV32"])
def test_int4_kv_of_multi_head_latent_attention_caches_the_latent(arch):
    """Multi-head latent attention's INT4 KV path quantizes what its module caches: the latent
    ``[B, 1, T, 32]`` and the RoPE key part ``[B, 1, T, 16]`` (post-RoPE scales ``[1, 16]``, on the
    top channels of the rotated part and their RoPE partners: rotate-half pairs for V3, whose RoPE
    de-interleaves, adjacent pairs for V2's complex tables), INT4 with an FP8 scale per 16
    channels (the largest group dividing both widths), one row ``[latent | RoPE part]`` per token.
    The cached forward is the uncached one;
    crop and beam reordering work; bad groups and scales are refused by name; the gradient
    passes the rounding straight through; remove_rope_aware_kv gives the float model back.
    DeepSeek V3.2: its DSA indexer's keys are cached beside the latent (cropped and reordered
    with it; here as they come, the FP8 keys: the next test); routing its attention is refused by
    name."""
    ids = torch.randint(3, 128, (2, 10))
    want = _logits(_model(arch), ids)
    model = _model(arch)
    post = quant.calibrate_rope_aware_kv(model, [torch.randint(3, 128, (1, 24))], top_k=2)
    for s in post:
        chosen = (s[0] != 1).nonzero()[:, 0]
        assert s.shape == (1, 16) and 2 <= len(chosen) <= 4
        partner = chosen ^ 1 if arch == "DeepseekV2" else (chosen + 8) % 16
        assert set(partner.tolist()) == set(chosen.tolist())
    with pytest.raises(ValueError, match="group_size 12 must be even and divide layer 0's cached"):
        quant.apply_rope_aware_kv(model, post, group_size=12)
    with pytest.raises(ValueError, match=r"post_scales\[0\] must be \[1, 16\]"):
        quant.apply_rope_aware_kv(model, [torch.ones(4, 32)] * 2)
    quant.apply_rope_aware_kv(model, post)
    cache = quant.Int4KVCache.for_model(model, indexer_fp8=False)
    with torch.no_grad():
        cached = model(ids, cache=cache).logits
        plain = model(ids).logits
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)
    assert (cached - want).norm() / want.norm() < 0.25  # (INT4, random weights: ~0.1)
    for layer in cache.layers:  # one row of 4-bit codes per token: [latent | RoPE part], no values
        assert layer.length == 10
        assert [tuple(b.shape[:2]) + (b.shape[3],) for b in layer.buffers] == [
            (2, 1, 24), (2, 1, 3), (2, 1, 0), (2, 1, 0)
        ]  # fmt: skip
    indexed = arch == "DeepseekV32"
    assert (cache.layers[0].indexer_keys is not None) == indexed
    indexer = 16 * 4 if indexed else 0  # (its keys, 16 fp32 channels per token, kept as they come)
    assert cache.nbytes() == 2 * 2 * 10 * (8 + 1 + 16 + 2 + indexer)  # layers, batch, tokens
    cache.crop(-4)  # (speculative rollback: 4 tokens removed) then the last 4 again
    if indexed:
        assert cache.layers[0].indexer_keys.shape[:2] == (2, 6)
    with torch.no_grad():
        again = model(ids[:, 6:], cache=cache).logits
    torch.testing.assert_close(again, plain[:, 6:], rtol=1e-5, atol=1e-5)
    if indexed:
        keys = cache.layers[0].indexer_keys.clone()
        assert keys.shape[:2] == (2, 10)
    kq, ks = cache.layers[0].kq.clone(), cache.layers[0].ks.clone()
    cache.reorder_cache(torch.tensor([1, 0]))  # (beam search)
    assert torch.equal(cache.layers[0].kq, kq[[1, 0]])
    assert torch.equal(cache.layers[0].ks.view(torch.uint8), ks[[1, 0]].view(torch.uint8))
    if indexed:
        assert torch.equal(cache.layers[0].indexer_keys, keys[[1, 0]])
        every = LayerPlan(attn="routed", router_threshold=-1e30, router_gate=False)
        with pytest.raises(ValueError, match="cannot be routed: .* with an indexer"):
            fastlayers.apply_skip_plan(_model(arch), SkipPlan([every, LayerPlan()]))
    model.train()  # quantization-aware training: the rounding passes the gradient through
    model(ids, labels=ids).loss.backward()
    grad = model.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.eval()
    quant.remove_rope_aware_kv(model)
    assert "expand_kv" not in model.model.layers[0].self_attn.__dict__
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)


def test_falcon_projections_and_alibi():
    """Falcon's fused query_key_value in its three layouts: ``[q | k | v]`` with one key/value
    head (multi-query, Falcon-7B: refused before as heads interleaved), ``[kv_heads, group + 2,
    head_dim]`` (the new decoder architecture: refused before) and heads of ``[q, k, v]``; the
    split and the fold's rows are the module's own queries, keys and values. Falcon-RW's ALiBi
    (a bias in the attention mask, no RoPE) is refused by name for routed attention, which would
    drop it (0.77 relative logit error before)."""
    x = torch.randn(5, 128)
    for arch, fused, kv in (("Falcon", "concat", 1), ("FalconNew", "per_head", 2),
                            ("FalconSequential", "per_head", 4)):  # fmt: skip
        attn = attention_of(decoder_layers(_model(arch))[0])
        qkv = qkv_projections(attn)
        assert (qkv.fused, qkv.heads, qkv.kv_heads, qkv.head_dim) == (fused, 4, kv, 32)
        q, k, v, _ = qkv.project(x)
        y = attn.query_key_value(x)
        if arch == "FalconNew":  # (the module's own view: each group's queries, its key, value)
            grouped = y.view(5, 2, 4, 32)
            want = grouped[:, :, :2].reshape(5, -1), grouped[:, :, 2], grouped[:, :, 3]
        elif arch == "Falcon":
            want = y.view(5, 6, 32).split([4, 1, 1], 1)
        else:
            want = y.view(5, 4, 3, 32).unbind(2)
        for got, ref in zip((q, k, v), want, strict=True):
            assert torch.equal(got, ref.reshape(5, -1))
        assert torch.equal(y[:, qkv.rows("q")], q) and torch.equal(y[:, qkv.rows("k")], k)
    every = LayerPlan(attn="routed", router_threshold=-1e30, router_gate=False)
    with pytest.raises(ValueError, match="FalconAttention.s positions are an ALiBi bias"):
        fastlayers.apply_skip_plan(_model("FalconAlibi"), SkipPlan([every, LayerPlan()]))


@pytest.mark.parametrize("arch", ["DeepseekV32", "HYV4"])
def test_dsa_indexer_keys_are_cached_in_fp8(arch):
    """A DSA indexer's keys go into the INT4 cache as FP8-E4M3 with one fp32 scale per token
    (``quantize_fp8_per_token``'s bits: what DeepSeek's reference and vLLM keep), and the indexer
    gets them back dequantized: within half an FP8 step of the float keys (at most 16 / 448 of
    each token's largest key channel); (16 + 4) bytes per token instead of 16 x 4 (fp32 model);
    crop and beam reordering move them with the latent; ``indexer_fp8=False`` keeps them as they
    come, as does a layer given rows of another width than its indexer's keys; a non-bool refused
    by name."""
    from fastlayers.ops.int4_fp8 import quantize_fp8_per_token

    model = _model(arch)
    ids = torch.randint(3, 128, (2, 12))  # (after _model's seed: the same tokens every run)
    fastlayers.patch_model(model, rms_norm=False, kv_cache="int4_rope_aware",
                           calibration=[torch.randint(3, 128, (1, 24))])  # fmt: skip
    fp8 = quant.Int4KVCache.for_model(model)
    plain = quant.Int4KVCache.for_model(model, indexer_fp8=False)
    with torch.no_grad():
        got = model(ids, cache=fp8).logits
        want = model(ids, cache=plain).logits
        step = torch.randint(3, 128, (2, 1))
        model(step, cache=fp8)
        model(step, cache=plain)
    # (random weights: the indexer's scores are near ties, and a changed pick moves the logits:
    # 0.017 for HunYuan V4, 0.20 for V3.2)
    assert (got - want).norm() / want.norm() < 0.3
    for q8, ref in zip(fp8.layers, plain.layers, strict=True):
        keys, scales = q8._indexer
        assert keys.dtype == torch.float8_e4m3fn and keys.shape == (2, 13, 16)
        assert scales.dtype == torch.float32 and scales.shape == (2, 13, 1)
        assert ref._indexer[1] is None and ref.indexer_keys.dtype == torch.float32
        assert ref.nbytes() - q8.nbytes() == 2 * 13 * (16 * 4 - (16 + 4))
    # layer 0's keys come from the same inputs in both runs (the picks change the later layers')
    q8, ref = fp8.layers[0], plain.layers[0]
    want_q, want_s = quantize_fp8_per_token(ref.indexer_keys)
    assert torch.equal(q8._indexer[0].view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(q8._indexer[1], want_s)
    err = (q8.indexer_keys - ref.indexer_keys).abs().amax(-1)
    assert bool((err <= ref.indexer_keys.abs().amax(-1) * 16 / 448).all())
    assert q8.indexer_keys.dtype == torch.float32 and bool((err > 0).any())
    kept = fp8.layers[0].indexer_keys
    fp8.crop(-3)
    assert torch.equal(fp8.layers[0].indexer_keys, kept[:, :10])
    fp8.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(fp8.layers[0].indexer_keys, kept[[1, 0], :10])
    with pytest.raises(TypeError, match="indexer_fp8 must be a bool"):
        quant.Int4KVCache.for_model(model, indexer_fp8=1)
    # rows of another width than the indexer's keys (GLM-5-Next packs more states) stay as they come
    assert [layer.indexer_dim for layer in fp8.layers] == [16, 16]
    other = quant.Int4KVCache.for_model(model)
    other.layers[0].indexer_dim = 17
    with torch.no_grad():
        model(ids, cache=other)
    assert other.layers[0]._indexer[1] is None and other.layers[1]._indexer[1] is not None


@pytest.mark.parametrize("arch", ["DeepseekV32", "HYV4"])
def test_dsa_indexer_picking_every_key_attends_in_place(arch, monkeypatch):
    """A DSA indexer whose top-k covers the whole context (contexts up to ``index_topk`` tokens:
    DeepSeek V3.2's 2048) picks every key, so the mask alone says what each query sees: the
    prompt (left-padded) and the decode steps attend over the INT4 rows in place (prefill and
    decode kernels, absorbed) instead of expanding the prompt's rows and gathering each step's
    picks; generate() equals generate() without a cache (float indexer keys)."""
    from fastlayers.quant import rope_kv_hf

    model = _model(arch, index_topk=64)
    fastlayers.patch_model(model, rms_norm=False, kv_cache="int4_rope_aware",
                           calibration=[torch.randint(3, 128, (1, 24))])  # fmt: skip
    attn = model.model.layers[0].self_attn

    def refused(*args, **kwargs):
        raise AssertionError("expanded or gathered, not attended in place")

    monkeypatch.setattr(type(attn), "expand_kv", refused)
    monkeypatch.setattr(rope_kv_hf, "_picked_rows", refused)
    ids = torch.randint(3, 128, (3, 10))
    kw = _left_padded(ids)
    with torch.no_grad():
        cache = quant.Int4KVCache.for_model(model, indexer_fp8=False)
        cached = model.generate(ids, cache=cache, **kw)
        monkeypatch.undo()
        plain = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.scores, plain.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "arch", ["DeepseekV3", "DeepseekV2", "MiniCPM3", "DeepseekV32", "HYV4", "DeepseekV3-bf16"]
)
def test_int4_latent_decode_attends_over_the_cached_rows(arch, monkeypatch):
    """A decode step of multi-head latent attention with an :class:`Int4KVCache` attends over the
    cache's INT4 rows in place, as FlashMLA does (the queries absorb the key half of
    ``kv_b_proj``, the output its value half), and so does the prompt, left-padded or not
    (the INT4 prefill kernel, the padding skipped): ``expand_kv`` never runs. The scores are
    those of expanding the same cache into every head's keys and values (the absorption switched
    off) to fp32 rounding; in bf16, to the model's. With a DSA indexer (DeepSeek V3.2 picking 4
    keys per query; HunYuan V4 with sinks), each query of the prompt (in chunks of 4 here) and of
    a step reads the rows it picked that the mask and causality show, gathered (the prompt was
    expanded and masked before). A ``kv_b_proj`` with a bias (or not a plain linear layer) is
    expanded instead."""
    from fastlayers.quant import rope_kv_hf

    arch, _, dtype = arch.partition("-")
    bf16 = dtype == "bf16"
    model = _model(arch).to(torch.bfloat16 if bf16 else torch.float32)
    fastlayers.patch_model(model, rms_norm=False, kv_cache="int4_rope_aware",
                           calibration=[torch.randint(3, 128, (1, 24))])  # fmt: skip
    attn = model.model.layers[0].self_attn
    calls = []
    own = type(attn).expand_kv

    def counted(module, *args):
        calls.append(args[0].shape[2])  # (the tokens it expands)
        return own(module, *args)

    monkeypatch.setattr(type(attn), "expand_kv", counted)
    monkeypatch.setattr(rope_kv_hf, "_PICKED_QUERY_CHUNK", 4)  # (10 prompt tokens: 3 chunks)
    ids = torch.randint(3, 128, (3, 10))
    kw = _left_padded(ids)
    layers = len(model.model.layers)
    with torch.no_grad():
        absorbed = model.generate(ids, cache=quant.Int4KVCache.for_model(model), **kw)
        assert calls == []  # (left padding: skipped in place; a DSA indexer's picks: gathered)
        calls.clear()
        own_absorbable = rope_kv_hf._absorbable
        monkeypatch.setattr(rope_kv_hf, "_absorbable", lambda module, query: None)
        expanded = model.generate(ids, cache=quant.Int4KVCache.for_model(model), **kw)
        assert calls == [t for t in range(10, 16) for _ in range(layers)]
    tol = 3e-2 if bf16 else 1e-5
    for a, b in zip(absorbed.scores, expanded.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    if not bf16:
        assert torch.equal(absorbed.sequences, expanded.sequences)
    # a prompt without padding (no mask but causality): the same
    plain_ids = torch.randint(3, 128, (2, 12))
    kw.pop("attention_mask")
    calls.clear()
    with torch.no_grad():
        expanded = model.generate(plain_ids, cache=quant.Int4KVCache.for_model(model), **kw)
        monkeypatch.setattr(rope_kv_hf, "_absorbable", own_absorbable)
        calls.clear()
        absorbed = model.generate(plain_ids, cache=quant.Int4KVCache.for_model(model), **kw)
    assert calls == []
    for a, b in zip(absorbed.scores, expanded.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    monkeypatch.undo()
    mla = attn._fl_mla
    query = torch.zeros(1, mla.heads, 1, mla.nope + mla.rope)
    assert rope_kv_hf._absorbable(attn, query) is mla
    attn.kv_b_proj.bias = torch.nn.Parameter(torch.zeros(attn.kv_b_proj.out_features))
    assert rope_kv_hf._absorbable(attn, query) is None


# the structures whose INT4 path differs: soft-capping (Gemma 2), windows and sandwich norms (Gemma
# 3), sinks and windows (GPT-OSS), q/k norms (Qwen 3), a fused qkv (Phi-3), multi-query with a
# parallel block and ALiBi's masked path (Falcon), multi-head latent attention with and without an
# indexer, values of their own head size (DeepSeek, MiMo-V2-Flash), LayerNorms (GPT-NeoX)
_DIFFERENTIAL = ["Gemma2", "Gemma3", "GptOss", "Qwen3", "Phi3", "Falcon", "FalconAlibi",
                 "DeepseekV3", "DeepseekV32", "MiMoV2Flash", "GPTNeoX"]  # fmt: skip
# routed attention: the varlen kernels' soft-capping, windows (a model-wide one: Mistral), sinks,
# q/k norms, head sizes
_ROUTED = ["Gemma2", "Gemma3", "GptOss", "Qwen3", "Phi3", "Mistral", "DeepseekV3", "MiMoV2Flash",
           "GPTNeoX"]  # fmt: skip
# and the structures of both that differ in other ways: Llama 4's NoPE layer scaling its queries,
# HunYuan's q/k norms after RoPE, Laguna's output gates, MiniCPM3's latent attention and residual
# scales, HunYuan V4's latent attention with an indexer and sinks, GPT-J's interleaved RoPE tables
# (CodeGen's in a sharded qkv), GPT-2's Conv1D projections, GPT-BigCode's multi-query c_attn,
# Persimmon's and OLMo 2's q/k norms, StableLM's quarter of each head rotated, GLM-4's interleaved
# half, Cohere's parallel block, NanoChat's weightless q/k norms, EXAONE 4's windowed layers,
# Ministral 3's position-scaled queries, Falcon-40B's grouped qkv, MiniCPM5's query gates,
# BitNet's sub-norm, SmolLM3's NoPE layer, Granite's multipliers, Phi's partial RoPE
_MORE = ["Llama4TextNope", "HunYuanDenseV1", "Laguna", "MiniCPM3", "GPTJ", "CodeGen", "GPT2",
         "GPTBigCode", "Persimmon", "StableLm", "Glm4", "Cohere", "Olmo2", "NanoChat", "Exaone4",
         "Ministral3Scaled", "FalconNew", "Granite", "SmolLM3"]  # fmt: skip
_DIFFERENTIAL_MORE = [*_MORE, "HYV4", "MiniCPM5Moe", "BitNet"]
_ROUTED_MORE = [*_MORE, "Falcon", "Phi"]


def _fp32_only_when_emulated(dtype, device) -> None:
    """Skips a bf16 case on the emulated CUDA kernels (the further structures, the swapped
    feedforwards): each emulated launch runs one block after another, and under CI's sanitizers
    their bf16 cases added minutes; the CPU kernels and a GPU run them all."""
    emulated = device == "cpu" and _common.on_cuda(torch.device(device))
    if emulated and dtype != torch.float32:
        pytest.skip("emulated CUDA kernels: fp32 only for this case")


# weights of 5x the configs' default spread: scores of order one, where soft-capping, sinks and
# masks move the softmax (at the default, Gemma 2's cap of 1.0 moved the logits by 6e-6)
_SHARP = 0.1


# (ALiBi's bias, a mask, and multi-head latent attention attend in PyTorch over the dequantized or
# absorbed INT4 rows: no INT4 attention kernel)
_INT4_IN_PYTORCH = ("FalconAlibi", "DeepseekV3", "DeepseekV32", "HYV4", "MiniCPM3")


def _generate_and_train(ids, cache):
    """A model's logits (on ``ids``' unpadded positions, row 0 left-padded), greedy generate()
    with ``cache()`` (its tokens and scores), a training step's loss of each row (next-token
    cross-entropy, as ``labels=ids`` gives it: the step's loss is their mean) and the gradient of
    each row's loss for each module's parameters (``[rows, their size]``, the parameters
    flattened together: a bias's gradient, a sum over tokens that may cancel, counts with its
    weight's). By row, because a hard decision that went the other way (an FP8 rounding, a
    router's threshold) moves its row's values only, and the gradients of the batch's mean loss
    all of them."""
    kw = _left_padded(ids)

    def step(m):
        with torch.no_grad():
            real = kw["attention_mask"].bool()
            logits = m(ids, attention_mask=kw["attention_mask"]).logits[real]
            out = m.generate(ids, cache=cache(m), **kw)
        m.train()
        torch.manual_seed(0)  # (the same dropout masks on both routes: GPT-2's)
        scores = m(ids, attention_mask=kw["attention_mask"]).logits[:, :-1].float()
        losses = torch.nn.functional.cross_entropy(
            scores.transpose(1, 2), ids[:, 1:], reduction="none"
        ).mean(1)
        names, params = zip(*[(n, p) for n, p in m.named_parameters() if p.requires_grad],
                            strict=True)  # fmt: skip
        rows = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                for loss in losses]  # fmt: skip
        grads = {}  # (a parameter a row does not reach, an expert none of its tokens chose: 0)
        for i, (n, p) in enumerate(zip(names, params, strict=True)):
            g = [p.new_zeros(p.numel()) if r[i] is None else r[i].flatten() for r in rows]
            grads.setdefault(n.rpartition(".")[0], []).append(torch.stack(g))
        grads = {n: torch.cat(g, 1) for n, g in grads.items()}
        return logits, out.sequences, out.scores, losses.detach(), grads

    return step


# (tight, loose) relative differences of the two routes: fp32 sums in other orders, bf16 rounds
# at other points too; loose: where a hard decision flipped (a value on a rounding boundary of the
# FP8 activations or the INT4 cache, a token near its router's threshold)
_TIGHT = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# gradients in bf16: both routes are some percent off an fp32 run's where a small gradient (a
# q/k norm's weight, a sum over tokens and heads) cancels, the kernels about twice as far (their
# P and dS rounded to bf16 for the tensor cores, as FlashAttention's): Persimmon's q_layernorm
# 3.5 / 7 % (reference / kernels) off fp32, 5.7 % apart
_TIGHT_GRAD = {torch.float32: 1e-4, torch.bfloat16: 1e-1}
_LOOSE = 0.1


def _mostly_close(pairs, tight: float, what: str) -> None:
    """Each pair's relative difference below ``_LOOSE``, at least two thirds of them below
    ``tight``: a quantized or routed model takes hard decisions, and a value that falls on a
    decision's boundary (one in a few thousand) may go either way on the two routes, which then
    differ by a rounding step (a percent or two) from there on; a defect (a mask, a cap or a sink
    applied otherwise) moves most of them, and by more."""
    errs = [relative(g, w) for g, w in pairs]
    assert errs and max(errs) < _LOOSE, f"{what}: relative differences up to {max(errs):.2e}"
    close = sum(e < tight for e in errs)
    assert 3 * close >= 2 * len(errs), f"{what}: {close} of {len(errs)} within {tight:.0e}: {errs}"


def _assert_routes_agree(got, want, dtype) -> None:
    """The two routes' ``_generate_and_train`` results agree (``_mostly_close``): the logits of
    each position, the scores of each row's steps up to the first token the routes chose apart
    (two thirds of the rows at least choose the same tokens throughout), each row's loss; each
    module's gradients of two thirds of the rows at least within ``tight`` (a flip moves the
    gradients of its row, an expert's from zero when a token chose it on one route only; a defect
    in a module's gradients moves them in every row)."""
    (lk, tk, ck, sk, gk), (lr, tr, cr, sr, gr) = got, want
    tight = _TIGHT[dtype]
    _mostly_close(list(zip(lk, lr, strict=True)), tight, "logits")
    steps = len(cr)
    same = (tk[:, -steps:] == tr[:, -steps:]).long().cumprod(1)  # [B, steps]: same tokens so far
    assert 3 * int(same[:, -1].sum()) >= 2 * same.shape[0], (tk, tr)
    scores = [(ck[i][r], cr[i][r]) for r in range(same.shape[0]) for i in range(steps)
              if i == 0 or same[r, i - 1]]  # fmt: skip
    _mostly_close(scores, tight, "scores")
    _mostly_close(list(zip(sk, sr, strict=True)), tight, "losses")
    assert gk.keys() == gr.keys() and gk
    # (a row's error measured against at least a hundredth of the module's largest row gradient,
    # or of the model's if the module has none: a row with one routed token has no gradient for
    # its query and key, a softmax over one score, which the reference gives as exactly 0 and the
    # kernels as 1e-7 of the other rows'; a layer may route one token of each row)
    largest = max(float(g.double().norm(dim=1).max()) for g in gr.values())
    for n in gr:
        floor = 1e-2 * (float(gr[n].double().norm(dim=1).max()) or largest) or 1e-30
        errs = [float((g.double() - w.double()).norm()) / max(float(w.double().norm()), floor)
                for g, w in zip(gk[n], gr[n], strict=True)]  # fmt: skip
        close = sum(e < _TIGHT_GRAD[dtype] for e in errs)
        assert 3 * close >= 2 * len(errs), f"{n}'s gradients of each row: {errs}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", _DIFFERENTIAL + _DIFFERENTIAL_MORE)
def test_int4_patched_architectures_kernels_match_the_reference_route(arch, dtype, device,
                                                                      monkeypatch):  # fmt: skip
    """Each structure patched with every INT4 path (INT4 x FP8 linears, the RoPE-aware INT4 KV
    cache, the RMSNorms) run with its kernels and with the compiled part switched off: the logits
    of a left-padded batch, greedy generate() with the INT4 cache (its scores step by step), a
    training step's loss and gradients agree, in fp32 and bf16 (test_patch.py's test of the
    Llama, here the structures the INT4 attention handles otherwise); the CPU kernels, the CUDA
    ones on a GPU, and in a CUDA emulation build the CUDA kernels' route on the CPU (it found
    Int4Fp8Linear's CUDA route for more than 16 rows giving a view, which Falcon's
    ``mlp_output += attention_output`` may not change in place when a training step's autograd
    Function returned it)."""
    if fastlayers._ext.C is None:
        pytest.skip("needs the compiled extension")
    if arch in _DIFFERENTIAL_MORE:
        _fp32_only_when_emulated(dtype, device)
    model = _model(arch, initializer_range=_SHARP)
    calib = [torch.randint(3, 128, (1, 24))]
    fastlayers.patch_model(model, linear="int4_fp8", kv_cache="int4_rope_aware",
                           calibration=calib)  # fmt: skip
    model.to(device=device, dtype=dtype)  # (a GPU: the model on it; emulated: on the CPU)
    ids = torch.randint(3, 128, (6, 10)).to(device)
    step = _generate_and_train(ids, lambda m: quant.Int4KVCache.for_model(m))
    got, want, used = on_both_routes(model, step, monkeypatch)
    cuda = _common.on_cuda(torch.device(device))  # (a GPU, or the CUDA kernels emulated)
    want_used = {"int4_fp8_gemm", "kv_quantize"}
    if arch not in _INT4_IN_PYTORCH:
        want_used.add("int4_kv_decode_cuda_workspace" if cuda else "int4_kv_decode")
    assert want_used <= used, sorted(used)
    _assert_routes_agree(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", _ROUTED + _ROUTED_MORE)
def test_routed_architectures_kernels_match_the_reference_route(arch, dtype, device,
                                                                monkeypatch):  # fmt: skip
    """Routed attention on every layer (about half the tokens each, random routers) run with its
    kernels and with the compiled part switched off: logits of a left-padded batch, generate()
    with a LayerSkipCache, a training step's loss and gradients (the routers' too) agree: the
    varlen attention kernels with each structure's soft-capping, windows, sinks and head sizes."""
    from fastlayers.skip_plan import LayerSkipCache

    if fastlayers._ext.C is None:
        pytest.skip("needs the compiled extension")
    if arch in _ROUTED_MORE:
        _fp32_only_when_emulated(dtype, device)
    model = _model(arch, initializer_range=_SHARP)
    model = fastlayers.apply_skip_plan(model, SkipPlan([LayerPlan(attn="routed")] * 2))
    for layer in decoder_layers(model):
        with torch.no_grad():
            layer.fastlayers_router.weight.normal_(0.0, 0.5)
            layer.fastlayers_router.bias.zero_()
    model.to(device=device, dtype=dtype)  # (a GPU: the model on it; emulated: on the CPU)
    ids = torch.randint(3, 128, (6, 10)).to(device)
    step = _generate_and_train(ids, lambda m: LayerSkipCache())
    got, want, used = on_both_routes(model, step, monkeypatch)
    cuda = _common.on_cuda(torch.device(device))  # (a GPU, or the CUDA kernels emulated)
    route = "varlen_attention_cuda_supported" if cuda else "varlen_cpu_workspace_floats"
    assert {"varlen_attention", "varlen_attention_bwd", route} <= used, sorted(used)
    _assert_routes_agree(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mlp", ["fff", "peer"])
@pytest.mark.parametrize("arch", ["Gemma3", "Falcon", "GPTNeoX", "GPT2", "Cohere", "DeepseekV3",
                                  "Llama4Text", "Qwen3"])  # fmt: skip
def test_mlp_swapped_architectures_kernels_match_the_reference_route(arch, mlp, dtype, device,
                                                                     monkeypatch):  # fmt: skip
    """Each structure's feedforwards swapped for FFF or PEER run with the kernels and with the
    compiled part switched off agree (logits, generate(), each row's loss and gradients): sandwich
    norms (Gemma 3), parallel blocks (Falcon adds into the feedforward's output in place, which
    autograd refused on the reference route: the op's output was a view; GPT-NeoX, Cohere),
    GPT-2's Conv1D feedforward, MoE layers (DeepSeek V3; Llama 4's returns a tuple, which its
    layer unpacks: the swapped module returned a tensor, whose batch the layer split)."""
    if fastlayers._ext.C is None:
        pytest.skip("needs the compiled extension")
    _fp32_only_when_emulated(dtype, device)
    model = _model(arch, initializer_range=_SHARP)
    report = fastlayers.patch_model(model, mlp=mlp)
    assert len([s for s in report.swapped if s[2] != "fastlayers.RMSNorm"]) == 2
    model.to(device=device, dtype=dtype)
    ids = torch.randint(3, 128, (6, 10)).to(device)
    step = _generate_and_train(ids, lambda m: transformers.DynamicCache(config=m.config))
    got, want, used = on_both_routes(model, step, monkeypatch)
    kernels = {"fff": {"fff_ultra_fwd", "fff_ultra_bwd"},
               "peer": {"peer_retrieve", "peer_experts_fwd", "peer_experts_bwd"}}[mlp]  # fmt: skip
    assert kernels <= used, sorted(used)
    _assert_routes_agree(got, want, dtype)


@pytest.mark.parametrize("arch", ["Llama", "Phi", "GPT2", "GptOss", "HunYuanDenseV1", "DeepseekV3"])
def test_patched_models_copy_and_pickle(arch):
    """A model with a skip plan (layer 0's attention routed, layer 1's feedforward skipped) copied
    with copy.deepcopy runs the copy's own layers: its weights changed after the copy, it answers
    as a model planned with those weights (the planned forwards were closures over the original's
    layers); pickled with torch.save it loads and answers as the original. So does a model with
    INT4 linears and the INT4 KV cache (DeepSeek V3: its latent's rounding, an override on the
    module, was a bound method that did not pickle, and the copy's attention was refused as
    computing other keys than its submodules, the check seeing the override; HunYuan: the copy's
    check finds again where its q/k norms sit, after RoPE)."""
    import io

    from fastlayers.skip_plan import LayerSkipCache

    ids = torch.randint(3, 128, (2, 8))
    plan = SkipPlan([LayerPlan(attn="routed"), LayerPlan(ffn="skip")])
    planned = fastlayers.apply_skip_plan(_model(arch), plan)
    twin = copy.deepcopy(planned)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.25)
    fresh = fastlayers.apply_skip_plan(_model(arch), plan)
    fresh.load_state_dict(twin.state_dict())
    torch.testing.assert_close(_logits(twin, ids), _logits(fresh, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(twin, ids), _logits(planned, ids), rtol=1e-2, atol=1e-2)

    def reloaded(model):
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    kw = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        want = planned.generate(ids, cache=LayerSkipCache(), **kw)
        assert torch.equal(reloaded(planned).generate(ids, cache=LayerSkipCache(), **kw), want)
    quantized = _model(arch)
    fastlayers.patch_model(quantized, linear="int4_fp8", kv_cache="int4_rope_aware",
                           calibration=[torch.randint(3, 128, (1, 16))])  # fmt: skip
    with torch.no_grad():
        want = quantized.generate(ids, cache=quant.Int4KVCache.for_model(quantized), **kw)
        for other in (copy.deepcopy(quantized), reloaded(quantized)):
            got = other.generate(ids, cache=quant.Int4KVCache.for_model(other), **kw)
            assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ["Llama", "DeepseekV32"])
def test_a_pickled_int4_kv_model_generates_in_a_fresh_process(arch, tmp_path):
    """A model with the INT4 KV cache, saved whole with torch.save, loads in a new process that
    imported only torch and generates what it did (its config names the INT4 attention, which
    unpickling registers: the model holds an object of the module that registers it; it once
    named an attention the new process did not know)."""
    import subprocess
    import sys

    model = _model(arch)
    fastlayers.patch_model(model, rms_norm=False, kv_cache="int4_rope_aware",
                           calibration=[torch.randint(3, 128, (1, 16))])  # fmt: skip
    ids = torch.randint(3, 128, (1, 8))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=4, do_sample=False)
    torch.save({"model": model, "ids": ids, "want": want}, tmp_path / "model.pt")
    script = (
        "import sys, torch\n"
        "saved = torch.load(sys.argv[1], weights_only=False)\n"
        "with torch.no_grad():\n"
        "    got = saved['model'].generate(saved['ids'], max_new_tokens=4, do_sample=False)\n"
        "assert torch.equal(got, saved['want']), (got, saved['want'])\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.pt")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]


def test_compiled_routed_attention_breaks_only_at_its_host_reads():
    """torch.compile of a model with routed attention: the same logits, and the graph breaks only
    where the routed step reads its token counts on the host (the RoPE probes' outcomes, cached
    per class, were traced through, probe and all: more breaks, on a data-dependent
    ``aten.equal``)."""
    from torch._dynamo.utils import counters

    ids = torch.randint(3, 128, (2, 8))
    model = fastlayers.apply_skip_plan(_model("Llama"), SkipPlan([LayerPlan(attn="routed")] * 2))
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        got = torch.compile(model)(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    reasons = list(counters["graph_break"])
    assert reasons and not [r for r in reasons if "aten.equal" in r], reasons
