# SPDX-License-Identifier: Apache-2.0
"""FireQ RoPE-aware INT4 KV cache for Hugging Face Llama-style models (reference path).

* :func:`calibrate_rope_aware_kv` collects pre-RoPE keys with forward hooks over calibration
  batches, folds the pre-RoPE scales into ``q_proj`` / ``k_proj`` and returns the post-RoPE
  scales per layer.
* :func:`apply_rope_aware_kv` installs the post-RoPE scales and the attention function
  ``"fastlayers_int4kv"``: queries divided by s, through FP8 per (token, head); keys times s and
  values through INT4 per (token, kv head, group); softmax attention over the dequantized values.
* :class:`Int4KVCache` stores keys and values as INT4 (uint8 ``[B, H_kv, T, d/2]``) with FP8
  scales (``[B, H_kv, T, d/g]``); ``generate(past_key_values=Int4KVCache.for_model(model))``.
  Crop (speculative rollback) and beam reordering work as for Hugging Face caches.

Hybrid models (Qwen3-Next, Qwen3.5, OLMo-hybrid, LFM2/3: linear attention or convolution layers
between the softmax attention layers) get the INT4 path on their softmax attention layers; the
other layers keep their own states (Hugging Face's cache layers for them, in :class:`Int4KVCache`).

Multi-head latent attention (DeepSeek V2/V3, GLM-4.7-Flash, Kimi-Linear, ...): Hugging Face's
modules cache the compressed latent ``[B, 1, T, kv_lora_rank]`` and the RoPE key part shared by
the heads ``[B, 1, T, qk_rope_head_dim]``, and expand every head's keys and values from them
(``expand_kv``). The INT4 path quantizes what they cache (as vLLM's MLA caches do): the latent and
the RoPE part (times its post-RoPE scale, calibrated on the rotated part; no pre-RoPE fold) as one
INT4 row per token with FP8 scales per group; queries through FP8. A decode step attends over the
rows in place, ``kv_b_proj`` absorbed into the queries and the output
(:func:`latent_rows_attention`: the INT4 decode kernel with the latent as keys and values), as
does a prompt, left-padded or not (the INT4 prefill kernel); steps with other masks expand the
dequantized rows with the module's own ``expand_kv`` and attend in PyTorch.
With a DSA indexer (DeepSeek V3.2, GLM MoE DSA, HunYuan V4), each query of a step or a prompt
reads only the rows it picked (gathered; all of them in place while its top-k covers the
context), and the indexer's own keys are cached beside the INT4 latent in FP8.
"""

from __future__ import annotations

import functools
import math
import sys
import weakref

import torch
from torch.nn import Module
from transformers import AttentionInterface, Cache
from transformers.cache_utils import CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from fastlayers._decoder import (
    LINEAR_MIXER_NAMES,
    MLAProjections,
    attention_kv,
    attention_mismatch_either_way,
    attention_name,
    attention_of,
    attention_unsupported,
    checked_with_tables,
    cos_sin,
    decoder_layers,
    head_counts,
    head_dim_of,
    linear_mixer,
    logit_softcap,
    mla_projections,
    model_gives_tables,
    qk_norms,
    qkv_projections,
    rope_layout,
    sparse_indexer,
)
from fastlayers.ops._common import no_dispatch_modes, on_cpu, tensor_version
from fastlayers.ops.int4_fp8 import quantize_fp8_per_token
from fastlayers.ops.kvint4 import (
    decode_step_direct,
    int4_kv_attention,
    int4_kv_decode,
    kv_cache_write,
    q_quantize,
)
from fastlayers.quant.kv_cache import Int4KVStore
from fastlayers.quant.rope_kv import (
    compute_post_rope_scales,
    compute_pre_rope_scales,
    dequantize_kv_int4,
    fold_pre_rope,
    inverse_query_scale,
    quantize_kv_int4,
    quantize_q_fp8,
    straight_through,
)

ATTENTION = "fastlayers_int4kv"
# the same attention, given a mask tensor always (eager's): for models with a DSA indexer, which
# reads the mask (DeepSeek V3.2, GLM MoE DSA)
ATTENTION_MASKED = "fastlayers_int4kv_masked"


def _attention_modules(model, what: str = "apply_rope_aware_kv"):
    """Each decoder layer's attention (None for a hybrid's linear attention or convolution layer);
    ValueError where the INT4 attention cannot stand in, or
    where the module computes its queries and keys otherwise than the calibration recomputes
    them (checked by running it once: attention_mismatch)."""
    layers = decoder_layers(model, what)
    for i, layer in enumerate(layers):  # (Falcon-H1: a Mamba mixer beside each attention)
        beside = [n for n in LINEAR_MIXER_NAMES if isinstance(getattr(layer, n, None), Module)]
        if attention_name(layer) is not None and beside:
            raise ValueError(
                f"{what}: layer {i} runs {', '.join(beside)} beside its attention, whose state "
                "and keys would share one cache layer, which the INT4 cache does not have"
            )
    mods = [None if linear_mixer(layer) else attention_of(layer) for layer in layers]
    if all(m is None for m in mods):
        raise ValueError(f"{what}: {type(model).__name__} has no softmax attention layer")
    own = _own_cache_class(model)
    if own is not None and any(m is None for m in mods):
        raise ValueError(
            f"{what}: {type(model).__name__} keeps its linear attention states in a cache class of "
            f"its own ({own}), which the INT4 cache cannot stand in for"
        )
    for i, m in enumerate(mods):
        if m is None:
            continue
        why = attention_unsupported(m, mla=True)
        latent = _latent(m)
        if why is None and latent is not None and not callable(getattr(type(m), "expand_kv", None)):
            why = (f"{type(m).__name__} is multi-head latent attention without expand_kv (the "
                   "INT4 path quantizes the latent it caches before it expands it)")  # fmt: skip
        if why is None:
            if latent is None:
                rope_layout(m, what)
            # (the module's own queries are used: only its keys and values are compared)
            why = attention_mismatch_either_way(m, model_gives_tables(model), queries=False)
        if why is not None:
            raise ValueError(f"{what}: layer {i}: {why}")
    return mods


