# SPDX-License-Identifier: Apache-2.0
"""Static layer-skip plans for Hugging Face decoders (Unified Layer Skipping, AdaSkip,
"you don't need all of attention", LayerSkip's early exit). The decoder layouts read are those of
:mod:`fastlayers._decoder` (Llama-style, sandwich norms, post-norms, parallel blocks).

A :class:`SkipPlan` says, per decoder layer, whether its attention and its feedforward run or are
skipped; a skipped sublayer leaves the residual stream unchanged, or multiplies it by a rescale
(AdaSkip's substitute for the sublayer's typical norm change). ``exit_layer`` ends the stack early
(layers from there on do not run). :func:`apply_skip_plan` installs a plan on a model so that its
``forward`` and ``generate()`` follow it. The KV cache stays consistent: a layer whose attention is
skipped never writes to the cache, so it holds no keys or values at all, and every layer that runs
sees the keys of every earlier token (the tokens' positions do not change).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import numbers

import torch

from fastlayers._decoder import (
    activation_like,
    applies_rope,
    attention_in_features,
    attention_mismatch,
    attention_mismatch_either_way,
    attention_of,
    attention_output,
    attention_qkv,
    attention_sinks,
    attention_unsupported,
    block_kind,
    cos_sin,
    decoder_layers,
    decoder_layout,
    feedforward,
    feedforward_of,
    head_counts,
    head_dim_of,
    inner_model,
    layer_type,
    linear_mixer,
    logit_softcap,
    mixer_of,
    mla_projections,
    model_gives_tables,
    query_position_scale,
    returns_tuple,
    rope_layout,
    rope_tables,
    shared_feedforward,
    sparse_indexer,
)
from fastlayers.ops._common import check_int, check_positive_ints

MODES = ("full", "skip")
ATTN_MODES = ("full", "skip", "routed")


@dataclasses.dataclass
class LayerPlan:
    """One decoder layer. ``attn``: ``"full"``, ``"skip"`` or ``"routed"`` (Mixture-of-Depths: a
    router ``Linear(hidden, 1)`` picks the tokens whose logit exceeds ``router_threshold``; they
    attend among the routed tokens, causally by original position, and their output is scaled by
    ``sigmoid(logit)`` when ``router_gate``; the other tokens pass through). ``ffn``: ``"full"`` or
    ``"skip"``. ``*_scale``: residual multipliers for skipped sublayers (AdaSkip)."""

    attn: str = "full"
    ffn: str = "full"
    attn_scale: float = 1.0  # residual multiplier when the attention is skipped
    ffn_scale: float = 1.0  # residual multiplier when the feedforward is skipped
    router_threshold: float = 0.0  # routed attention: tokens with router logit > threshold
    router_gate: bool = True  # routed attention: scale the output by sigmoid(router logit)

    def __post_init__(self):
        if self.attn not in ATTN_MODES:
            raise ValueError(f"attn must be one of {ATTN_MODES}, got {self.attn!r}")
        if self.ffn not in MODES:
            raise ValueError(f"ffn must be one of {MODES}, got {self.ffn!r}")
        if not math.isfinite(self.router_threshold):
            raise ValueError(f"router_threshold must be finite, got {self.router_threshold}")
        for name in ("attn_scale", "ffn_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")


@dataclasses.dataclass
class SkipPlan:
    layers: list[LayerPlan]
    exit_layer: int | None = None  # layers >= exit_layer do not run

    def __post_init__(self):
        if not isinstance(self.layers, (list, tuple)) or not all(
            isinstance(layer, LayerPlan) for layer in self.layers
        ):
            raise TypeError(f"layers must be a list of LayerPlan, got {self.layers!r:.80}")
        self.layers = list(self.layers)
        n = len(self.layers)
        if n == 0:
            raise ValueError("a SkipPlan needs at least one layer")
        if self.exit_layer is not None and not 1 <= self.exit_layer <= n:
            raise ValueError(f"exit_layer must be in [1, {n}], got {self.exit_layer}")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def runs_attention(self, i: int) -> bool:
        """Whether layer ``i``'s attention runs, for all tokens or (routed) some of them."""
        return (self.exit_layer is None or i < self.exit_layer) and self.layers[i].attn != "skip"

    def routes_attention(self, i: int) -> bool:
        return self.runs_attention(i) and self.layers[i].attn == "routed"

    def runs_ffn(self, i: int) -> bool:
        return (self.exit_layer is None or i < self.exit_layer) and self.layers[i].ffn == "full"

    def cost_fraction(self) -> float:
        """Fraction of sublayers that run (attention and feedforward counted alike; a routed
        attention counts as running)."""
        ran = sum(self.runs_attention(i) + self.runs_ffn(i) for i in range(self.num_layers))
        return ran / (2 * self.num_layers)

    @classmethod
    def full(cls, num_layers: int) -> SkipPlan:
        return cls([LayerPlan() for _ in range(num_layers)])

    @classmethod
    def uniform(
        cls, num_layers: int, target_speedup: float, keep_first: int = 1, keep_last: int = 1
    ) -> SkipPlan:
        """Skips whole layers, evenly spread over the middle (Unified Layer Skipping), so that
        ``num_layers / kept`` is at least ``target_speedup``; the first and last layers stay."""
        check_positive_ints(num_layers=num_layers)
        for value, name in ((keep_first, "keep_first"), (keep_last, "keep_last")):
            if check_int(value, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not isinstance(target_speedup, numbers.Real) or math.isnan(target_speedup):
            raise TypeError(f"target_speedup must be a number, got {target_speedup!r}")
        if target_speedup < 1.0:
            raise ValueError(f"target_speedup must be >= 1, got {target_speedup}")
        keep = max(keep_first + keep_last, math.floor(num_layers / target_speedup + 1e-9))
        keep = min(keep, num_layers)
        middle = list(range(keep_first, num_layers - keep_last))
        n_skip = num_layers - keep
        if n_skip > len(middle):
            raise ValueError(
                f"cannot reach {target_speedup}x keeping {keep_first} first and {keep_last} last "
                f"of {num_layers} layers"
            )
        # evenly spaced picks among the middle layers
        skip = {middle[int((i + 0.5) * len(middle) / n_skip)] for i in range(n_skip)}
        return cls([LayerPlan("skip" if i in skip else "full", "skip" if i in skip else "full")
                    for i in range(num_layers)])  # fmt: skip

    @classmethod
    def drop_attention(cls, num_layers: int, fraction: float) -> SkipPlan:
        """Skips the attention of the last ``fraction`` of the layers (Tyukin et al.: later
        attention layers matter least); feedforwards all run."""
        check_positive_ints(num_layers=num_layers)
        if not isinstance(fraction, numbers.Real) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        n = round(fraction * num_layers)
        if n >= num_layers:
            raise ValueError("dropping every attention layer leaves no KV cache to measure length")
        first_dropped = num_layers - n
        return cls([LayerPlan("skip" if i >= first_dropped else "full") for i in range(num_layers)])

    @classmethod
    def from_similarity(
        cls, model, calibration, num_attn_skip: int = 0, num_ffn_skip: int = 0, rescale=True
    ) -> SkipPlan:
        """AdaSkip-style: runs ``calibration`` (batches of input ids, or dicts of model kwargs)
        through ``model`` and skips the sublayers whose output residual stream is most similar
        (cosine) to their input; with ``rescale``, a skipped sublayer multiplies the residual by
        its mean norm ratio ``|h_out| / |h_in|`` measured there. Layer 0's attention always runs."""
        layers = _decoder_layers(model)
        n = len(layers)
        stats = {(i, s): [] for i in range(n) for s in ("attn", "ffn")}
        hooks = []
        for i, layer in enumerate(layers):
            # the residual stream enters the sublayer's pre-norm (or the sublayer itself) and the
            # change to it leaves the post-norm (or the sublayer itself)
            layout = decoder_layout(layer, "SkipPlan.from_similarity")
            shared = shared_feedforward(layer)  # (Granite 4: a shared_mlp beside its MoE)
            subs = []  # (Nemotron-H: one sublayer per block)
            if layout.single in (None, "attn"):
                subs.append(("attn", mixer_of(layer), layout.attn_pre, layout.attn_post))
            if layout.single in (None, "ffn"):
                subs.append(("ffn", feedforward_of(layer), layout.ffn_pre, layout.ffn_post))
            for sub, sublayer, pre_name, post_name in subs:
                norm = sublayer if pre_name is None else getattr(layer, pre_name)
                module = sublayer if post_name is None else getattr(layer, post_name)
                outputs = [module] if shared is None or sub == "attn" or post_name else \
                    [module, shared]  # fmt: skip

                def pre(mod, args, kwargs, key=(i, sub)):
                    h = args[0] if args else kwargs["hidden_states"]
                    stats[key].append([h.detach().float()])

                def post(mod, args, kwargs, out, key=(i, sub), mult=layout.residual_multiplier):
                    y = out[0] if isinstance(out, tuple) else out
                    y = y.detach().float() * mult
                    entry = stats[key][-1]
                    if len(entry) > 1:  # (a shared feedforward's output adds to the MoE's)
                        entry[1] = entry[1] + y.view(entry[1].shape)
                    else:
                        entry.append(y.view(entry[0].shape))

                hooks.append(norm.register_forward_pre_hook(pre, with_kwargs=True))
                hooks += [m.register_forward_hook(post, with_kwargs=True) for m in outputs]
        try:
            with torch.no_grad():
                for batch in calibration:
                    model(**batch) if isinstance(batch, dict) else model(batch)
        finally:
            for h in hooks:
                h.remove()
        if not any(stats.values()):
            raise ValueError("calibration gave no batches: nothing to measure similarity on")
        score, ratio = {}, {}
        for key, pairs in stats.items():
            if not pairs:  # (a one-sublayer block's other sublayer: none to skip)
                continue
            cos, r = [], []
            for h_in, delta in pairs:
                h_out = h_in + delta
                cos.append(torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).mean())
                r.append((h_out.norm(dim=-1) / h_in.norm(dim=-1).clamp_min(1e-12)).mean())
            score[key] = torch.stack(cos).mean().item()
            ratio[key] = torch.stack(r).mean().item()
        attn = sorted((k for k in score if k[1] == "attn" and k[0] != 0), key=lambda k: -score[k])
        ffn = sorted((k for k in score if k[1] == "ffn"), key=lambda k: -score[k])
        skip = set(attn[:num_attn_skip]) | set(ffn[:num_ffn_skip])
        plan = []
        for i in range(n):
            a, f = (i, "attn") in skip, (i, "ffn") in skip
            plan.append(LayerPlan(
                "skip" if a else "full", "skip" if f else "full",
                ratio[(i, "attn")] if a and rescale else 1.0,
                ratio[(i, "ffn")] if f and rescale else 1.0,
            ))  # fmt: skip
        return cls(plan)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SkipPlan:
        d = json.loads(text)
        return cls([LayerPlan(**layer) for layer in d["layers"]], d.get("exit_layer"))


