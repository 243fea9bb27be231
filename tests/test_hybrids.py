# SPDX-License-Identifier: Apache-2.0
"""Hybrid decoders on the drop-in paths: models whose layers mix tokens with softmax attention in
some layers and with a linear attention (Qwen3-Next's and Qwen3.5's gated delta nets, OLMo-hybrid),
a Mamba layer (Granite 4, Jamba, Bamba) or a short convolution (LFM2, LFM3) in the others
(Kimi-Linear, Bailing-hybrid: delta-rule or linear attention layers beside multi-head latent
attention). Skip
plans skip either kind of mixer; routed attention and the INT4 KV cache work on the softmax
attention layers (Qwen3-Next's and Qwen3.5's queries carry output gates, LFM3 gates its output with
a sigmoid ``g_proj``, Granite 4 gives no RoPE tables) and refuse the others by name; Hugging Face's
hybrid caches measure the sequence on the first softmax attention layer, where a skipped or routed
layer keeps its length. Every model is a tiny random one built from its transformers config and
compared with itself unpatched, or with recomputing the whole sequence without a cache."""

import math

import pytest
import torch
from _decoders import assert_generate_equals_recompute, residual_norm_ratio

transformers = pytest.importorskip("transformers")

import fastlayers  # noqa: E402
from fastlayers import quant  # noqa: E402
from fastlayers._decoder import (  # noqa: E402
    decoder_layers,
    linear_mixer,
    mixer_name,
    qkv_projections,
)
from fastlayers.skip_plan import (  # noqa: E402
    LayerPlan,
    LayerSkipCache,
    SkipPlan,
    self_speculative_generate,
)

# model type -> the layer types of its tiny config (softmax attention after linear layers, as the
# models interleave them) and config values besides the common ones
HYBRIDS = {
    "qwen3_next": (["linear_attention", "linear_attention", "full_attention"],
                   dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                        shared_expert_intermediate_size=64)),
    "qwen3_5_text": (["linear_attention", "full_attention", "linear_attention"], {}),
    "olmo_hybrid": (["linear_attention", "linear_attention", "full_attention"], {}),
    "lfm2": (["conv", "full_attention", "conv"], {}),
    "lfm3": (["conv", "full_attention", "conv"], {}),
    # Granite 4: Mamba-2 layers, no rotary embedding (no RoPE tables given), a shared_mlp beside
    # each MoE
    "granitemoehybrid": (["linear_attention", "full_attention", "linear_attention"],
                         dict(num_local_experts=4, num_experts_per_tok=2, mamba_n_heads=4,
                              mamba_d_head=64, mamba_d_state=16)),
    # Jamba and Bamba: Mamba layers, attention without RoPE; their layer types follow from these
    "jamba": (["linear_attention", "full_attention", "linear_attention"],
              dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                   expert_layer_offset=1, mamba_d_state=16, num_experts=4, num_experts_per_tok=2)),
    "bamba": (["linear_attention", "full_attention", "linear_attention"],
              dict(attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=64, mamba_d_state=16)),
    # Nemotron-H: one sublayer per block (h + mixer(norm(h))): Mamba-2, MLP, attention (no RoPE)
    "nemotron_h": (["linear_attention", "mlp", "full_attention", "linear_attention"], {}),
    # LaraMini: RoPE tables for its sliding-window layers only, its global layers get None
    "lara_mini": (["linear_attention", "sliding_attention", "full_attention"],
                  dict(sliding_window=4)),
    # Kimi-Linear: delta-rule linear attention layers and multi-head latent attention (no RoPE)
    "kimi_linear": (["linear_attention", "full_attention", "linear_attention"],
                    dict(qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24, kv_lora_rank=32,
                         num_key_value_heads=4, linear_head_dim=32, linear_num_heads=4)),
    # Bailing-hybrid: linear attention layers beside multi-head latent attention with a g_proj
    # output gate
    "bailing_hybrid": (["linear_attention", "full_attention", "linear_attention"],
                       dict(qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24,
                            kv_lora_rank=32, num_key_value_heads=4, head_dim=16)),
}  # fmt: skip