def _latent(attn) -> MLAProjections | None:
    """The :class:`~fastlayers._decoder.MLAProjections` of a multi-head latent attention (its cache
    holds the latent), None for any other attention."""
    mla = mla_projections(attn)
    return mla if isinstance(mla, MLAProjections) else None


def _cached_widths(attn) -> dict[str, int]:
    """The widths a layer's cache holds, by name: keys' and values' head sizes (MiMo-V2-Flash's
    values have one of their own), or a multi-head latent attention's latent and RoPE part."""
    mla = _latent(attn)
    if mla is not None:
        return {"kv_lora_rank": mla.kv_rank, "qk_rope_head_dim": mla.rope}
    qkv = qkv_projections(attn)
    return {"head_dim": qkv.head_dim, "v_head_dim": qkv.value_dim}


def _default_group(attn) -> int:
    """The quantization group by default: the largest that divides every width the layer caches
    (the head size; with values of another head size, or for multi-head latent attention's latent
    and RoPE part, their greatest common divisor)."""
    return math.gcd(*_cached_widths(attn).values())


def _mla_pairing(mla: MLAProjections) -> str:
    """The channel pairs RoPE rotates in an MLA's rotated key part as its module gives it:
    rotate-half (DeepSeek V3's interleaved weights are de-interleaved by its RoPE function), or
    interleaved (DeepSeek V2's complex tables)."""
    return "interleaved" if mla.complex_tables else "half"


def _own_cache_class(model) -> str | None:
    """The name of a cache class the model's own module defines (MiniMax's ``MiniMaxCache``, which
    its forward requires of a hybrid's cache), or None."""
    module = sys.modules.get(type(model).__module__)
    for name, value in vars(module or object).items():
        if isinstance(value, type) and issubclass(value, Cache) and \
                value.__module__ == type(model).__module__:  # fmt: skip
            return name
    return None


def check_rope_aware_kv(model, what: str = "calibrate_rope_aware_kv") -> None:
    """The checks of :func:`calibrate_rope_aware_kv` and :func:`apply_rope_aware_kv` (a decoder
    whose attention the INT4 path can stand in for, with rotate-half or interleaved RoPE on all
    of each head or its leading channels), without changing the model."""
    _attention_modules(model, what)


class _Int4Layer(Int4KVStore, CacheLayerMixin):
    """One layer of :class:`Int4KVCache`: an :class:`~fastlayers.quant.kv_cache.Int4KVStore` (INT4
    tokens in buffers with spare capacity, written in place) behind Hugging Face's layer API."""

    is_croppable = True

    def __init__(self, post_scale: torch.Tensor | None, group_size: int):
        Int4KVStore.__init__(self)
        CacheLayerMixin.__init__(self)
        self.post_scale, self.group_size = post_scale, group_size
        self.dtype = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        post = None if self.post_scale is None else self.post_scale.to(key_states.device).float()
        self.write(key_states, value_states, self.group_size, post)  # quantized in place
        # The attention reads the INT4 cache (or dequantizes it where a mask needs the general
        # path): markers, not tensors of keys and values.
        keys = key_states.new_empty(0)
        values = value_states.new_empty(0)
        keys._fl_layer = values._fl_layer = self
        return keys, values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        self.truncate(max(0, self.length + tokens_to_remove))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.reorder(beam_idx)

    def reset(self) -> None:
        self.clear()

    def offload(self):  # the quantized tensors stay where they are
        pass

    def prefetch(self):
        pass