def _decoder_layers(model) -> torch.nn.ModuleList:
    return decoder_layers(model, "apply_skip_plan")


def _routed_store(cache, layer_idx: int):
    """The RoutedKVStore of a routed layer, kept on the Hugging Face cache object (the cache's own
    layer stays empty, as for a skipped layer, so lengths come from the layers that run fully)."""
    from fastlayers.nn.skip import RoutedKVStore

    stores = getattr(cache, "_fl_routed", None)
    if stores is None:
        stores = {}
        cache._fl_routed = stores
    return stores.setdefault(layer_idx, RoutedKVStore())


def _call_start(cache, mask, t: int, cache_position=None):
    """Where this call's first token sits in the cache (its first key column in a 4-D mask), or
    None when nothing says. A static cache's mask spans its whole preallocated length, so there
    it is layer 0's length before this call (kept when layer 0 does not run:
    _keep_layer0_length); a dynamic cache's mask ends with the call's t keys."""
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return cache_position[0]
    if cache is not None and getattr(cache, "is_compileable", False):
        return cache.get_seq_length(0) - t  # layer 0 has written this call's tokens
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        return mask.shape[-1] - t
    return None


def _cache_start(cache, t: int, layer_idx: int) -> int:
    """Where this call's first token sits, from the cache's length alone (a call with no mask, no
    cache positions and no position ids: Granite 4's hybrids), seen from routed layer
    ``layer_idx``: Hugging Face caches measure on their first softmax attention layer, which has
    recorded this call's tokens before any routed layer runs (its own attention, or
    _keep_layer0_length); a LayerSkipCache on the first layer holding keys, which has them when it
    comes before ``layer_idx``, or on the tokens the routed layers counted before this call."""
    if not _is_layer_skip_cache(cache):
        return cache.get_seq_length() - t
    ref = cache._reference_index()
    if ref is None:
        return cache._fl_length
    return cache.get_seq_length() - (t if ref < layer_idx else 0)


def _real_tokens(mask, b: int, t: int, start):
    """``[B, T]`` bool, False for this call's padding tokens, read from the layer's 4-D attention
    mask at the call's key columns ``start + i`` (a real token sees itself, a padding token does
    not); None when there is no mask."""
    if start is None or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    if mask.shape[-2] != t:
        return None
    i = torch.arange(t, device=mask.device)
    diag = mask[:, 0, i, start + i]
    real = diag if mask.dtype == torch.bool else diag == 0
    return real.expand(b, t)


