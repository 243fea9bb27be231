# SPDX-License-Identifier: Apache-2.0
"""SkipPlan on a Hugging Face Llama (random weights from a config): forward equals a hand-written
stack with the same sublayers skipped, generate() with the KV cache equals generate() without it
(step scores), skipped attention layers hold no cache, the plan helpers."""

import pytest
import torch
from _decoders import assert_generate_equals_recompute as _assert_generate_equals_recompute

from fastlayers.skip_plan import LayerPlan, SkipPlan, apply_skip_plan, remove_skip_plan

transformers = pytest.importorskip("transformers")


def _model(layers=5):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


PLAN = SkipPlan(
    [
        LayerPlan(),
        LayerPlan("skip"),
        LayerPlan("full", "skip", 1.0, 0.9),
        LayerPlan("skip", "skip", 1.1, 1.0),
        LayerPlan(),
    ]
)


def _by_hand(model, ids, plan):
    m = model.model
    h = m.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    pe = m.rotary_emb(h, pos)
    for i, layer in enumerate(m.layers):
        if plan.runs_attention(i):
            a, _ = layer.self_attn(
                hidden_states=layer.input_layernorm(h), position_embeddings=pe,
                attention_mask=None, position_ids=pos,
            )  # fmt: skip
            h = h + a
        else:
            h = h * plan.layers[i].attn_scale
        if plan.runs_ffn(i):
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        else:
            h = h * plan.layers[i].ffn_scale
    return model.lm_head(m.norm(h))


@pytest.mark.parametrize("exit_layer", [None, 3])
def test_plan_forward_matches_hand_written_stack(exit_layer):
    model = _model()
    ids = torch.randint(1, 101, (2, 9))
    plan = SkipPlan(PLAN.layers, exit_layer)
    with torch.no_grad():
        full = model(ids).logits
        apply_skip_plan(model, plan)
        got = model(ids).logits
        want = _by_hand(model, ids, plan)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got - full).abs().max() > 1e-3  # the plan changed something
        remove_skip_plan(model)
        torch.testing.assert_close(model(ids).logits, full)