class _Int4LatentLayer(_Int4Layer):
    """A multi-head latent attention's layer of :class:`Int4KVCache`: its module caches the latent
    ``[B, 1, T, kv_lora_rank]`` and the RoPE key part ``[B, 1, T, rope]``
    (``update(latent, k_rot)``) and expands every head's keys and values from the whole cache.
    Each token is stored as one INT4 row of keys, ``[latent | RoPE part]`` (the RoPE part times
    its post-RoPE scale ``[1, rope]``; groups never straddle the two, the group dividing both),
    and no values of their own: the latent is the keys' first ``kv_lora_rank`` channels. A
    decode step or a prompt (left-padded or not; a DSA indexer's picks gathered) attends over
    these rows in place
    (:func:`latent_rows_attention`: the queries absorb the key half of ``kv_b_proj``, the output
    its value half); anything else expands them
    (:meth:`latent_parts`: the values :func:`apply_rope_aware_kv`'s ``expand_kv`` rounds to
    without a cache, to the bit). ``update`` answers markers, as :class:`_Int4Layer` does."""

    def update(self, latent, k_rot, *args, **kwargs):
        if latent.dim() != 4 or k_rot.dim() != 4 or latent.shape[1] != 1 or \
                k_rot.shape[:3] != latent.shape[:3]:  # fmt: skip
            raise ValueError(
                "a multi-head latent attention's cache layer takes the latent [batch, 1, tokens, "
                f"kv_lora_rank] and the RoPE key part [batch, 1, tokens, rope], got "
                f"{tuple(latent.shape)} and {tuple(k_rot.shape)}"
            )
        if not self.is_initialized:
            self.lazy_initialization(latent, k_rot)
        self.rank = latent.shape[3]
        post = None
        if self.post_scale is not None:  # (ones on the latent: times 1 is exact)
            rope = self.post_scale.to(k_rot.device).float()
            post = torch.cat([rope.new_ones(1, self.rank), rope], 1)
        rows = torch.cat([latent, k_rot.to(latent.dtype)], 3)
        self.reserve(rows, self.group_size, 0)  # (no values of their own)
        kv_cache_write(rows, *self.buffers[:2], self.length, post)
        self.length += rows.shape[2]
        latent, k_rot = latent.new_empty(0), k_rot.new_empty(0)
        latent._fl_layer = k_rot._fl_layer = self  # (expand_kv passes them to the attention)
        return latent, k_rot

    rank = 0  # kv_lora_rank, the width of the latent (the first channels of each row)

    def latent_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached latent ``[B, 1, T, kv_lora_rank]`` and RoPE key part ``[B, 1, T, rope]``,
        dequantized (the RoPE part divided by its post-RoPE scale again) in the model's dtype."""
        rows = dequantize_kv_int4(self.kq, self.ks)
        latent, k_rot = rows[..., : self.rank], rows[..., self.rank :]
        if self.post_scale is not None:
            k_rot = k_rot / self.post_scale.to(k_rot.device).float()[None, :, None, :]
        return latent.to(self.dtype), k_rot.to(self.dtype)

    # A DSA indexer's keys (DeepSeek V3.2, GLM MoE DSA, HunYuan V4: [B, T, index_head_dim], one
    # per token, what it scores the queries against to pick the keys they attend to): FP8-E4M3
    # with one fp32 scale per token (max|k| / 448), as DeepSeek's reference inference and vLLM keep
    # them (without their Hadamard rotation, which a floating-point format hardly needs: e4m3's
    # relative error does not depend on the magnitude over 4 decades below the row's maximum), or
    # as they come with ``indexer_fp8=False``. The indexer gets them back dequantized, in its dtype.
    # Only rows of the indexer's key width (``indexer_dim``, its ``head_dim``, which
    # Int4KVCache.for_model reads off the module) go through FP8: an indexer that caches other
    # states this way (GLM-5-Next packs gate scores and a validity channel beside its keys) keeps
    # them as they come.
    indexer_fp8 = True
    indexer_dim = None
    _indexer = None  # (keys [B, T, d], scales [B, T, 1] fp32 or None)

    def update_indexer(self, keys: torch.Tensor) -> torch.Tensor:
        """Appends a DSA indexer's keys ``[B, t, d]`` and returns all of them ``[B, T, d]`` (in
        the keys' dtype; through FP8 with ``indexer_fp8``)."""
        if keys.dim() != 3:
            raise ValueError(f"a DSA indexer's keys must be [batch, tokens, dim], got "
                             f"{tuple(keys.shape)}")  # fmt: skip
        fp8 = self.indexer_fp8 and keys.shape[-1] == self.indexer_dim
        new = quantize_fp8_per_token(keys) if fp8 else (keys, None)
        if self._indexer is not None:
            new = tuple(None if n is None else torch.cat([o, n], 1)
                        for o, n in zip(self._indexer, new, strict=True))  # fmt: skip
        self._indexer = new
        return self._indexer_keys(keys.dtype)

    def _indexer_keys(self, dtype=None) -> torch.Tensor | None:
        if self._indexer is None:
            return None
        keys, scales = self._indexer
        if scales is None:
            return keys
        return (keys.float() * scales).to(dtype or self.dtype)

    @property
    def indexer_keys(self) -> torch.Tensor | None:
        """A DSA indexer's cached keys ``[B, T, d]`` as the indexer gets them (None: no indexer)."""
        return self._indexer_keys()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self._indexer is not None:
            self._indexer = tuple(None if x is None else x[:, : self.length] for x in self._indexer)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self._indexer is not None:
            beams = beam_idx.to(self._indexer[0].device)
            self._indexer = tuple(None if x is None else x.index_select(0, beams)
                                  for x in self._indexer)  # fmt: skip

    def reset(self) -> None:
        super().reset()
        self._indexer = None

    def _indexer_nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self._indexer or () if x is not None)

    def nbytes(self) -> int:
        """The INT4 latent's bytes, and a DSA indexer's keys' (FP8 and their scales)."""
        return super().nbytes() + self._indexer_nbytes()

    def allocated_nbytes(self) -> int:
        return super().allocated_nbytes() + self._indexer_nbytes()


class Int4KVCache(Cache):
    """A Hugging Face cache holding keys and values as INT4 with FP8 scales per (token, kv head,
    group of ``group_size`` channels); keys are multiplied by each layer's post-RoPE scale first.
    Build it with :meth:`for_model` after :func:`apply_rope_aware_kv`. ``other_layers``: Hugging
    Face cache layers by layer index for a hybrid's layers without softmax attention (their
    linear attention or convolution states; :meth:`for_model` makes them from the config).
    ``latent_layers``: the indices of multi-head latent attention layers, whose cache holds the
    latent and the RoPE key part instead of keys and values (:class:`_Int4LatentLayer`;
    :meth:`for_model` finds them). ``indexer_fp8``: a DSA indexer's keys (DeepSeek V3.2, GLM MoE
    DSA, HunYuan V4) in FP8-E4M3 with a scale per token, as DeepSeek's reference and vLLM keep them
    (default; for the layers whose indexer's key width :meth:`for_model` found, each layer's
    ``indexer_dim``), or as they come (False)."""

    def __init__(self, post_scales, group_size: int = 128, other_layers: dict | None = None,
                 latent_layers=(), indexer_fp8: bool = True):  # fmt: skip
        if isinstance(post_scales, (str, bytes, torch.Tensor)) or not hasattr(
            post_scales, "__iter__"
        ):
            raise TypeError(
                f"post_scales must be a list of one [kv_heads, head_dim] fp32 tensor (or None) "
                f"per layer, got {type(post_scales).__name__}"
            )
        post_scales = list(post_scales)
        for s in post_scales:
            if s is not None and not isinstance(s, torch.Tensor):
                raise TypeError(f"post_scales holds a {type(s).__name__}, not a tensor or None")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if group_size % 2:
            raise ValueError(f"group_size must be even, got {group_size}")
        other = dict(other_layers or {})
        if any(not isinstance(i, int) or not 0 <= i < len(post_scales) for i in other):
            raise ValueError(f"other_layers must be keyed by layer indices in [0, "
                             f"{len(post_scales)}), got {sorted(other)}")  # fmt: skip
        latent = set(latent_layers)
        if any(not isinstance(i, int) or not 0 <= i < len(post_scales) or i in other
               for i in latent):  # fmt: skip
            raise ValueError(f"latent_layers must be layer indices in [0, {len(post_scales)}) "
                             f"not in other_layers, got {sorted(latent)}")  # fmt: skip
        if not isinstance(indexer_fp8, bool):
            raise TypeError(f"indexer_fp8 must be a bool, got {type(indexer_fp8).__name__}")
        kinds = [_Int4LatentLayer if i in latent else _Int4Layer for i in range(len(post_scales))]
        super().__init__(layers=[other[i] if i in other else kinds[i](s, group_size)
                                 for i, s in enumerate(post_scales)])  # fmt: skip
        for layer in self.layers:
            if isinstance(layer, _Int4LatentLayer):
                layer.indexer_fp8 = indexer_fp8

    @classmethod
    def for_model(cls, model, group_size: int | None = None,
                  indexer_fp8: bool = True) -> Int4KVCache:  # fmt: skip
        mods = _attention_modules(model)
        first = next(m for m in mods if m is not None)
        if group_size is None:
            group_size = getattr(first, "_fl_group_size", None) or _default_group(first)
        other = {}
        if any(m is None for m in mods):  # a hybrid: its own cache layers for the other layers
            from transformers.cache_utils import (
                DYNAMIC_LAYER_TYPE_MAPPING,
                get_layer_types_and_kwargs,
            )

            types, kwargs = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
            other = {i: DYNAMIC_LAYER_TYPE_MAPPING[types[i]](**kwargs[i])
                     for i, m in enumerate(mods) if m is None}  # fmt: skip
        latent = [i for i, m in enumerate(mods) if m is not None and _latent(m) is not None]
        cache = cls([getattr(m, "_fl_k_post", None) for m in mods], group_size, other, latent,
                    indexer_fp8)  # fmt: skip
        for i in latent:  # (the width of the keys a DSA indexer caches: FP8 rows)
            width = getattr(sparse_indexer(mods[i]), "head_dim", None)
            cache.layers[i].indexer_dim = width if isinstance(width, int) else None
        return cache

    def nbytes(self) -> int:
        """Bytes the cached tokens' quantized keys, values and scales occupy."""
        return sum(layer.nbytes() for layer in self.layers if isinstance(layer, _Int4Layer))

    def allocated_nbytes(self) -> int:
        """Bytes of the layers' buffers, spare capacity included (at most twice the tokens')."""
        return sum(x.allocated_nbytes() for x in self.layers if isinstance(x, _Int4Layer))