def _routed_attention(layer, layout, plan: LayerPlan, layer_idx: int, hidden_states, kw,
                      h=None, residual=None):  # fmt: skip
    """``residual`` (default ``hidden_states``) plus the gated attention output of the routed
    tokens of ``hidden_states`` (see LayerPlan); ``layout``: the layer's DecoderLayout; ``h``:
    the tokens' attention norm, when already computed (a parallel block shares it with the
    feedforward)."""
    from fastlayers.nn.skip import routed_attention_step
    from fastlayers.ops.skip import route_threshold, scatter_add_gated

    attn, router = attention_of(layer), layer.fastlayers_router
    b, t, _ = hidden_states.shape
    if h is None and layout.attn_pre is not None:
        h = getattr(layer, layout.attn_pre)(hidden_states)
    elif h is None:
        h = hidden_states
    logits = router(h).squeeze(-1).float()  # [B, T]
    cache = _cache_of(kw)
    window = _sliding_window(attn)
    if window is not None and getattr(cache, "is_compileable", False):
        raise ValueError(
            "routed attention on a sliding-window layer takes a dynamic cache (a LayerSkipCache), "
            f"not a static one ({type(cache).__name__}: its window layers' masks hold only the "
            "window's columns)"
        )
    start = _call_start(cache, kw.get("attention_mask"), t, kw.get("cache_position"))
    if start is None and cache is not None and kw.get("position_ids") is None:
        start = _cache_start(cache, t, layer_idx)  # (nothing else says where the call starts)
    real = _real_tokens(kw.get("attention_mask"), b, t, start)
    if real is not None:  # padding is never routed, so it is never attended either
        logits = logits.masked_fill(~real, -math.inf)
    idx, cu = route_threshold(logits, plan.router_threshold)
    rows = idx.clamp_min(0)  # (-1 padding: computed on row 0, never written back)
    n = rows.shape[0]
    x = h.reshape(b * t, -1)[rows]
    tables = kw.get("position_embeddings")  # [B, T, rotary dim] at the tokens' positions
    # (the check apply_skip_plan ran, remembered; a module copied or unpickled since is checked
    # now, once: the probe's outcome is kept per module)
    why = attention_mismatch(attn, tables=tables is not None)
    if why is not None:
        raise ValueError(
            f"routed attention: layer {layer_idx} is given "
            f"{'no RoPE tables' if tables is None else 'RoPE tables'}, with which {why}"
        )
    cos = sin = None  # (a model without a rotary embedding: Granite 4's hybrids)
    if tables is not None:
        cos, sin = cos_sin(tables, attn)  # [n, r]: the model's function unsqueezes dim 1 for heads
        cos = cos.expand(b, t, -1).reshape(b * t, -1)[rows]
        sin = sin.expand(b, t, -1).reshape(b * t, -1)[rows]
    positions = kw.get("position_ids")
    if positions is None:  # Hugging Face's default: the cache positions
        positions = torch.arange(t, device=h.device)[None] + (0 if start is None else start)
    pos = positions.expand(b, t).reshape(-1)[rows]
    columns = None  # the tokens' columns in the cache, where the queries' scale reads them
    scale = query_position_scale(attn)  # (Llama 4's NoPE layers)
    if scale is not None and scale.by_column:
        first = start if start is not None or cache is None else _cache_start(cache, t, layer_idx)
        first = 0 if first is None else first
        columns = (torch.arange(t, device=h.device) + first).repeat(b)[rows]
    # (checked against the module)
    q, k, v, qgate = attention_qkv(attn, x, cos, sin, positions=pos, columns=columns)
    # (a cache given means use it: Gemma 3 and others pass no use_cache to their layers)
    use = cache is not None and kw.get("use_cache", True)
    store = _routed_store(cache, layer_idx) if use else None
    if store is not None:
        _sync_routed_store(store, cache, start, positions.expand(b, t), real,
                           kw.get("position_ids") is not None)  # fmt: skip
    o = routed_attention_step(q, k, v, pos, idx, cu, store, scale=attn.scaling,
                              sliding_window=window, softcap=logit_softcap(attn),
                              sinks=attention_sinks(attn))  # fmt: skip
    out = attention_output(attn, o.reshape(n, -1), x, qgate)
    if layout.attn_post is not None:  # (Gemma 2/3, OLMo 2: the norm on the attention's output)
        out = getattr(layer, layout.attn_post)(out)
    gate = logits.reshape(-1)[rows]
    gate = torch.sigmoid(gate) if plan.router_gate else torch.ones_like(gate)
    gate = gate * layout.residual_multiplier
    flat = (hidden_states if residual is None else residual).reshape(b * t, -1)
    return scatter_add_gated(flat, idx, out, gate.to(out.dtype)).view(b, t, -1)


def _sync_routed_store(store, cache, start, positions, real, given_positions: bool) -> None:
    """Brings a routed layer's store in line with the Hugging Face cache before a call whose
    tokens start at mask column ``start`` (None: no mask) with ``positions [B, t]`` (``real``:
    which are not padding, or None):

    * a call at column 0 while the store holds tokens is a new sequence in a reused cache (the
      store starts afresh), unless the positions say the sequence continues (a real token's
      position never exceeds its column): then the cache measured nothing before this call, which
      Hugging Face caches do when layer 0 holds no keys and no zero entry was written for it, or
      when no layer holds any: ValueError naming LayerSkipCache, rather than wrong masks;
    * LayerSkipCache's token count (its length when no layer holds keys) becomes the call's end:
      its first column from the mask, or, with no mask (no padding), its first position;
    * tokens the cache's owner rolled back (crop: assisted or speculative generation) are dropped
      per row, at or past the row's first real position of this call."""
    b, t = positions.shape
    if start is not None and int(start) == 0 and any(store.lengths()):
        col = torch.arange(t, device=positions.device)
        late = (positions > col) if real is None else (positions > col) & real
        if bool(late.any()):
            raise ValueError(
                "routed attention: the cache measured no tokens before this call although the "
                "sequence continues (Hugging Face caches measure on layer 0, whose attention is "
                "routed or skipped here, or on nothing when every attention is); pass "
                "cache=fastlayers.LayerSkipCache(), which measures on a layer that holds keys or "
                "counts the tokens itself"
            )
        store.__init__()
    if start is not None or given_positions:
        cache._fl_length = int(start if start is not None else positions.reshape(-1)[0]) + t
    first = (
        positions
        if real is None
        else positions.masked_fill(~real, torch.iinfo(positions.dtype).max)
    )
    store.drop_from(first.min(1).values)