def _model(model_type: str):
    types, extra = HYBRIDS[model_type]
    cfg = transformers.AutoConfig.for_model(model_type)
    small = dict(vocab_size=128, hidden_size=128, intermediate_size=256,
                 num_hidden_layers=len(types), num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2)  # fmt: skip
    small.update(extra)
    for key, value in small.items():
        if hasattr(cfg, key) or key == "head_dim":
            setattr(cfg, key, value)
    if model_type not in ("jamba", "bamba"):  # (theirs follow from attn_layer_*)
        cfg.layer_types = list(types)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    torch.manual_seed(0)
    model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])(cfg).eval()
    assert [linear_mixer(x) is None for x in decoder_layers(model)] == [
        t.endswith("attention") and not t.startswith("linear") for t in types
    ]
    with torch.no_grad():  # norms away from their initial values, so that their placement matters
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _attention_layers(model) -> list[int]:
    return [i for i, x in enumerate(decoder_layers(model)) if linear_mixer(x) is None]


class _Zero(torch.nn.Module):
    """A mixer answering zeros: a tuple like an attention, bare like a linear attention."""

    def __init__(self, bare: bool):
        super().__init__()
        self.bare = bare

    def forward(self, hidden_states, *args, **kwargs):
        z = torch.zeros_like(hidden_states)
        return z if self.bare else (z, None)


@pytest.mark.parametrize("model_type", list(HYBRIDS))
def test_skip_plans_skip_either_kind_of_mixer(model_type):
    """A full plan is the model; skipping a linear attention / convolution layer's mixer, or a
    softmax attention layer's, is the model with that mixer answering zeros (the layout check ran
    each kind of layer: a linear mixer answers a bare tensor, an attention a tuple)."""
    ids = torch.randint(3, 128, (2, 12))
    want = _logits(_model(model_type), ids)
    n = len(HYBRIDS[model_type][0])
    full = fastlayers.apply_skip_plan(_model(model_type), SkipPlan.full(n))
    assert torch.equal(_logits(full, ids), want)
    attention = _attention_layers(full)
    for i in (0, attention[0]):  # a linear layer, then the softmax attention layer
        ref = _model(model_type)
        layer = decoder_layers(ref)[i]
        setattr(layer, mixer_name(layer), _Zero(bare=linear_mixer(layer) is not None))
        plan = SkipPlan([LayerPlan("skip" if j == i else "full") for j in range(n)])
        planned = fastlayers.apply_skip_plan(_model(model_type), plan)
        torch.testing.assert_close(_logits(planned, ids), _logits(ref, ids), rtol=0, atol=0)


@pytest.mark.parametrize("model_type", list(HYBRIDS))
def test_routed_attention_on_a_hybrids_softmax_attention_layer(model_type):
    """Routing every token, ungated, through the softmax attention layer is the model (Qwen3-Next's
    and Qwen3.5's output gates from the queries' projection, LFM3's sigmoid g_proj, LFM2's
    out_proj); a linear attention or convolution layer is refused by name."""
    ids = torch.randint(3, 128, (2, 12))
    want = _logits(_model(model_type), ids)
    n = len(HYBRIDS[model_type][0])
    model = _model(model_type)
    i = _attention_layers(model)[0]
    every = LayerPlan(attn="routed", router_threshold=-1e30, router_gate=False)
    plan = SkipPlan([every if j == i else LayerPlan() for j in range(n)])
    fastlayers.apply_skip_plan(model, plan)
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)
    linear = next(j for j in range(n) if j != i)
    plan = SkipPlan([every if j == linear else LayerPlan() for j in range(n)])
    with pytest.raises(ValueError, match=f"layer {linear} cannot be routed: its token mixer is"):
        fastlayers.apply_skip_plan(_model(model_type), plan)