# The last mask's answer: every layer of a step gets the same mask tensor.
# (weakref to the mask, (version, batch, length, queries), result)
_LEFT_PADDING_MEMO: list = [None]


def _left_padding(mask, batch: int, length: int, queries: int = 1):
    """What the INT4 kernels need to apply the mask of ``queries`` new tokens (the cache's last)
    ``[B or 1, 1, queries, length]`` (additive float, or boolean with True = attend): None when
    it hides nothing but causality, int32 ``starts [B]`` when each batch row also hides exactly
    its first ``starts[b]`` tokens (a left-padded batch; query rows inside the padding, which see
    nothing, are not compared: their outputs are never read), False for any other mask (the
    caller then runs the masked general path). Remembered for the last mask (by identity and
    version: the layers of a step share it; an inference tensor has no version and is looked at
    every time)."""
    if mask is None:
        return None
    # (compiling or an inference tensor: no version to key on, nothing remembered)
    version = tensor_version(mask) if no_dispatch_modes() else None
    key = (version, batch, length, queries)
    if version is not None:
        memo = _LEFT_PADDING_MEMO[0]
        if memo is not None and memo[0]() is mask and memo[1] == key:
            return memo[2]
    result = _left_padding_of(mask, batch, length, queries)
    if version is not None:
        _LEFT_PADDING_MEMO[0] = (weakref.ref(mask), key, result)
    return result


def _left_padding_of(mask, batch: int, length: int, queries: int):
    if mask.dim() != 4 or mask.shape[0] not in (1, batch) or \
            tuple(mask.shape[1:]) != (1, queries, length):  # fmt: skip
        return False
    shown = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0  # [B', Tq, T]
    hidden = ~shown[:, -1]  # (the last query sees every cached token but the padding)
    starts = hidden.sum(-1, dtype=torch.int32)
    positions = torch.arange(length, device=mask.device)
    prefix = positions[None, :] < starts[:, None]
    if not torch.equal(hidden, prefix):
        return False
    if queries > 1:  # causal besides: query i sees tokens [starts[b], length - queries + i]
        causal = positions[None, :] <= length - queries + positions[:queries, None]
        want = causal[None] & ~prefix[:, None, :]
        if not bool(((shown == want) | ~want.any(-1, keepdim=True)).all()):
            return False
    if not bool(hidden.any()):  # (the common case: nothing hidden but causality)
        return None
    return starts.expand(batch).contiguous()


def _int4_round_trip(x: torch.Tensor, group_size: int, post=None) -> torch.Tensor:
    """``x`` through the INT4 cache format and back (``post [H, d]``: times it in fp32 before,
    divided by it after, as an MLA's cache layer does). Its gradient passes straight through (the
    rounding taken as the identity, as quantization-aware training does): the packing to bytes
    has none, so without it the key and value projections would get no gradient at all."""
    if post is None:
        rounded = dequantize_kv_int4(*quantize_kv_int4(x.detach(), group_size), x.dtype)
    else:
        post = post.to(x.device).float()[None, :, None, :]
        rounded = dequantize_kv_int4(*quantize_kv_int4(x.detach().float() * post, group_size))
        rounded = (rounded / post).to(x.dtype)
    return straight_through(rounded, x)


def _expand_latent(module, latent, k_rot):
    """A multi-head latent attention's ``expand_kv`` under :func:`apply_rope_aware_kv`: the latent
    and the RoPE key part rounded as :class:`Int4KVCache` stores them, then the module's own
    expansion into every head's keys and values. From an :class:`Int4KVCache` (markers of its
    layer), nothing yet: the attention reads the INT4 rows in place or expands them
    (:func:`_attention`)."""
    if getattr(latent, "_fl_layer", None) is not None:
        return latent, k_rot
    g = module._fl_group_size
    if module._fl_quantize_values:
        latent = _int4_round_trip(latent, g)
    if module._fl_quantize_keys:
        k_rot = _int4_round_trip(k_rot, g, module._fl_k_post)
    return type(module).expand_kv(module, latent, k_rot)