def _keep_layer0_length(layer, hidden_states, kwargs, layer_idx: int = 0) -> None:
    """Layer 0 skipped or routed (in a hybrid: the first softmax attention layer, where its cache
    measures): its Hugging Face cache layer would stay empty, while Hugging
    Face caches (static, dynamic, the INT4 one) measure the sequence on layer 0 (``get_seq_length``
    and the masks, the positions the model derives from it when no ``cache_position`` is given):
    the masks of a padded batch would then start each decode step at column 0 (logits off by ~1
    before this entry existed for dynamic caches). So the call's tokens are written there as zero
    keys and values, which nothing reads (layer 0's attention does not run over that cache); it
    costs one layer of cache. A LayerSkipCache needs no such entry: it measures on a layer that
    runs, or counts the routed layers' tokens."""
    cache = _cache_of(kwargs)
    if cache is None or not kwargs.get("use_cache", True) or _is_layer_skip_cache(cache):
        return
    b, t = hidden_states.shape[:2]
    heads, d = _kv_heads_and_dim(layer, hidden_states)
    zeros = hidden_states.new_zeros(b, heads, t, d)
    cache.update(zeros, zeros, layer_idx, {"cache_position": kwargs.get("cache_position")})


def _keep_croppable(layer, hidden_states, kwargs, layer_idx: int) -> None:
    """A layer whose attention never writes the Hugging Face cache leaves its cache layer
    uninitialised, and transformers' ``DynamicSlidingWindowLayer.crop`` fails on an uninitialised
    layer (it reads the keys' length after its parent's early return), which assisted generation
    calls on every layer after rejected candidates (an AttributeError with Mistral's model-wide
    window before). Such a layer is initialised here with no tokens, which crops, reorders and
    measures as empty."""
    cache = _cache_of(kwargs)
    layers = getattr(cache, "layers", None)
    if getattr(cache, "is_compileable", False) or not isinstance(layers, list):
        return  # (static layers are allocated whole, never uninitialised when cropped)
    if not 0 <= layer_idx < len(layers):
        return
    slot = layers[layer_idx]
    if getattr(slot, "is_sliding", False) and getattr(slot, "is_initialized", True) is False:
        b = hidden_states.shape[0]
        heads, d = _kv_heads_and_dim(layer, hidden_states)
        empty = hidden_states.new_zeros(b, heads, 0, d)
        slot.update(empty, empty)


def _kv_heads_and_dim(layer, hidden_states) -> tuple[int, int]:
    """The key/value heads and head size of the layer's cache entries; where the attention module
    does not say (GPT-Neo's wrapper), one head of the hidden size (a dynamic cache layer takes any
    shape its first entry gives it, and nothing reads these)."""
    attn = attention_of(layer)
    heads, d = head_counts(attn)[1], head_dim_of(attn)
    if heads is None or d is None:
        return 1, hidden_states.shape[-1]
    return heads, d


def _residual(layer, sublayer, hidden_states, pre: str | None, post: str | None, mult: float):
    """``hidden_states + post(sublayer(pre(hidden_states))) * mult``, the norms the layout has."""
    h = hidden_states if pre is None else getattr(layer, pre)(hidden_states)
    h = sublayer(h)
    h = h[0] if isinstance(h, tuple) else h
    h = h if post is None else getattr(layer, post)(h)
    return hidden_states + (h if mult == 1.0 else h * mult)


def _parallel_block(layer, layout, plan: LayerPlan, layer_idx, routed, runs_attn, runs_ffn,
                    hidden_states, kw):  # fmt: skip
    """A parallel block's ``h + attn(n(h)) + mlp(n(h))`` (GPT-NeoX: a norm of its own for the
    feedforward; residual multiplier on both) with the planned sublayers; skipped ones' rescales
    multiply the residual ``h``."""
    normed = getattr(layer, layout.attn_pre)(hidden_states)
    mult = layout.residual_multiplier
    scale = (1.0 if runs_attn else plan.attn_scale) * (1.0 if runs_ffn else plan.ffn_scale)
    out = hidden_states if scale == 1.0 else hidden_states * scale
    if routed:
        out = _routed_attention(layer, layout, plan, layer_idx, hidden_states, kw, normed, out)
    elif runs_attn:
        a = mixer_of(layer)(hidden_states=normed, **kw)
        a = a[0] if isinstance(a, tuple) else a
        out = out + (a if mult == 1.0 else a * mult)
    if runs_ffn:
        ffn_in = normed if layout.ffn_pre == layout.attn_pre else \
            getattr(layer, layout.ffn_pre)(hidden_states)  # fmt: skip
        f = feedforward(layer, ffn_in)
        out = out + (f if mult == 1.0 else f * mult)
    return out


def _planned_forward(layer, plan: LayerPlan, layer_idx: int, runs_attn: bool, runs_ffn: bool,
                     measured: int | None = 0):  # fmt: skip
    """The planned forward of decoder layer ``layer_idx``; ``measured``: the layer Hugging Face
    caches measure the sequence on (the first softmax attention layer; None: none)."""
    routed = runs_attn and plan.attn == "routed"
    if runs_attn and runs_ffn and not routed:  # the whole layer: the model's own forward
        return layer._fastlayers_forward
    return _PlannedForward(layer, plan, layer_idx, runs_attn, runs_ffn, measured)