def test_generate_with_cache_equals_without_and_skipped_layers_hold_no_cache():
    model = apply_skip_plan(_model(), PLAN)
    ids = torch.randint(1, 101, (2, 9))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
              output_scores=True, return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        cached = model.generate(ids, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    layers = cached.past_key_values.layers
    for i, layer in enumerate(layers):
        if PLAN.runs_attention(i):
            assert layer.keys.shape[-2] == 9 + 6 - 1
        else:
            assert layer.keys is None or layer.keys.numel() == 0


def test_plan_helpers_and_errors():
    u = SkipPlan.uniform(12, 1.5)
    kept = sum(p.attn == "full" for p in u.layers)
    assert kept == 8 and u.layers[0].attn == u.layers[-1].attn == "full"
    assert abs(u.cost_fraction() - 8 / 12) < 1e-9
    d = SkipPlan.drop_attention(8, 0.5)
    assert [p.attn for p in d.layers] == ["full"] * 4 + ["skip"] * 4
    assert all(p.ffn == "full" for p in d.layers)
    assert SkipPlan.from_json(u.to_json()) == u
    with pytest.raises(ValueError, match="layers"):
        apply_skip_plan(_model(3), SkipPlan.full(4))
    with pytest.raises(ValueError, match="attn"):
        LayerPlan("sometimes")
    with pytest.raises(ValueError, match="ffn"):
        LayerPlan("full", "routed")
    with pytest.raises(ValueError, match="router_threshold"):
        LayerPlan("routed", router_threshold=float("nan"))
    with pytest.raises(ValueError, match="attn_scale"):
        LayerPlan("skip", attn_scale=float("nan"))
    with pytest.raises(ValueError, match="ffn_scale"):
        LayerPlan("full", "skip", ffn_scale="1.0")
    routed = SkipPlan([LayerPlan("routed", router_threshold=0.5), LayerPlan()])
    assert (
        routed.runs_attention(0) and routed.routes_attention(0) and not routed.routes_attention(1)
    )
    assert SkipPlan.from_json(routed.to_json()) == routed
    with pytest.raises(ValueError, match="does not route"):
        apply_skip_plan(_model(2), routed, routers={1: torch.nn.Linear(64, 1)})


def test_from_similarity_picks_sublayers_and_rescales():
    model = _model()
    calib = [torch.randint(1, 101, (2, 12)) for _ in range(2)]
    plan = SkipPlan.from_similarity(model, calib, num_attn_skip=2, num_ffn_skip=1)
    assert sum(p.attn == "skip" for p in plan.layers) == 2
    assert sum(p.ffn == "skip" for p in plan.layers) == 1
    assert plan.layers[0].attn == "full"
    skipped = [p.attn_scale for p in plan.layers if p.attn == "skip"]
    assert all(s > 0 for s in skipped) and any(s != 1.0 for s in skipped)
    with torch.no_grad():
        apply_skip_plan(model, plan)
        assert torch.isfinite(model(calib[0]).logits).all()


@pytest.mark.parametrize("exit_layer,num_draft", [(1, 3), (3, 1), (3, 4), (5, 4)])
def test_self_speculative_generate_is_greedy_decoding(exit_layer, num_draft):
    """Whatever the draft depth and length, the output is the full model's greedy decoding; with
    the whole model as its own draft every token is accepted (the all-accepted path)."""
    import fastlayers

    model = _model()
    ids = torch.randint(1, 101, (1, 7))
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=15,
                              min_new_tokens=15, do_sample=False)  # fmt: skip
    got, stats = fastlayers.self_speculative_generate(model, ids, exit_layer, 15, num_draft)
    assert torch.equal(got, want)
    assert stats["accepted"] <= stats["drafted"]
    if exit_layer == 5:
        assert stats["accepted"] == stats["drafted"]
        assert stats["verify_steps"] == -(-14 // (num_draft + 1))  # k drafts + 1 per step
    eos = int(want[0, 10])
    got, _ = fastlayers.self_speculative_generate(model, ids, exit_layer, 15, num_draft, eos)
    first = int((want[0, 7:] == eos).nonzero()[0]) + 7
    assert torch.equal(got, want[:, : first + 1])
    with pytest.raises(ValueError, match="batch size 1"):
        fastlayers.self_speculative_generate(model, ids.repeat(2, 1), exit_layer, 5)


@torch.no_grad()
def test_layer0_attention_skipped_with_layer_skip_cache():
    """Layer 0's attention skipped: generate() (any cache) and direct forward calls with a
    LayerSkipCache match the uncached model; lengths per layer and crop_to."""
    import fastlayers

    plan = SkipPlan([LayerPlan("skip"), LayerPlan(), LayerPlan("skip", "full"), LayerPlan(),
                     LayerPlan()])  # fmt: skip
    model = apply_skip_plan(_model(), plan)
    ids = torch.randint(1, 101, (2, 9))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
              output_scores=True, return_dict_in_generate=True)  # fmt: skip
    uncached = model.generate(ids, use_cache=False, **kw)
    for cache in (None, fastlayers.LayerSkipCache()):
        got = model.generate(ids, **kw) if cache is None else model.generate(ids, cache=cache, **kw)
        assert torch.equal(got.sequences, uncached.sequences)
        for a, b in zip(got.scores, uncached.scores, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # direct calls: prefill then one token, against a full forward of all ten tokens
    cache = fastlayers.LayerSkipCache()
    model(ids, cache=cache, use_cache=True)
    assert cache.layer_lengths() == [0, 9, 0, 9, 9]
    nxt = torch.randint(1, 101, (2, 1))
    step = model(nxt, cache=cache, use_cache=True).logits[:, -1]
    full = model(torch.cat([ids, nxt], 1)).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    cache.crop_to(7)
    assert cache.layer_lengths() == [0, 7, 0, 7, 7]


# ---- routed attention (Mixture-of-Depths) in a plan ---------------------------------------------


def _set_router(model, i, weight_scale: float, bias: float):
    router = _decoder_layers_of(model)[i].fastlayers_router
    with torch.no_grad():
        router.weight.normal_(0.0, weight_scale, generator=torch.Generator().manual_seed(i))
        router.bias.fill_(bias)


def _decoder_layers_of(model):
    return model.model.layers


def test_routed_attention_with_every_token_routed_is_the_full_layer():
    """A router that passes every token, without the gate: the routed layer computes exactly the
    full attention (varlen kernel vs the model's own attention)."""
    model = _model()
    ids = torch.randint(1, 101, (2, 11))
    with torch.no_grad():
        want = model(ids).logits
        plan = SkipPlan([LayerPlan("routed", router_gate=False) if i in (1, 3) else LayerPlan()
                         for i in range(5)])  # fmt: skip
        apply_skip_plan(model, plan)
        for i in (1, 3):
            _set_router(model, i, 0.0, 5.0)  # logit 5 > 0 for every token
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    remove_skip_plan(model)
    assert not hasattr(model.model.layers[1], "fastlayers_router")


def test_routed_generate_with_cache_equals_full_recompute():
    """Half the tokens routed (per layer, per token): greedy generate() with the cache (routed keys
    kept apart, positions and RoPE as in the full sequence) gives the tokens and step scores of
    running the whole sequence again at every step; crop_to rolls the routed caches back."""
    from fastlayers.skip_plan import LayerSkipCache

    model = _model()
    plan = SkipPlan([LayerPlan("routed") if i in (0, 2) else LayerPlan() for i in range(5)])
    apply_skip_plan(model, plan)
    for i in (0, 2):
        _set_router(model, i, 0.5, 0.0)
    ids = torch.randint(1, 101, (2, 9))
    cache = LayerSkipCache()
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
              do_sample=False, output_scores=True, return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        cached = model.generate(ids, cache=cache, **kw)
        _assert_generate_equals_recompute(model, ids, cached)
    lengths = cache.routed_lengths()
    assert set(lengths) == {0, 2}
    routed_some = [0 < n < 14 for n in lengths[0] + lengths[2]]
    assert any(routed_some), lengths  # the routers keep some tokens and drop others
    assert cache.layer_lengths()[0] == 0 and cache.layer_lengths()[1] == 14  # routed: apart
    cache.crop_to(10)
    for store in cache._fl_routed.values():
        assert all(int(p.max()) < 10 for p in store.positions if p.numel())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_routed_generate_with_a_static_cache_equals_full_recompute(impl):
    """Static caches: the mask spans the cache's whole length (the routed layers find the call's
    tokens at its position in it), and a StaticCache the caller reuses (reset) for a second
    generate() starts the routed caches afresh. Step scores equal a full recompute, each time."""
    model = _model()
    model.set_attn_implementation(impl)
    apply_skip_plan(model, SkipPlan([LayerPlan("routed") if i in (1, 3) else LayerPlan()
                                     for i in range(5)]))  # fmt: skip
    for i in (1, 3):
        _set_router(model, i, 0.5, 0.0)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, output_scores=True,
              return_dict_in_generate=True)  # fmt: skip
    reused = transformers.StaticCache(config=model.config, max_cache_len=16)
    for seed, how in ((1, "implementation"), (2, "reused"), (3, "reused")):
        ids = torch.randint(1, 101, (2, 7), generator=torch.Generator().manual_seed(seed))
        if how == "reused":
            reused.reset()
            kw_cache = dict(past_key_values=reused)
        else:
            kw_cache = dict(cache_implementation="static")
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw, **kw_cache)
            _assert_generate_equals_recompute(model, ids, out)