def _absorbable(module, query) -> MLAProjections | None:
    """The module's :class:`MLAProjections` when a decode step can attend over its INT4 latent
    rows in place: ``kv_b_proj`` a plain linear layer without bias (its weight is absorbed), the
    query's heads its heads."""
    mla, kvb = module.__dict__.get("_fl_mla"), getattr(module, "kv_b_proj", None)
    ok = (
        mla is not None and type(kvb) is torch.nn.Linear and kvb.bias is None
        and kvb.weight.dim() == 2 and query.shape[1] == mla.heads
        and query.shape[3] == mla.nope + mla.rope
    )  # fmt: skip
    return mla if ok else None


def _picked_rows(layer, picked, mask, first: int):
    """The INT4 rows of ``layer`` a DSA indexer picked for ``c`` queries of a step (``picked
    [B, c, k]`` token indices; the queries are the cache's tokens ``first .. first + c - 1``)
    that the mask shows and causality allows (eager's mask ``[B or 1, 1, c, T]``, their rows of
    it: padding hidden), as DeepSeek's sparse attention reads them: gathered into
    ``[B * c, 1, n, .]`` (``n`` the most any query keeps; query ``i`` of batch row ``b`` at
    ``b * c + i``), each query's at the end in token order, the slots before them skipped
    (``starts``): ``(rows, scales, n, starts)``."""
    kq, ks = layer.kq[:, 0], layer.ks.view(torch.uint8)[:, 0]  # [B, T, .]
    b, t, c = kq.shape[0], kq.shape[1], picked.shape[1]
    keep = torch.zeros(b, c, t, dtype=torch.bool, device=kq.device)
    keep.scatter_(2, picked.long(), True)
    position = torch.arange(t, device=kq.device)
    keep &= position <= first + torch.arange(c, device=kq.device)[:, None]  # (causal)
    if mask is not None:  # (bool: True shows; float: 0 shows)
        shown = mask[:, 0, -c:, :t]
        keep &= shown if shown.dtype == torch.bool else shown == 0
    keep = keep.view(b * c, t)
    count = keep.sum(1)
    n = int(count.max())
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, t - n :]  # (kept ones last)
    batch = torch.arange(b, device=kq.device).repeat_interleave(c)[:, None]
    rows, scales = kq[batch, order], ks[batch, order].view(layer.ks.dtype)  # [B * c, n, .]
    return rows[:, None], scales[:, None], n, (n - count).to(torch.int32)


# Queries of a prompt whose picked rows one gather takes (a DSA indexer's: [B * chunk, 1, n, .]
# INT4 rows, n up to its top-k)
_PICKED_QUERY_CHUNK = 64