class _PlannedForward:
    """A decoder layer's planned forward, installed as its ``forward``: an object holding its layer
    (not a closure), so that a copy of the model (``copy.deepcopy``) runs the copy's layer and a
    pickled model (``torch.save``) loads."""

    def __init__(self, layer, plan: LayerPlan, layer_idx: int, runs_attn: bool, runs_ffn: bool,
                 measured: int | None):  # fmt: skip
        self.layer, self.plan, self.layer_idx = layer, plan, layer_idx
        self.routed = runs_attn and plan.attn == "routed"
        self.layer0_empty = layer_idx == measured and (self.routed or not runs_attn)
        self.layout = layout = decoder_layout(layer, "apply_skip_plan")
        # (Nemotron-H's blocks hold one sublayer: the plan's other one, kept "full" by
        # check_skip_plan, is not there to run)
        self.runs_ffn = runs_ffn and layout.single != "attn"
        self.runs_attn = runs_attn and layout.single != "ffn"
        # the names of the layer's positional arguments after the hidden states (GPT-2's blocks
        # are called with the cache, cache positions and mask by position)
        params = inspect.signature(layer._fastlayers_forward).parameters.values()
        self.names = [p.name for p in params
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]  # fmt: skip
        self.tuple_out = returns_tuple(layer)  # (GPT-Neo: (hidden_states, attn_weights))

    def __call__(self, hidden_states, *args, **kwargs):
        out = self._planned(hidden_states, *args, **kwargs)
        return (out, None) if self.tuple_out else out

    def _planned(self, hidden_states, *args, **kwargs):
        layer, layout, plan, layer_idx = self.layer, self.layout, self.plan, self.layer_idx
        routed, runs_attn, runs_ffn = self.routed, self.runs_attn, self.runs_ffn
        kw = dict(kwargs)
        for name, value in zip(self.names, args, strict=False):
            kw.setdefault(name, value)
        if self.layer0_empty:
            _keep_layer0_length(layer, hidden_states, kw, layer_idx)
        if routed or not runs_attn:
            _keep_croppable(layer, hidden_states, kw, layer_idx)
        if layout.parallel:
            return _parallel_block(layer, layout, plan, layer_idx, routed, runs_attn, runs_ffn,
                                   hidden_states, kw)  # fmt: skip
        if routed:
            hidden_states = _routed_attention(layer, layout, plan, layer_idx, hidden_states, kw)
        elif runs_attn:
            attend = lambda h: mixer_of(layer)(hidden_states=h, **kw)  # noqa: E731
            hidden_states = _residual(layer, attend, hidden_states, layout.attn_pre,
                                      layout.attn_post, layout.residual_multiplier)  # fmt: skip
        elif plan.attn_scale != 1.0:
            hidden_states = hidden_states * plan.attn_scale
        if runs_ffn:
            ffn = lambda h: feedforward(layer, h)  # noqa: E731
            hidden_states = _residual(layer, ffn, hidden_states, layout.ffn_pre,
                                      layout.ffn_post, layout.residual_multiplier)  # fmt: skip
        elif plan.ffn_scale != 1.0:
            hidden_states = hidden_states * plan.ffn_scale
        return hidden_states


class _StateChecked:
    """``forward`` of a hybrid's linear attention layer, refusing a LayerSkipCache made without the
    model's config (its layers would be key/value layers where this one keeps a state); an object
    (not a closure), copied and pickled with its model as :class:`_PlannedForward` is."""

    def __init__(self, forward, layer_idx: int):
        self.forward, self.layer_idx = forward, layer_idx

    def __call__(self, hidden_states, *args, **kwargs):
        cache = _cache_of(kwargs)
        if _is_layer_skip_cache(cache):
            i = self.layer_idx
            slot = cache.layers[i] if i < len(cache.layers) else None
            if not hasattr(slot, "conv_states"):
                raise ValueError(
                    f"layer {i} keeps a linear attention state, which this LayerSkipCache "
                    "has no layer for: make it with LayerSkipCache(config=model.config)"
                )
        return self.forward(hidden_states, *args, **kwargs)


def check_skip_plan(model, plan: SkipPlan, routers: dict | None = None) -> torch.nn.ModuleList:
    """Every check of :func:`apply_skip_plan`, without changing the model; returns its layers."""
    if not isinstance(plan, SkipPlan):
        raise TypeError(f"plan must be a SkipPlan, got {type(plan).__name__}")
    layers = _decoder_layers(model)
    if len(layers) != plan.num_layers:
        raise ValueError(f"the plan has {plan.num_layers} layers, the model {len(layers)}")
    for i in routers or {}:
        if not plan.routes_attention(i):
            raise ValueError(f"routers[{i}] given, but the plan does not route layer {i}")
    for i, layer in enumerate(layers):
        single = decoder_layout(layer, "apply_skip_plan").single
        p = plan.layers[i]
        if single == "attn" and (p.ffn != "full" or p.ffn_scale != 1.0):
            raise ValueError(f"apply_skip_plan: layer {i} is an attention block without a "
                             "feedforward: its plan's ffn must be 'full'")  # fmt: skip
        if single == "ffn" and (p.attn != "full" or p.attn_scale != 1.0):
            raise ValueError(f"apply_skip_plan: layer {i} is a feedforward block without an "
                             "attention: its plan's attn must be 'full'")  # fmt: skip
        if plan.routes_attention(i):
            mixer = linear_mixer(layer)
            if mixer is not None:
                raise ValueError(
                    f"apply_skip_plan: layer {i} cannot be routed: its token mixer "
                    f"is {mixer}; only softmax attention layers route tokens"
                )
            attn = attention_of(layer)
            why = attention_unsupported(attn, mla=True)
            if why is None and sparse_indexer(attn) is not None:
                why = (f"{type(attn).__name__} selects the keys each query attends to with an "
                       "indexer (DeepSeek V3.2's sparse attention), which routed attention does "
                       "not apply")  # fmt: skip
            if why is None and getattr(attn.config, "alibi", False) is True:  # (Falcon-RW)
                why = (f"{type(attn).__name__}'s positions are an ALiBi bias the model adds to "
                       "the attention mask, which routed attention does not apply")  # fmt: skip
            if why is not None:
                raise ValueError(f"apply_skip_plan: layer {i} cannot be routed: {why}")
            window = _sliding_window(attn)
            if window is not None and (type(window) is not int or window < 1):
                raise ValueError(
                    f"apply_skip_plan: layer {i}'s sliding window must be a positive int or None, "
                    f"got {window!r}"
                )
            if mla_projections(attn) is None:  # (multi-head latent attention: its own RoPE)
                rope = rope_layout(attn, "apply_skip_plan")
                applies_rope(attn, rope.table_width, rope.complex_tables)  # (probed now)
            why = attention_mismatch_either_way(attn, model_gives_tables(model))
            if why is not None:
                raise ValueError(f"apply_skip_plan: layer {i} cannot be routed: {why}")
    return layers


def _sliding_window(attn) -> int | None:
    """The layer's sliding window, as Hugging Face builds its masks: by the config's
    ``layer_types`` where it has them (``"sliding_attention"``: ``config.sliding_window``;
    EXAONE 4 keeps ``sliding_window`` on its full-attention modules too), else the module's own
    (Qwen2) or Mistral's model-wide one."""
    cfg = getattr(attn, "config", None)
    types, idx = getattr(cfg, "layer_types", None), getattr(attn, "layer_idx", None)
    if isinstance(types, (list, tuple)) and isinstance(idx, int) and 0 <= idx < len(types):
        return getattr(cfg, "sliding_window", None) if types[idx] == "sliding_attention" else None
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(cfg, "sliding_window", None)