@pytest.mark.parametrize("model_type", list(HYBRIDS))
@pytest.mark.parametrize("cache", ["own", "LayerSkipCache"])
def test_generate_with_routed_and_skipped_layers_on_hybrids(model_type, cache):
    """generate() with the softmax attention layer routed (half the tokens, a random router) and a
    linear layer's mixer skipped equals recomputing the whole sequence at every step, with the
    model's own hybrid cache (which measures on that routed layer: its length kept there) and
    with a LayerSkipCache made from the config (its linear attention layers)."""
    n = len(HYBRIDS[model_type][0])
    model = _model(model_type)
    i = _attention_layers(model)[0]
    skipped = n - 1 if n - 1 != i else 0
    plan = SkipPlan([LayerPlan("routed") if j == i else LayerPlan("skip" if j == skipped
                     else "full") for j in range(n)])  # fmt: skip
    fastlayers.apply_skip_plan(model, plan)
    with torch.no_grad():
        decoder_layers(model)[i].fastlayers_router.weight.normal_(0.0, 0.5)
        decoder_layers(model)[i].fastlayers_router.bias.zero_()
    ids = torch.randint(3, 128, (1, 10))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_scores=True,
              return_dict_in_generate=True)  # fmt: skip
    if cache == "LayerSkipCache":
        kw["cache"] = LayerSkipCache(config=model.config)
    with torch.no_grad():
        assert_generate_equals_recompute(model, ids, model.generate(ids, **kw))
    if cache == "LayerSkipCache":  # (the linear attention states cannot be rolled back)
        with pytest.raises(ValueError, match="cannot be rolled back"):
            kw["cache"].crop_to(4)
        kw["cache"] = LayerSkipCache()  # (no layers for the linear attention states)
        with torch.no_grad(), pytest.raises(ValueError, match=r"LayerSkipCache\(config="):
            model.generate(ids, **kw)


@pytest.mark.parametrize("model_type", list(HYBRIDS))
def test_int4_kv_on_a_hybrids_softmax_attention_layers(model_type):
    """The INT4 KV path on the softmax attention layers only: calibration with quantization off is
    the float model, the scales of the other layers are None, ``Int4KVCache.for_model`` holds
    Hugging Face's own cache layers for them, and generate() with it equals generate() without a
    cache (left padding in the batch)."""
    ids = torch.randint(3, 128, (2, 10))
    want = _logits(_model(model_type), ids)
    calib = [torch.randint(3, 128, (1, 16))]
    model = _model(model_type)
    attention = _attention_layers(model)
    post = quant.calibrate_rope_aware_kv(model, calib)
    assert [s is not None for s in post] == [i in attention for i in range(len(post))]
    quant.apply_rope_aware_kv(model, post, q_fp8=False, quantize_keys=False,
                              quantize_values=False)  # fmt: skip
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)
    model = _model(model_type)
    report = fastlayers.patch_model(model, rms_norm=False, kv_cache="int4_rope_aware",
                                    calibration=calib)  # fmt: skip
    assert [s[0] for s in report.swapped] == [f"layer {i} attention" for i in attention]
    cache = quant.Int4KVCache.for_model(model)
    kinds = [type(x).__name__ for x in cache.layers]
    latent = model_type in ("kimi_linear", "bailing_hybrid")  # (MLA: the cache holds the latent)
    own = "_Int4LatentLayer" if latent else "_Int4Layer"
    assert [k == own for k in kinds] == [i in attention for i in range(len(kinds))]
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[mask == 0] = 0
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, output_scores=True,
              return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        cached = model.generate(ids, cache=cache, **kw)
        plain = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.scores, plain.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert cache.nbytes() > 0
    with pytest.raises(ValueError, match="without softmax attention"):
        quant.apply_rope_aware_kv(_model(model_type), [torch.ones(2, 32)] * len(post))


def test_query_gates_are_split_from_the_queries():
    """Qwen3.5's q_proj gives each head's queries then its output gate logits: the projections
    split them so, and the query rows (where a pre-RoPE scale would be folded) are the queries'."""
    model = _model("qwen3_5_text")
    attn = decoder_layers(model)[_attention_layers(model)[0]].self_attn
    qkv = qkv_projections(attn)
    assert qkv.q_gate and qkv.fused is None
    x = torch.randn(5, 128)
    q, _, _, gate = qkv.project(x)
    y = attn.q_proj(x).view(5, qkv.heads, 2, qkv.head_dim)
    assert torch.equal(q, y[:, :, 0].flatten(1)) and torch.equal(gate, y[:, :, 1].flatten(1))
    rows = qkv.rows("q")
    want = torch.nn.functional.linear(x, attn.q_proj.weight[rows], attn.q_proj.bias[rows]
                                      if attn.q_proj.bias is not None else None)  # fmt: skip
    torch.testing.assert_close(q, want)


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "lfm3"])
def test_self_speculative_generate_refuses_hybrids(model_type):
    """Early-exit drafting rolls the cache back after a rejected draft, which a linear attention's
    or a convolution's state cannot do: refused with the layer and why."""
    model = _model(model_type)
    ids = torch.randint(3, 128, (1, 6))
    with pytest.raises(TypeError, match="cannot be rolled back|needs a Llama-style model"):
        self_speculative_generate(model, ids, 1, 4)
    if model_type == "qwen3_5_text":
        with pytest.raises(TypeError, match="layer 0's token mixer is Qwen3_5GatedDeltaNet"):
            self_speculative_generate(model, ids, 1, 4)