def latent_rows_attention(query, w, nope: int, rows, scales, length: int, starts=None,
                          scaling: float = 1.0, post=None, softcap: float = 0.0, sinks=None,
                          q_fp8: bool = True):  # fmt: skip
    """Multi-head latent attention over INT4 rows ``[latent | RoPE part x post]`` (as
    :class:`Int4KVCache` stores them: ``rows`` uint8 ``[B, 1, T, (r + rope) / 2]``, ``scales``
    ``[B, 1, T, (r + rope) / g]``, ``length`` of them filled, the last ``Tq`` the queries'), as
    FlashMLA and vLLM's MLA decode do: each head's query ``[B, H, Tq, nope + rope]`` (through FP8
    first with ``q_fp8``) absorbs the key half of ``w`` (``kv_b_proj``'s weight viewed
    ``[H, nope + v, r]``) over the latent's channels beside its RoPE part (divided by ``post
    [1, rope]``), the INT4 kernels attend with the latent as keys and values (one kv head serving
    every query head; the values read in place, the rows' first ``r`` channels): the decode
    kernel for one query token, the causal prefill kernel for several (``starts [B]``: left
    padding skipped); and the value half of ``w`` maps their output to each head's values. Returns
    ``[B, H, Tq, v]`` in the query's dtype. The same function as expanding the cache into every
    head's keys and values, in another order, with O(length) memory and no expansion."""
    b, h, t, _ = query.shape
    r = w.shape[2]
    q = q_quantize(query, None, fp8=True) if q_fp8 else query.float()
    q_lat = torch.matmul(q[..., :nope].transpose(0, 1).reshape(h, b * t, nope).to(w.dtype),
                         w[:, :nope])  # [H, B * Tq, r]  # fmt: skip
    q_rot = q[..., nope:]
    if post is not None:
        q_rot = q_rot / post.to(q.device).float()
    q = torch.cat([q_lat.view(h, b, t, r).transpose(0, 1).float(), q_rot], 3)  # [B, H, Tq, .]
    group = 2 * rows.shape[3] // scales.shape[3]
    values = rows[..., : r // 2], scales[..., : r // group]
    if t == 1:
        out = int4_kv_decode(q[:, :, 0], rows, scales, *values, length, scaling, starts, softcap,
                             sinks)[0][:, :, None]  # fmt: skip
    else:
        out = int4_kv_attention(q, rows, scales, *values, length, scaling, softcap, sinks,
                                starts)[0]  # fmt: skip
    out = torch.matmul(out.transpose(0, 1).reshape(h, b * t, r).to(w.dtype),
                       w[:, nope:].transpose(1, 2))  # [H, B * Tq, v]  # fmt: skip
    return out.view(h, b, t, -1).transpose(0, 1).to(query.dtype)


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    if "_fl_group_size" not in module.__dict__:  # (the settings apply_rope_aware_kv gives it)
        raise ValueError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) runs the INT4 KV "
            f"attention ({module.config._attn_implementation!r}) without apply_rope_aware_kv's "
            "settings: is its config shared with a model that was patched? "
            "(set_attn_implementation changes the config object)"
        )
    softcap = kwargs.get("softcap", logit_softcap(module))  # (Gemma 2's logit soft-capping)
    cap = float(softcap or 0.0)
    sinks = kwargs.get("s_aux")  # (GPT-OSS's attention sinks: a logit per head, no value)
    # (multi-head latent attention: keys and values come expanded from the rounded latent, the
    # RoPE part's scale already divided out, _expand_latent; from an Int4KVCache, its rows)
    latent = getattr(module, "_fl_latent", False)
    picked = kwargs.get("indices")  # (a DSA indexer's top-k keys per query, [B, Tq, k])
    q_fp8 = getattr(module, "_fl_q_fp8", True)
    layer = getattr(key, "_fl_layer", None)
    keys = key.shape[-2] if layer is None else layer.length
    if picked is not None and picked.shape[-1] >= keys:
        # (top-k of every key: all of them picked, as in contexts up to index_topk tokens; the
        # mask alone says what each query sees: the in-place paths below)
        picked = None
    if latent and layer is not None:
        grad = torch.is_grad_enabled() and query.requires_grad
        mla = None if grad else _absorbable(module, query)
        rows = None  # (the INT4 rows to attend over in place: rows, scales, length, starts)
        if mla is not None and picked is None:  # (causal, and left padding at most)
            starts = _left_padding(attention_mask, query.shape[0], layer.length, query.shape[2])
            if starts is not False:
                rows = (*layer.buffers[:2], layer.length, starts)
        if mla is not None and (rows is not None or picked is not None):
            w = module.kv_b_proj.weight.view(mla.heads, mla.nope + mla.v_dim, mla.kv_rank)
            extra = (scaling, layer.post_scale, cap, sinks, q_fp8)
            if rows is not None:
                out = latent_rows_attention(query, w, mla.nope, *rows, *extra)
                return out.transpose(1, 2).contiguous(), None
            # a DSA indexer's picks: each query over the rows it picked, gathered (as DeepSeek's
            # sparse attention reads them), a chunk of a prompt's queries at a time
            b, h, tq, _ = query.shape
            outs = []
            for q0 in range(0, tq, _PICKED_QUERY_CHUNK):
                c = min(_PICKED_QUERY_CHUNK, tq - q0)
                mask = attention_mask  # (its rows of these queries, unless it has one row)
                if mask is not None and mask.shape[-2] > 1:
                    mask = mask[..., q0 : q0 + c, :]
                rows = _picked_rows(layer, picked[:, q0 : q0 + c], mask, layer.length - tq + q0)
                q = query[:, :, q0 : q0 + c].transpose(1, 2).reshape(b * c, h, 1, -1)
                out = latent_rows_attention(q, w, mla.nope, *rows, *extra)  # [B * c, H, 1, v]
                outs.append(out.view(b, c, h, -1))
            return torch.cat(outs, 1), None
        key, value = type(module).expand_kv(module, *layer.latent_parts())
        layer = None  # (the general path below, over the expanded heads)
    if picked is not None and not latent:  # (indexers come with multi-head latent attention)
        raise ValueError(f"{type(module).__name__} passes top-k key indices to an attention "
                         "fastlayers does not run as multi-head latent attention")  # fmt: skip
    if picked is not None:  # the keys it did not pick masked, as the model's eager path does
        hidden = torch.ones(*picked.shape[:2], key.shape[2], dtype=torch.bool, device=key.device)
        hidden = hidden.scatter(-1, picked.long(), False)[:, None]
        if attention_mask is None:
            attention_mask = torch.zeros(hidden.shape, dtype=query.dtype, device=query.device)
        attention_mask = attention_mask.masked_fill(hidden, torch.finfo(query.dtype).min)
    k_post = None if latent else getattr(module, "_fl_k_post", None)
    # A decode step on CPU: the query and decode kernels called directly (the ops' bits)
    if layer is not None and query.shape[2] == 1 and on_cpu(query.device):
        starts = _left_padding(attention_mask, query.shape[0], layer.length)
        if starts is not False:
            inv = None
            if k_post is not None:
                inv = inverse_query_scale(module, "_fl_inv_q", k_post, query.shape[1],
                                          query.device, torch.float32)  # fmt: skip
            out = decode_step_direct(query, inv, q_fp8, layer.buffers, layer.length, scaling,
                                     starts, cap, sinks, layer)  # fmt: skip
            if out is not None:
                return out[:, None], None  # [B, 1, Hq, d]
    qs = None  # the queries the decode kernel takes: fp32, divided by k_post, through FP8
    grad = torch.is_grad_enabled() and query.requires_grad  # (the INT4 kernels have no backward)
    if grad:
        if k_post is not None:  # queries carry the inverse of the keys' post-RoPE scale
            inv = inverse_query_scale(module, "_fl_inv_q", k_post, query.shape[1], query.device,
                                      query.dtype)  # fmt: skip
            query = query * inv[None, :, None, :]
        if q_fp8:
            query = quantize_q_fp8(query)
    elif k_post is not None or q_fp8:  # one kernel pass (RoPE is the layer's, already applied)
        inv = None
        if k_post is not None:
            inv = inverse_query_scale(module, "_fl_inv_q", k_post, query.shape[1], query.device,
                                      torch.float32)  # fmt: skip
        qs = q_quantize(query, inv, fp8=q_fp8)
    if layer is not None and query.shape[2] == 1:  # one new token against the Int4KVCache
        starts = _left_padding(attention_mask, query.shape[0], layer.length)
        if starts is not False:  # no mask, or left padding: the decode kernel skips the padding
            kq, ks, vq, vs = layer.buffers  # capacity-sized: the kernel reads `length` tokens
            q = (query if qs is None else qs)[:, :, 0]
            out, _ = int4_kv_decode(q, kq, ks, vq, vs, layer.length, scaling, starts, cap,
                                    sinks)  # fmt: skip
            return out.to(query.dtype)[:, None], None  # [B, 1, Hq, d]
    starts = False  # (causal, and left padding at most: the INT4 prefill kernel)
    if layer is not None and not grad and query.shape[2] > 1:
        starts = _left_padding(attention_mask, query.shape[0], layer.length, query.shape[2])
    if starts is not False:
        q = query if qs is None else qs
        out, _ = int4_kv_attention(q, *layer.buffers, layer.length, scaling, cap, sinks, starts)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None  # [B, Tq, Hq, d]
    if layer is not None:  # another mask: the general path, masked, over the dequantized cache
        key, value = layer.dequantized(layer.dtype)
    elif not latent:  # no Int4KVCache: quantize here (the values the cache would hold)
        dtype = key.dtype
        if k_post is not None:  # in fp32, as the cache write does; then the model's dtype again
            key = key.float() * k_post.to(key.device)[None, :, None, :]
        g = getattr(module, "_fl_group_size", key.shape[-1])
        if getattr(module, "_fl_quantize_keys", True):
            key = _int4_round_trip(key, g)
        key = key.to(dtype)
        if getattr(module, "_fl_quantize_values", True):
            value = _int4_round_trip(value, g)
    if qs is not None:
        query = qs.to(query.dtype)
    if attention_mask is None and query.shape[2] > 1:  # (_mask's None: causal, nothing else)
        tq, tk = query.shape[2], key.shape[2]
        attention_mask = eager_mask(batch_size=1, q_length=tq, kv_length=tk, q_offset=tk - tq,
                                    dtype=query.dtype, device=query.device)  # fmt: skip
    return _eager_attention(module, query, key, value, attention_mask, scaling, dropout, cap,
                            sinks)  # fmt: skip