def apply_skip_plan(model, plan: SkipPlan, routers: dict | None = None):
    """Installs ``plan`` on a Hugging Face decoder of a layout :mod:`fastlayers._decoder` reads
    (in place; returns the model). ``forward`` and ``generate()`` then skip the planned sublayers
    (a layer the plan runs whole runs the model's own forward; in a parallel block
    ``h + attn(n(h)) + mlp(n(h))`` a skipped sublayer's term is left out and its rescale
    multiplies ``h``); skipped attention layers keep
    no KV cache, except layer 0 when its attention is skipped or routed: Hugging Face caches
    measure the sequence on layer 0, so it records each call's tokens as zero keys (one layer of
    cache; a :func:`LayerSkipCache` needs none). Routed sliding-window layers take dynamic caches
    only. :func:`remove_skip_plan` restores the model.

    Routed attention layers get a router ``layer.fastlayers_router`` (``Linear(hidden, 1)``): from
    ``routers[i]`` when given (trained ones), else a freshly initialised one, which needs training
    (or distillation) before the routing means anything. Their routed tokens' keys and values are
    cached apart from the Hugging Face cache's layers (positions and RoPE as in the full model), so
    ``generate()`` with the cache equals running the whole sequence. Padding tokens (read from the
    attention mask) are never routed; beam search reorders the routed caches of a
    :func:`LayerSkipCache`. Static caches (``generate(cache_implementation="static")``) work too;
    they measure the sequence on layer 0, so with layer 0's attention skipped or routed its cache
    layer still records each call's tokens (as zeros nothing reads)."""
    layers = check_skip_plan(model, plan, routers)
    routers = routers or {}
    remove_skip_plan(model)
    # (a hybrid's cache measures on its first softmax attention layer: Hugging Face's Cache)
    measured = next((i for i, layer in enumerate(layers) if linear_mixer(layer) is None), None)
    for i, layer in enumerate(layers):
        if plan.routes_attention(i):
            router = routers.get(i)
            if router is None:
                ref = activation_like(attention_of(layer))
                width = attention_in_features(attention_of(layer))
                router = torch.nn.Linear(width, 1, device=ref.device, dtype=ref.dtype)
            if not isinstance(router, torch.nn.Module):
                raise TypeError(f"routers[{i}] must be a torch.nn.Module, got {type(router)}")
            layer.fastlayers_router = router
        layer._fastlayers_forward = layer.forward
        layer.forward = _planned_forward(
            layer, plan.layers[i], i, plan.runs_attention(i), plan.runs_ffn(i), measured
        )
        if linear_mixer(layer) is not None and block_kind(layer) != "ffn":  # (a hybrid's linear
            layer.forward = _StateChecked(layer.forward, i)  # attention / convolution / Mamba)
    model._fastlayers_skip_plan = plan
    return model


def remove_skip_plan(model):
    """Undoes :func:`apply_skip_plan` (no-op when no plan is installed)."""
    for layer in _decoder_layers(model):
        if hasattr(layer, "_fastlayers_forward"):
            layer.forward = layer._fastlayers_forward
            del layer._fastlayers_forward
        if hasattr(layer, "fastlayers_router"):  # (keep a trained router before removing)
            del layer.fastlayers_router
    if hasattr(model, "_fastlayers_skip_plan"):
        del model._fastlayers_skip_plan
    return model