def test_from_similarity_adds_granites_shared_feedforward():
    """Granite 4's feedforward is its MoE plus a shared_mlp on the same input: with a layer's mixer
    zeroed, the feedforward's residual-norm ratio from_similarity measures is the layer's own
    |h_out| / |h_in| (both outputs, times the residual multiplier)."""
    model = _model("granitemoehybrid")
    layer = decoder_layers(model)[1]
    layer.self_attn = _Zero(bare=False)
    batch = torch.randint(3, 128, (2, 12))
    plan = SkipPlan.from_similarity(model, [batch], num_ffn_skip=3)
    ratio = residual_norm_ratio(model, layer, batch)
    assert math.isclose(plan.layers[1].ffn_scale, ratio, rel_tol=1e-4)


def test_routed_attention_where_the_model_gives_some_layers_no_rope_tables():
    """LaraMini gives its sliding-window layers RoPE tables and its global layers None (no RoPE):
    each routed layer is checked in both ways and runs as it is called; routing every token of
    both is the model, and generate() with half of them routed is recomputing the sequence."""
    ids = torch.randint(3, 128, (2, 12))
    want = _logits(_model("lara_mini"), ids)
    every = LayerPlan(attn="routed", router_threshold=-1e30, router_gate=False)
    model = fastlayers.apply_skip_plan(_model("lara_mini"), SkipPlan([LayerPlan(), every, every]))
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)
    plan = SkipPlan([LayerPlan(), LayerPlan("routed"), LayerPlan("routed")])
    model = fastlayers.apply_skip_plan(_model("lara_mini"), plan)
    with torch.no_grad():
        for i in (1, 2):
            decoder_layers(model)[i].fastlayers_router.weight.normal_(0.0, 0.5)
            decoder_layers(model)[i].fastlayers_router.bias.zero_()
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_scores=True,
              return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        assert_generate_equals_recompute(model, ids[:1], model.generate(ids[:1], **kw))


def test_nemotron_h_blocks_hold_one_sublayer():
    """Nemotron-H's blocks are ``h + mixer(norm(h))`` with one mixer each: skipping an MLP block's
    feedforward is the model with that MLP answering zeros; a plan for the sublayer a block has
    not is refused by name; from_similarity measures each block's one sublayer and its plans
    install."""
    ids = torch.randint(3, 128, (2, 12))
    ref = _model("nemotron_h")
    decoder_layers(ref)[1].mixer = _Zero(bare=True)
    plan = SkipPlan([LayerPlan(), LayerPlan(ffn="skip"), LayerPlan(), LayerPlan()])
    planned = fastlayers.apply_skip_plan(_model("nemotron_h"), plan)
    torch.testing.assert_close(_logits(planned, ids), _logits(ref, ids), rtol=0, atol=0)
    for bad, match in ((LayerPlan(attn="skip"), "layer 1 is a feedforward block"),):
        with pytest.raises(ValueError, match=match):
            plan = SkipPlan([LayerPlan(), bad, LayerPlan(), LayerPlan()])
            fastlayers.apply_skip_plan(_model("nemotron_h"), plan)
    with pytest.raises(ValueError, match="layer 2 is an attention block without a feedforward"):
        plan = SkipPlan([LayerPlan(), LayerPlan(), LayerPlan(ffn="skip"), LayerPlan()])
        fastlayers.apply_skip_plan(_model("nemotron_h"), plan)
    model = _model("nemotron_h")
    plan = SkipPlan.from_similarity(model, [ids], num_attn_skip=1, num_ffn_skip=1)
    kinds = ["attn", "ffn", "attn", "attn"]
    for kind, layer_plan in zip(kinds, plan.layers, strict=True):
        assert (layer_plan.ffn if kind == "attn" else layer_plan.attn) == "full"
    assert [p.ffn for p in plan.layers].count("skip") == 1
    assert [p.attn for p in plan.layers].count("skip") == 1
    fastlayers.apply_skip_plan(model, plan)
    assert bool(torch.isfinite(_logits(model, ids)).all())