def _eager_attention(module, query, key, value, mask, scaling, dropout, cap, sinks=None):
    """Hugging Face's eager attention (Gemma 2's with soft-capping, GPT-OSS's with sinks: a column
    of the sink's logit in the softmax, dropped after it), in its order of operations, with the
    key/value head groups read from the shapes (Persimmon's and GPT-NeoX's modules have no
    ``num_key_value_groups``)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if cap:
        weights = torch.tanh(weights / cap) * cap
    if mask is not None:
        weights = weights + mask
    if sinks is not None:
        sink = sinks.to(weights.dtype).reshape(1, -1, 1, 1).expand(*weights.shape[:-1], 1)
        weights = torch.softmax(torch.cat([weights, sink], -1), dim=-1, dtype=torch.float32)
        weights = weights[..., :-1].to(query.dtype)
    else:
        weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _mask(*args, **kwargs):
    """Eager attention's additive float mask (sdpa's is boolean), or None where sdpa's is None:
    nothing but causality hides a key (no padding, no window, no custom mask function, as many
    keys as queries or one query). The attention then reads no mask tensor: the INT4 kernels are
    causal (prefill) or see every cached token (decode), and the general path builds the causal
    mask itself."""
    if not args and kwargs.get("allow_is_causal_skip", False):
        dtype = kwargs.pop("dtype", torch.float32)
        mask = sdpa_mask(**kwargs)
        if mask is None:
            return None
        zero = torch.zeros((), device=mask.device, dtype=dtype)  # (as eager_mask converts it)
        return torch.where(mask, zero, torch.finfo(dtype).min)
    return eager_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, _mask)
AttentionInterface.register(ATTENTION_MASKED, _attention)
AttentionMaskInterface.register(ATTENTION_MASKED, eager_mask)


def apply_rope_aware_kv(
    model, post_scales=None, group_size: int | None = None, q_fp8=True, quantize_keys=True,
    quantize_values=True,
):  # fmt: skip
    """Makes ``model`` attend with INT4 keys/values (post-RoPE scaled by ``post_scales[layer]``
    ``[H_kv, d]``, None for none) and FP8 queries. ``group_size`` defaults to the head dim.
    ``q_fp8`` / ``quantize_keys`` / ``quantize_values`` switch each quantization off separately
    (without an :class:`Int4KVCache`), to measure what each costs."""
    mods = _attention_modules(model)
    if post_scales is not None and len(post_scales) != len(mods):
        raise ValueError(f"{len(post_scales)} post-RoPE scales for {len(mods)} layers")
    for i, m in enumerate(mods):
        if m is None:  # (a hybrid's linear attention layer)
            if post_scales is not None and post_scales[i] is not None:
                raise ValueError(f"post_scales[{i}] given for a layer without softmax attention")
            continue
        mla, post = _latent(m), None if post_scales is None else post_scales[i]
        g = group_size or _default_group(m)
        bad = [f"{n} {w}" for n, w in _cached_widths(m).items() if w % g]
        if bad or g % 2:
            raise ValueError(f"group_size {g} must be even and divide layer {i}'s cached widths "
                             f"({', '.join(bad) or 'all'})")  # fmt: skip
        if mla is not None:  # (multi-head latent attention: the cached latent is quantized)
            if post is not None and (not isinstance(post, torch.Tensor)
                                     or tuple(post.shape) != (1, mla.rope)):  # fmt: skip
                raise ValueError(f"post_scales[{i}] must be [1, {mla.rope}] (the RoPE key part "
                                 f"layer {i}'s multi-head latent attention caches), got "
                                 f"{tuple(getattr(post, 'shape', ()))}")  # fmt: skip
            m._fl_latent, m._fl_mla = True, mla
            m.expand_kv = functools.partial(_expand_latent, m)  # (picklable, unlike a method)
        m._fl_k_post = post
        m._fl_group_size = g
        m._fl_q_fp8 = q_fp8
        m._fl_quantize_keys, m._fl_quantize_values = quantize_keys, quantize_values
    model._fl_previous_attention = _Previous(model.config._attn_implementation)
    indexed = any(m is not None and sparse_indexer(m) is not None for m in mods)
    model.set_attn_implementation(ATTENTION_MASKED if indexed else ATTENTION)
    return model


class _Previous:
    """The attention implementation a model had before :func:`apply_rope_aware_kv` (what
    :func:`remove_rope_aware_kv` restores), kept as an object of this module: unpickling a patched
    model (``torch.load`` of a ``torch.save``, a model sent to another process) then imports it,
    which registers the INT4 attention its config names (with the name alone, a fresh process
    that had imported fastlayers but not this module found no such attention)."""

    def __init__(self, name):
        self.name = name


def remove_rope_aware_kv(model):
    for m in _attention_modules(model):
        if m is None:  # (a hybrid's linear attention layer)
            continue
        for name in ("_fl_k_post", "_fl_group_size", "_fl_q_fp8", "_fl_quantize_keys",
                     "_fl_quantize_values", "_fl_inv_q", "_fl_latent", "_fl_mla",
                     "expand_kv"):  # fmt: skip
            m.__dict__.pop(name, None)  # (instance attributes only: expand_kv's class method stays)
    if hasattr(model, "_fl_previous_attention"):
        model.set_attn_implementation(model._fl_previous_attention.name)
        del model._fl_previous_attention
    return model


@torch.no_grad()
def calibrate_rope_aware_kv(
    model, calibration, alpha: float = 8.0, beta: float = 8.0, top_k: int = 8,
    pre_rope: bool = True, post_rope: bool = True, pairing: str | None = None,
):  # fmt: skip
    """Runs ``calibration`` (batches of input ids) through the float model, computes the scales of
    every layer from its keys, folds the pre-RoPE scales into ``q_proj``/``k_proj`` (in place;
    ``Q K^T`` unchanged) and returns the post-RoPE scales ``[H_kv, d]`` per layer (ones when
    ``post_rope`` is False), ready for :func:`apply_rope_aware_kv`. Post-RoPE channels keep a
    pre-RoPE scale of 1. Models that normalise queries and keys between the projections and RoPE
    (``q_norm`` / ``k_norm``: Qwen3, Gemma 3, OLMo 2; ``q_layernorm`` / ``k_layernorm``: StableLM,
    Phi) get post-RoPE scales only: the norm would
    undo a scale folded into the projections. Logit soft-capping (Gemma 2) is applied by the INT4
    attention as the model does; fused qkv projections (Phi-3's ``qkv_proj``, Persimmon's
    ``query_key_value``) get the fold on their query and key rows; attention submodules of
    unknown role are refused (ValueError). Multi-head latent attention layers get post-RoPE
    scales ``[1, qk_rope_head_dim]`` of the RoPE key part their cache holds, and no pre-RoPE
    fold. ``pairing``: the channels RoPE rotates together, read from the model's own
    ``apply_rotary_pos_emb`` when None (rotate-half, or Cohere's interleaved pairs); a value given
    is checked against it."""
    mods = _attention_modules(model, "calibrate_rope_aware_kv")
    latents = [None if m is None else _latent(m) for m in mods]
    layouts = [None if m is None or mla is not None else rope_layout(m, "calibrate_rope_aware_kv")
               for m, mla in zip(mods, latents, strict=True)]  # fmt: skip
    found = [lay.pairing for lay in layouts if lay is not None]
    found += [_mla_pairing(mla) for mla in latents if mla is not None]
    if pairing is not None and any(p != pairing for p in found):
        raise ValueError(f"pairing={pairing!r}, but the model's RoPE pairs channels {found[0]!r}")
    keys = {i: [] for i in range(len(mods))}  # pre-RoPE, as k_proj gives them
    rotated = {i: [] for i in range(len(mods))}  # as the attention is given them
    hooks = []
    projections = [None if m is None or mla is not None else qkv_projections(m)
                   for m, mla in zip(mods, latents, strict=True)]  # fmt: skip
    for i, (m, qkv) in enumerate(zip(mods, projections, strict=True)):
        if m is None:  # (a hybrid's linear attention layer: no keys)
            continue

        def hook(mod, args, kwargs, i=i, m=m, qkv=qkv, mla=latents[i]):
            # the module's input and the RoPE tables the model gives it (None where it gives
            # none: Granite 4, LaraMini's global layers), through the module's own q/k/v, q/k
            # norms and RoPE (attention_kv, the routed path's code, checked against the module)
            x = args[0] if args else kwargs["hidden_states"]  # [B, T, hidden]
            b, t = x.shape[:2]
            tables = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            if not checked_with_tables(m, tables is not None):
                raise ValueError(
                    f"calibrate_rope_aware_kv: layer {i} is given "
                    f"{'no RoPE tables' if tables is None else 'RoPE tables'}, which its check "
                    "did not see"
                )
            cos = sin = None
            if tables is not None:
                cos, sin = (c.expand(b, t, -1).flatten(0, 1) for c in cos_sin(tables, m))
            width = None if mla is not None else layouts[i].table_width
            if cos is not None and width is not None and cos.shape[-1] != width:
                raise ValueError(
                    f"calibrate_rope_aware_kv: layer {i} is given RoPE tables {cos.shape[-1]} "
                    f"wide, but its layout rotates {layouts[i].rotary_dim} channels (tables "
                    f"{width} wide)"
                )
            k_rot = attention_kv(m, x.flatten(0, 1), cos, sin)[0]
            if mla is not None:  # (the RoPE part the heads share, as the module caches it)
                rotated[i].append(k_rot[:, :1, mla.nope :].float())  # [B * T, 1, rope]
                return
            k = qkv.project(x)[1]
            keys[i].append(k.detach().float())  # [B, T, H_kv * d]
            rotated[i].append(k_rot.float())  # [B * T, H_kv, d]

        hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for batch in calibration:
            model(batch)
    finally:
        for h in hooks:
            h.remove()

    scales = []
    for i, m in enumerate(mods):
        if m is None:
            scales.append(None)
            continue
        if latents[i] is not None:  # (MLA: post-RoPE scales of the cached RoPE part, no fold)
            rot, pairing = torch.cat(rotated[i]), _mla_pairing(latents[i])
            s = compute_post_rope_scales(rot, beta, top_k, pairing) if post_rope else None
            scales.append(s)
            continue
        pairing, r, k_norm = layouts[i].pairing, layouts[i].rotary_dim, qk_norms(m)[1]
        d = head_dim_of(m)
        pre = torch.cat([k.reshape(-1, k.shape[1], head_counts(m)[1], d)
                         .flatten(0, 1) for k in keys[i]])  # fmt: skip
        rot = torch.cat(rotated[i])
        s = compute_post_rope_scales(rot, beta, top_k, pairing, r) if post_rope else None
        if pre_rope and k_norm is None:  # (a norm after the projections would undo the fold)
            exclude = s != 1 if s is not None else None
            n = compute_pre_rope_scales(pre, alpha, pairing, exclude, r)
            qkv = projections[i]
            fold_pre_rope(qkv.q, qkv.k, n, q_rows=qkv.rows("q"), k_rows=qkv.rows("k"))
            if s is not None:  # the keys the post-RoPE scale sees are now n * k
                s = torch.where(s != 1, s, torch.ones_like(s))  # (n = 1 on those channels)
        scales.append(s)
    return scales