@pytest.mark.parametrize("layer0", ["routed", "skip"])
def test_static_cache_with_layer0_skipped_or_routed(layer0):
    """A static cache measures the sequence on layer 0: with layer 0's attention skipped or routed
    that layer still records the tokens, so generate() (which passes cache_position) and direct
    calls (which derive positions from the cache's length) equal a full recompute."""
    model = _model()
    apply_skip_plan(model, SkipPlan([LayerPlan(layer0)] + [LayerPlan()] * 4))
    if layer0 == "routed":
        _set_router(model, 0, 0.5, 0.0)
    ids = torch.randint(1, 101, (2, 6), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_scores=True,
              return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw,
                             cache_implementation="static")  # fmt: skip
        seq = _assert_generate_equals_recompute(model, ids, out)
        # direct calls without cache_position: prefill, then one token at a time
        cache = transformers.StaticCache(config=model.config, max_cache_len=16)
        logits = model(seq[:, :6], past_key_values=cache, use_cache=True).logits[:, -1]
        assert cache.get_seq_length() == 6
        for step in range(6, seq.shape[1]):
            full = model(seq[:, : step + 1], use_cache=False).logits[:, -1]
            logits = model(seq[:, step : step + 1], past_key_values=cache, use_cache=True).logits
            torch.testing.assert_close(logits[:, -1], full, rtol=1e-4, atol=1e-4)


def _padded_batch():
    a, b = torch.randint(1, 101, (1, 9)), torch.randint(1, 101, (1, 6))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], 1)]).long()
    return ids, mask, b