def _crop(cache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # a negative count removes that many tokens (old and new transformers)


def _causal_mask(past: int, q: int, dtype, device, window: int | None = None):
    """Additive [1, 1, q, past + q] mask: new token i sees the cached tokens and new tokens <= i,
    within the last ``window`` positions when the layer has a sliding window (HF's rule: key j is
    seen from query i when i - window < j <= i); None when nothing is hidden."""
    if q == 1 and (window is None or past < window):
        return None
    qpos = past + torch.arange(q, device=device)[:, None]
    kpos = torch.arange(past + q, device=device)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    mask = torch.zeros(1, 1, q, past + q, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def _run_layers(model, h, start: int, end: int, past: int, cache, cache_kw: str):
    """Decoder layers ``[start, end)`` of a Llama-style model on hidden states ``h [1, q, d]`` at
    positions ``past .. past + q - 1``, writing their keys and values to ``cache``. Each layer gets
    the RoPE of its type (Gemma 3: local and global; None for a model without a rotary embedding:
    GPT-2's learned positions are in ``h`` already) and its sliding window, if any."""
    rotary = getattr(inner_model(model), "rotary_emb", None)
    positions = torch.arange(past, past + h.shape[1], device=h.device)[None]
    embeddings, masks = {}, {}
    for layer in _decoder_layers(model)[start:end]:
        attn = attention_of(layer)
        kind = layer_type(attn)
        if kind not in embeddings:
            embeddings[kind] = None if rotary is None else rope_tables(rotary, attn, h, positions)
        window = _sliding_window(attn)
        if window not in masks:
            masks[window] = _causal_mask(past, h.shape[1], h.dtype, h.device, window)
        h = layer(h, attention_mask=masks[window], position_ids=positions,
                  position_embeddings=embeddings[kind], use_cache=True,
                  **{cache_kw: cache})  # fmt: skip
        h = h[0] if isinstance(h, tuple) else h
    return h


class _Captured(Exception):
    """Stops a forward once a hook has what it needs."""


def _embedder(model, layers, probe_ids: torch.Tensor):
    """``(ids, first position) -> hidden states`` as the model feeds its first decoder layer: its
    input embeddings (``embed_tokens``, GPT-NeoX's ``embed_in``), plus the learned position
    embeddings of GPT-2 and GPT-BigCode (``wpe``) at the ids' positions, times
    ``embedding_multiplier`` where the model has one (Granite, HyperCLOVA X). Checked against the
    model's own forward on ``probe_ids`` (stopped at layer 0); TypeError if it does more."""
    inner = inner_model(model)
    mult = getattr(inner, "embedding_multiplier", None)
    if mult is None:
        mult = getattr(getattr(inner, "config", None), "embedding_multiplier", 1.0)
    embeddings = _input_embeddings(inner)
    wpe = getattr(inner, "wpe", None)  # (learned absolute positions)
    wpe = wpe if isinstance(wpe, torch.nn.Embedding) else None

    def embed(ids, first: int = 0):
        h = embeddings(ids)
        if wpe is not None:
            h = h + wpe(torch.arange(first, first + ids.shape[1], device=ids.device))[None]
        return h if mult == 1.0 else h * mult

    seen = {}

    def hook(mod, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        inner(probe_ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "h" not in seen or not torch.equal(seen["h"], embed(probe_ids)):
        raise TypeError(
            "self_speculative_generate: the model transforms its token embeddings before its "
            "first layer in a way it does not know (it knows embed_tokens / embed_in / wte / "
            "word_embeddings, wpe position embeddings and embedding_multiplier)"
        )
    return embed


def _input_embeddings(inner):
    """The token embedding of the module holding the layers: ``embed_tokens``, ``embed_in``,
    ``wte`` (GPT-J, CodeGen, GPT-2) or ``word_embeddings`` (Falcon; BLOOM's embedding LayerNorm
    is refused by the embedder's check)."""
    for name in ("embed_tokens", "embed_in", "wte", "word_embeddings"):
        part = getattr(inner, name, None)
        if isinstance(part, torch.nn.Module):
            return part
    return None


def _cache_of(kwargs):
    """The cache a decoder layer is given: ``cache``, ``past_key_values`` or GPT-NeoX's
    ``layer_past``."""
    for name in ("cache", "past_key_values", "layer_past"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


@torch.no_grad()
def self_speculative_generate(
    model, input_ids: torch.Tensor, exit_layer: int, max_new_tokens: int, num_draft: int = 4,
    eos_token_id: int | None = None,
):  # fmt: skip
    """Greedy self-speculative decoding with early exit (LayerSkip): the first ``exit_layer``
    layers (plus the final norm and LM head) draft ``num_draft`` tokens; the remaining layers
    verify them in one pass **on the draft's own exit hidden states**, so the first layers run once
    per token; the longest agreeing prefix plus the model's own next token are kept. The output is
    exactly the model's greedy decoding (up to floating-point ties); the draft only changes the
    speed (it helps on models trained for early exit, such as LayerSkip checkpoints).

    One KV cache serves both: the draft writes the first layers' keys and values, the verification
    the other layers', and after each verification every layer is cropped to the accepted tokens.
    Batch size 1; a Hugging Face Llama-style model (``model.model.embed_tokens``, ``layers``,
    ``norm`` (Phi: ``final_layernorm``), ``rotary_emb``, ``model.lm_head``; GPT-NeoX's
    ``model.gpt_neox.embed_in`` and ``final_layer_norm``; GPT-J's ``wte`` and ``ln_f``; Falcon's
    ``word_embeddings``; GPT-2's and GPT-BigCode's learned positions ``wpe`` instead of RoPE).
    Returns
    ``(sequence [1, T + new], stats)`` with ``stats = {"drafted", "accepted", "verify_steps"}``.
    """
    from transformers import DynamicCache

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T] (batch size 1), got {tuple(input_ids.shape)}")
    layers = decoder_layers(model, "self_speculative_generate")
    n = len(layers)
    if not 1 <= exit_layer <= n:
        raise ValueError(f"exit_layer must be in [1, {n}], got {exit_layer}")
    if num_draft < 1 or max_new_tokens < 0:
        raise ValueError("num_draft must be >= 1 and max_new_tokens >= 0")
    if hasattr(model, "_fastlayers_skip_plan"):
        raise ValueError("remove the installed skip plan first (remove_skip_plan)")
    inner = inner_model(model)
    final_norm = next((getattr(inner, n) for n in ("norm", "final_layernorm", "final_layer_norm",
                                                   "ln_f")
                       if isinstance(getattr(inner, n, None), torch.nn.Module)), None)  # fmt: skip
    parts = [("embed_tokens", _input_embeddings(inner)), ("norm", final_norm),
             ("lm_head", getattr(model, "lm_head", None))]  # fmt: skip
    if not isinstance(getattr(inner, "wpe", None), torch.nn.Embedding):  # (GPT-2: no RoPE)
        parts.append(("rotary_emb", getattr(inner, "rotary_emb", None)))
    for name, part in parts:
        if not isinstance(part, torch.nn.Module):
            raise TypeError(f"self_speculative_generate needs a Llama-style model (model.{name})")
    params = inspect.signature(type(layers[0]).forward).parameters
    cache_kw = next((n for n in ("cache", "past_key_values", "layer_past") if n in params),
                    "past_key_values")  # fmt: skip

    divisor = 1.0  # (MiniCPM3 divides the LM head's input by logits_scaling: found below)

    def head(h):  # the model's final norm and LM head (LayerSkip's shared exit head)
        x = final_norm(h)
        return model.lm_head(x if divisor == 1.0 else x / divisor).argmax(-1)

    embed = _embedder(model, layers, input_ids[:, :1])
    for i, layer in enumerate(layers):  # (hybrids: linear attention, state-space layers)
        if block_kind(layer) == "ffn":  # (Nemotron-H's MLP / MoE blocks: nothing cached)
            continue
        mixer = linear_mixer(layer)
        if mixer is not None:
            raise TypeError(
                f"self_speculative_generate: layer {i}'s token mixer is {mixer}, whose state "
                "cannot be rolled back to the accepted tokens after a rejected draft"
            )
        attn = attention_of(layer)
        if isinstance(getattr(attn, "indexer", None), torch.nn.Module):
            raise TypeError(
                f"self_speculative_generate: layer {i}'s {type(attn).__name__} selects its keys "
                "with an indexer (DeepSeek V3.2's sparse attention), whose cache it does not keep"
            )
        if getattr(attn, "config", None) is None or not isinstance(
            getattr(attn, "layer_idx", None), int
        ):
            raise TypeError(
                f"self_speculative_generate: layer {i}'s {type(attn).__name__} is not a softmax "
                "attention of a Hugging Face decoder (no config / layer_idx)"
            )

    cache = DynamicCache()
    try:
        h = _run_layers(model, embed(input_ids), 0, n, 0, cache, cache_kw)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, AttributeError, IndexError, KeyError) as e:
        raise TypeError(
            "self_speculative_generate cannot run this model's layers one by one "
            f"({type(e).__name__}: {e})"
        ) from e
    divisor = _check_layer_by_layer(model, input_ids, final_norm(h[:, -1:]))
    pending = head(h[:, -1:])  # the next token: in no layer's cache yet
    verified = input_ids.shape[1]  # tokens every layer holds
    out = [pending]
    stats = {"drafted": 0, "accepted": 0, "verify_steps": 0}
    done = 1
    while done < max_new_tokens and (eos_token_id is None or int(pending) != eos_token_id):
        k = min(num_draft, max_new_tokens - done)
        # draft: pending, then each draft token, through the first layers; keep their exit states
        exits, drafts, x = [], [], pending
        for i in range(k + 1):  # (the last pass only gives d_k's exit state, for verification)
            h = _run_layers(model, embed(x, verified + i), 0, exit_layer, verified + i, cache,
                            cache_kw)  # fmt: skip
            exits.append(h)
            if i < k:
                x = head(h)
                drafts.append(x)
        draft = torch.cat(drafts, 1)  # [1, k]
        # verify: the remaining layers on the exit states of pending, d_1 .. d_k
        h = _run_layers(model, torch.cat(exits, 1), exit_layer, n, verified, cache, cache_kw)
        verdict = head(h)  # verdict[:, i]: the model's token after position verified + i
        agree = (verdict[:, :k] == draft)[0].int()
        j = int(agree.cumprod(0).sum())  # leading drafts the model agrees with
        new = torch.cat([draft[:, :j], verdict[:, j : j + 1]], 1)
        stats["drafted"] += k
        stats["accepted"] += j
        stats["verify_steps"] += 1
        verified += 1 + j  # pending and the accepted drafts
        _crop(cache, verified)
        out.append(new)
        done += new.shape[1]
        pending = new[:, -1:]
        if eos_token_id is not None and bool((new == eos_token_id).any()):
            break
    tokens = torch.cat(out, 1)[:, :max_new_tokens]
    if eos_token_id is not None:
        hits = (tokens[0] == eos_token_id).nonzero()
        if hits.numel():
            tokens = tokens[:, : int(hits[0]) + 1]
    return torch.cat([input_ids, tokens], 1), stats


def _check_layer_by_layer(model, input_ids, normed_last: torch.Tensor) -> float:
    """Running the layers one by one (``_run_layers``: fastlayers' masks, RoPE per layer type,
    embedding transform) must give the LM head the input the model's own forward gives it, on
    the prompt's last token; ValueError otherwise (a structure it does not reproduce: decoding
    would be another model's). One extra forward over the prompt. Returns what the model divides
    the final norm's output by before its LM head: 1, or the config's ``logits_scaling`` where
    that is what the model's forward gives it (MiniCPM3; Granite divides the logits instead)."""
    seen = []
    hook = model.lm_head.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(input_ids, use_cache=False)
    finally:
        hook.remove()
    want = seen[-1][:, -1:].float()
    tol = 1e-4 if normed_last.dtype == torch.float32 else 3e-2
    scaling = getattr(model.config, "logits_scaling", None)
    divisors = [1.0]
    if isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and scaling > 0 \
            and scaling != 1:  # fmt: skip
        divisors.append(float(scaling))
    for divisor in divisors:
        got = (normed_last if divisor == 1.0 else normed_last / divisor).float()
        err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        if err <= tol:
            return divisor
    err = ((normed_last.float() - want).norm() / want.norm().clamp_min(1e-30)).item()
    raise ValueError(
        "self_speculative_generate: running this model's layers one by one does not "
        f"reproduce its forward (relative difference {err:.3g} at the LM head's input on the "
        "prompt's last token); its structure is not one fastlayers knows"
    )


_layer_skip_cache_class = None


def _is_layer_skip_cache(cache) -> bool:
    return _layer_skip_cache_class is not None and isinstance(cache, _layer_skip_cache_class)


def LayerSkipCache(*args, **kwargs):  # noqa: N802 (a class made on first use: needs transformers)
    """A Hugging Face ``DynamicCache`` for models with skipped attention layers: the sequence
    length and mask sizes come from the first layer that holds keys (statically skipped layers
    hold none), so any layer's attention may be skipped, layer 0's included; when none holds any
    (every attention routed or skipped), from the tokens the routed layers counted. Also
    ``layer_lengths()``, ``crop_to(length)`` (early-exit / speculative rollback) and ``reset()``
    (the routed layers' tokens too). For a hybrid model (linear attention or convolution layers:
    Qwen3.5, Granite 4, ...) make it with ``config=model.config``, so that it holds their states
    (as ``DynamicCache(config=...)`` does); their states cannot be cropped."""
    global _layer_skip_cache_class
    if _layer_skip_cache_class is None:
        from transformers import DynamicCache

        class _LayerSkipCache(DynamicCache):
            _fl_length = 0  # tokens the routed layers counted (their length when none holds keys)

            def _reference_index(self):
                for i, layer in enumerate(self.layers):
                    keys = getattr(layer, "keys", None)
                    holds = keys is not None and keys.numel() > 0
                    if getattr(layer, "is_initialized", False) and holds:
                        return i
                return None

            def _reference_layer(self):
                i = self._reference_index()
                return None if i is None else self.layers[i]

            def get_seq_length(self, layer_idx: int = 0) -> int:
                layer = self._reference_layer()
                if layer is None:  # every attention routed or skipped: the tokens they counted
                    return self._fl_length
                return layer.get_seq_length()

            def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
                layer = self._reference_layer()
                if layer is None:
                    return query_length + self._fl_length, 0
                return layer.get_mask_sizes(query_length)

            def crop(self, tokens_to_remove: int) -> None:
                super().crop(tokens_to_remove)
                if tokens_to_remove < 0:  # (a negative count removes that many)
                    self._fl_length = max(self._fl_length + tokens_to_remove, 0)
                elif tokens_to_remove > 0:  # (older transformers: the length to keep)
                    self._fl_length = min(self._fl_length, tokens_to_remove)

            def reset(self) -> None:
                super().reset()
                self._fl_length = 0
                for store in getattr(self, "_fl_routed", {}).values():
                    store.__init__()

            def layer_lengths(self) -> list[int]:
                return [layer.get_seq_length() if getattr(layer, "is_initialized", False) else 0
                        for layer in self.layers]  # fmt: skip

            def crop_to(self, length: int) -> None:
                for i, layer in enumerate(self.layers):  # (a hybrid's linear attention states)
                    held = [
                        *getattr(layer, "is_conv_states_initialized", {}).values(),
                        *getattr(layer, "is_recurrent_states_initialized", {}).values(),
                    ]
                    if any(held):
                        raise ValueError(
                            f"crop_to: layer {i} holds a linear attention's state "
                            f"({type(layer).__name__}), which cannot be rolled back to {length} "
                            "tokens"
                        )
                for layer in self.layers:
                    if getattr(layer, "is_initialized", False):
                        extra = layer.get_seq_length() - length
                        if extra > 0:
                            layer.crop(-extra)
                for store in getattr(self, "_fl_routed", {}).values():  # routed layers
                    store.crop_to(length)
                self._fl_length = min(self._fl_length, length)

            def reorder_cache(self, beam_idx) -> None:  # beam search: the routed rows too
                super().reorder_cache(beam_idx)
                for store in getattr(self, "_fl_routed", {}).values():
                    store.reorder(beam_idx)

            def routed_lengths(self) -> dict[int, list[int]]:
                """Cached routed tokens per routed layer and row."""
                return {i: s.lengths() for i, s in getattr(self, "_fl_routed", {}).items()}

        _layer_skip_cache_class = _LayerSkipCache
    return _layer_skip_cache_class(*args, **kwargs)