def _generate_equals_recompute(model, ids, mask, **cache):
    """generate() of a padded batch (with ``cache``, or generate()'s own) equals recomputing the
    sequence at every step (use_cache=False), tokens and step scores. Returns the output."""
    kw = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
              output_scores=True, return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        out = model.generate(ids, **cache, **kw)
        recomputed = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(out.sequences, recomputed.sequences)
    for x, y in zip(out.scores, recomputed.scores, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    return out


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("layer0", ["routed", "skip"])
def test_padded_batches_with_layer0_attention_routed_or_skipped(impl, layer0):
    """Hugging Face caches measure the sequence on layer 0; with its attention routed or skipped
    that layer would stay empty and a padded batch's decode masks would start at column 0 (logits
    off by ~1 before). Layer 0 now records zero keys in generate()'s own cache, and a
    LayerSkipCache measures on a layer that runs or, when none does (every attention routed or
    skipped), counts the tokens itself: both equal recomputing the sequence. reset() starts
    afresh. A cache that still measures nothing is refused by routed attention (the guard shown
    with the zero entry turned off)."""
    from fastlayers import skip_plan
    from fastlayers.skip_plan import LayerSkipCache

    ids, mask, b = _padded_batch()
    for plan in ([LayerPlan(layer0), LayerPlan()],
                 [LayerPlan(layer0), LayerPlan("skip"), LayerPlan("routed")]):  # fmt: skip
        model = _model(len(plan))
        model.set_attn_implementation(impl)
        apply_skip_plan(model, SkipPlan(plan))
        for i, p in enumerate(plan):
            if p.attn == "routed":
                _set_router(model, i, 0.5, 0.25 * i)
        _generate_equals_recompute(model, ids, mask)  # (generate()'s own DynamicCache)
        cache = LayerSkipCache()
        both = _generate_equals_recompute(model, ids, mask, cache=cache)
        assert cache.get_seq_length() == 9 + 5  # (layer 0: no zero entry in a LayerSkipCache)
        assert sum(cache.layer_lengths()) == 14 * sum(p.attn == "full" for p in plan)
        cache.crop(0)  # (what generate() calls at every step: nothing removed)
        assert cache.get_seq_length() == 14
        cache.crop(-4)
        assert cache.get_seq_length() == 10
        cache.reset()
        assert cache.get_seq_length() == 0
        kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
        with torch.no_grad():
            alone = model.generate(b, attention_mask=torch.ones_like(b), cache=cache, **kw)
        assert torch.equal(both.sequences[1, 9:], alone[0, 6:])
    if layer0 == "routed":
        skip_plan_keep = skip_plan._keep_layer0_length
        skip_plan._keep_layer0_length = lambda *args: None
        try:
            with pytest.raises(ValueError, match="pass cache=fastlayers.LayerSkipCache()"):
                _generate_equals_recompute(model, ids, mask)
        finally:
            skip_plan._keep_layer0_length = skip_plan_keep


@pytest.mark.parametrize("plan", [("routed", "full"), ("routed", "routed"), ("skip", "routed")])
def test_assisted_generation_rolls_the_routed_caches_back(plan):
    """Prompt-lookup (assisted) generation crops the cache after rejected candidates; the routed
    layers' stores, which the Hugging Face cache does not know, drop the rolled-back tokens when
    the next call's positions show them stale (before: "k_pos must increase strictly"), and a
    LayerSkipCache's own token count follows crop(). Equal to greedy decoding without a cache,
    with a LayerSkipCache and with generate()'s own cache."""
    from fastlayers.skip_plan import LayerSkipCache

    model = _model(2)
    apply_skip_plan(model, SkipPlan([LayerPlan(a) for a in plan]))
    for i, a in enumerate(plan):
        if a == "routed":
            _set_router(model, i, 0.5, 0.0)
    torch.manual_seed(5)
    ids = torch.randint(3, 20, (1, 16))  # a repetitive prompt: the lookup proposes candidates
    kw = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        want = model.generate(ids, use_cache=False, **kw)
        for cache in ({"cache": LayerSkipCache()}, {}):
            got = model.generate(ids, prompt_lookup_num_tokens=3, **cache, **kw)
            assert torch.equal(got, want), cache


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_routed_plan_with_left_padding_and_beams(impl):
    """A left-padded batch through a routed plan gives each row what it gives alone (padding is
    never routed); beam search with a LayerSkipCache equals beam search without a cache."""
    from fastlayers.skip_plan import LayerSkipCache

    model = _model()
    model.set_attn_implementation(impl)
    apply_skip_plan(model, SkipPlan([LayerPlan("routed") if i in (1, 3) else LayerPlan()
                                     for i in range(5)]))  # fmt: skip
    _set_router(model, 1, 0.0, 5.0)  # every token would be routed, the padding included
    _set_router(model, 3, 0.5, 0.0)
    a, b = torch.randint(1, 101, (1, 9)), torch.randint(1, 101, (1, 6))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], 1)]).long()
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        both = model.generate(ids, attention_mask=mask, cache=LayerSkipCache(), **kw)
        alone_a = model.generate(a, attention_mask=torch.ones_like(a), cache=LayerSkipCache(), **kw)
        alone_b = model.generate(b, attention_mask=torch.ones_like(b), cache=LayerSkipCache(), **kw)
        assert torch.equal(both[0, 9:], alone_a[0, 9:]) and torch.equal(both[1, 9:], alone_b[0, 6:])
        beams = dict(kw, num_beams=3, num_return_sequences=1)
        cached = model.generate(
            a, attention_mask=torch.ones_like(a), cache=LayerSkipCache(), **beams
        )
        uncached = model.generate(a, attention_mask=torch.ones_like(a), use_cache=False, **beams)
    assert torch.equal(cached, uncached)
