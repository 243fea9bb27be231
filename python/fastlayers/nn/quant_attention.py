# SPDX-License-Identifier: Apache-2.0
"""FireQ's RoPE-aware quantized attention core for Llama-style blocks (issue: RoPE-aware KV).

``RopeAwareQuantAttention`` takes the projected, not yet rotated ``q``, ``k``, ``v`` of a block and
the rotary tables, and does RoPE, the post-RoPE key scale (its inverse on the queries), FP8 queries,
INT4 keys and values written to an :class:`~fastlayers.quant.Int4KVStore`, and attention. The
projections, the pre-RoPE scales (folded into ``W_q``/``W_k`` by
:func:`fastlayers.quant.fold_pre_rope`) and the output projection stay in the caller's block.
"""

from __future__ import annotations

import torch

from fastlayers.nn._fixed_dtypes import apply_keeping_dtypes
from fastlayers.ops._common import check_positive_ints, empty, has_kernel, no_dispatch_modes
from fastlayers.ops.kvint4 import (
    _attention_reference,
    _check_kv_quantize,
    _kv_quantize_reference,
    _launch_quantize,
    int4_kv_attention,
    int4_kv_decode,
    q_quantize,
)
from fastlayers.ops.kvint4 import _reference as _decode_reference
from fastlayers.quant.kv_cache import Int4KVStore
from fastlayers.quant.rope_kv import PAIRINGS, apply_rope, inverse_query_scale, quantize_q_fp8


class RopeAwareQuantAttention(torch.nn.Module):
    """``forward(q, k, v, cos, sin, cache=None) -> out``.

    * ``q [B, H_q, T, d]``, ``k``/``v`` ``[B, H_kv, T, d]``: projected, before RoPE (Hugging Face's
      layout after ``view(...).transpose(1, 2)``); fp32, fp16 or bf16.
    * ``cos``/``sin`` ``[T, d]`` or ``[B, T, d]``: the rotary tables of the new tokens' positions
      (Hugging Face's ``position_embeddings``); ``pairing`` ``"half"`` (``rotate_half``) or
      ``"interleaved"``.
    * ``cache``: an :class:`~fastlayers.quant.Int4KVStore` (from :meth:`new_cache`) holding this
      layer's earlier tokens; the new ones are appended. Without it the call attends within ``q``'s
      own tokens. Attention is causal: new token ``i`` sees the cached tokens and new tokens up to
      ``i``.

    The computation (the reference, :meth:`forward_reference`, is the specification): RoPE in fp32
    (exact products, one rounding: :func:`fastlayers.quant.apply_rope`); keys times ``post_scale
    [H_kv, d]`` and queries divided by it (repeated over the GQA group); queries through FP8 per
    (token, head) when ``q_fp8``; keys and values to INT4 per (token, kv head, ``group_size``
    channels) with FP8 scales; softmax attention in fp32 over the dequantized cache, scaled by
    ``scale`` (default ``d ** -0.5``). Output ``[B, H_q, T, d]`` in ``q``'s dtype.

    Kernels: the cache write is one pass per tensor, into the cache's buffers in place (RoPE,
    scale, quantize, pack: :func:`fastlayers.ops.kv_cache_write`); the queries are one pass
    (RoPE, inverse scale, FP8: :func:`fastlayers.ops.q_quantize`); attention reads the INT4 cache
    in place, dequantizing blocks of keys and values in registers: the decode kernel for one new
    token, :func:`fastlayers.ops.int4_kv_attention` (causal, tiled) for several (prefill).
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        group_size: int | None = None,
        post_scale: torch.Tensor | None = None,
        pairing: str = "half",
        q_fp8: bool = True,
        scale: float | None = None,
        device=None,
    ) -> None:
        super().__init__()
        check_positive_ints(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")  # fmt: skip
        group_size = head_dim if group_size is None else group_size
        check_positive_ints(group_size=group_size)
        if head_dim % 2 or group_size % 2 or head_dim % group_size:
            raise ValueError(
                f"head_dim ({head_dim}) must be even and a multiple of an even group_size "
                f"({group_size})"
            )
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        if post_scale is None:
            post_scale = torch.ones(num_kv_heads, head_dim, device=device)
        elif tuple(post_scale.shape) != (num_kv_heads, head_dim):
            raise ValueError(
                f"post_scale must be [{num_kv_heads}, {head_dim}], got {tuple(post_scale.shape)}"
            )
        elif post_scale.device.type != "meta" and (
            not bool((post_scale > 0).all()) or not bool(torch.isfinite(post_scale).all())
        ):  # (a meta tensor has no values to check: a model built on meta, loaded later)
            raise ValueError("post_scale must be positive and finite")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group_size, self.pairing, self.q_fp8 = group_size, pairing, q_fp8
        self.scale = head_dim**-0.5 if scale is None else float(scale)
        self.register_buffer("post_scale", post_scale.detach().float().clone())

    # post_scale stays float32 through model.to(torch.bfloat16) (the cache write needs it).
    _FIXED_DTYPE_BUFFERS = ("post_scale",)

    def _apply(self, fn, *args, **kwargs):
        apply_keeping_dtypes(self, super()._apply, fn, self._FIXED_DTYPE_BUFFERS, *args, **kwargs)
        return self

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, group_size={self.group_size}, pairing={self.pairing!r}, "
            f"q_fp8={self.q_fp8}"
        )

    @staticmethod
    def new_cache() -> Int4KVStore:
        return Int4KVStore()

    # ------------------------------------------------------------------------------------------
    def _check(self, q, k, v, cos, sin, cache) -> None:
        for t, name in ((q, "q"), (k, "k"), (v, "v"), (cos, "cos"), (sin, "sin")):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
        d = self.head_dim
        if q.dim() != 4 or q.shape[1] != self.num_heads or q.shape[3] != d:
            raise ValueError(
                f"q must be [batch, {self.num_heads}, tokens, {d}], got {tuple(q.shape)}"
            )
        b, _, t, _ = q.shape
        want = (b, self.num_kv_heads, t, d)
        for x, name in ((k, "k"), (v, "v")):
            if tuple(x.shape) != want:
                raise ValueError(f"{name} must be {list(want)}, got {tuple(x.shape)}")
            if x.dtype != q.dtype or x.device != q.device:
                raise ValueError(f"{name} must have q's dtype and device ({q.dtype}, {q.device})")
        if cache is not None and not isinstance(cache, Int4KVStore):
            raise TypeError(f"cache must be an Int4KVStore or None, got {type(cache).__name__}")

    def _queries(self, q, cos, sin) -> torch.Tensor:
        """RoPE, divided by the keys' post-RoPE scale, through FP8: fp32 [B, Hq, T, d] (the
        reference's composition)."""
        group = self.num_heads // self.num_kv_heads
        inv = (1.0 / self.post_scale).repeat_interleave(group, dim=0).to(q.device)
        qs = apply_rope(q, cos, sin, self.pairing) * inv[None, :, None, :]
        return quantize_q_fp8(qs) if self.q_fp8 else qs

    def forward(self, q, k, v, cos, sin, cache: Int4KVStore | None = None) -> torch.Tensor:
        self._check(q, k, v, cos, sin, cache)
        post = self.post_scale.to(k.device)
        store = Int4KVStore() if cache is None else cache
        inv = inverse_query_scale(
            self, "_inv_q", self.post_scale, self.num_heads, q.device, torch.float32
        )
        # the cache write in place: RoPE, post-RoPE scale, INT4 (one pass each for k and v)
        store.write(k, v, self.group_size, post, cos, sin, self.pairing)
        if no_dispatch_modes() and has_kernel(q.device, "q_quantize"):
            # The kernel straight away (a decode step is latency: the op's checks and dispatch
            # cost as much as the kernel); q's shape is checked above, the tables against q here.
            _check_kv_quantize(q, inv, self.head_dim, cos, sin, self.pairing, ("q", "scale"))
            qs = empty(q.shape, torch.float32, q.device)
            _launch_quantize(q, inv, self.head_dim, cos, sin, self.pairing, q_out=qs,
                             fp8=self.q_fp8)  # fmt: skip
        else:  # the op (compiling, tracing, other devices)
            qs = q_quantize(q, inv, cos, sin, self.pairing, self.q_fp8)
        kb, ksb, vb, vsb = store.buffers  # the kernels read the INT4 cache in place
        if q.shape[2] == 1:  # one new token: the decode kernel
            out, _ = int4_kv_decode(qs[:, :, 0], kb, ksb, vb, vsb, store.length, self.scale)
            return out[:, :, None].to(q.dtype)
        out, _ = int4_kv_attention(qs, kb, ksb, vb, vsb, store.length, self.scale)
        return out.to(q.dtype)

    def forward_paged(self, q, k, v, cos, sin, cache, layer: int, step) -> torch.Tensor:
        """One serving step over an :class:`~fastlayers.quant.Int4PagedKVCache` (vLLM's token
        layout: the step's new tokens of every sequence one after the other, prompt chunks and
        decode tokens mixed): ``q [N, H_q, d]``, ``k`` / ``v`` ``[N, H_kv, d]`` projected, before
        RoPE; ``cos`` / ``sin`` ``[N, d]`` each token's own position; ``step`` the step's
        :class:`~fastlayers.quant.PagedStep` (``cache.plan(seqs, counts)``, once for all layers).
        Writes the keys and values into layer ``layer``'s pages (RoPE, post-RoPE scale, INT4:
        :func:`fastlayers.ops.kv_cache_write_paged`), rotates, scales and FP8-rounds the queries
        as :meth:`forward`, and returns each token's causal attention over its sequence
        (:func:`fastlayers.ops.int4_kv_attention_paged_varlen`): ``[N, H_q, d]`` in q's dtype.
        The same computation as :meth:`forward` run on each sequence alone; nothing is read back
        to the host."""
        from fastlayers.quant.paged_cache import Int4PagedKVCache, PagedStep  # (quant imports nn)

        if not isinstance(cache, Int4PagedKVCache):
            raise TypeError(f"cache must be an Int4PagedKVCache, got {type(cache).__name__}")
        if not isinstance(step, PagedStep):
            raise TypeError(f"step must be a PagedStep (cache.plan), got {type(step).__name__}")
        for t, name in ((q, "q"), (k, "k"), (v, "v"), (cos, "cos"), (sin, "sin")):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        d = self.head_dim
        if q.dim() != 3 or q.shape[1:] != (self.num_heads, d):
            raise ValueError(f"q must be [tokens, {self.num_heads}, {d}], got {tuple(q.shape)}")
        if q.shape[0] != step.num_tokens:
            raise ValueError(f"q has {q.shape[0]} tokens, the step {step.num_tokens}")
        want = (q.shape[0], self.num_kv_heads, d)
        for x, name in ((k, "k"), (v, "v")):
            if tuple(x.shape) != want:
                raise ValueError(f"{name} must be {list(want)}, got {tuple(x.shape)}")
        for x, name in ((cos, "cos"), (sin, "sin")):
            if tuple(x.shape) != (q.shape[0], d):
                raise ValueError(
                    f"{name} must be [{q.shape[0]}, {d}] (each token's position), got "
                    f"{tuple(x.shape)}"
                )
        mine = (self.num_kv_heads, d, d, self.group_size)
        theirs = (cache.kv_heads, cache.head_dim, cache.value_dim, cache.group_size)
        if mine != theirs:
            raise ValueError(
                f"cache holds (kv_heads, head_dim, value_dim, group_size) {theirs}, this module "
                f"{mine}"
            )
        cache.write(layer, k, v, step, self.post_scale.to(k.device), cos, sin, self.pairing)
        inv = inverse_query_scale(
            self, "_inv_q", self.post_scale, self.num_heads, q.device, torch.float32
        )
        # (each token a batch row of one token: its own position's table row)
        qs = q_quantize(q[:, :, None], inv, cos[:, None], sin[:, None], self.pairing, self.q_fp8)
        out, _ = cache.attention_step(layer, qs[:, :, 0], step, scale=self.scale)
        return out.to(q.dtype)

    def forward_reference(self, q, k, v, cos, sin, cache: Int4KVStore | None = None):
        """The specification in plain PyTorch (same arguments and cache semantics)."""
        self._check(q, k, v, cos, sin, cache)
        post = self.post_scale.to(k.device)
        kq, ks = _kv_quantize_reference(k, post, self.group_size, cos, sin, self.pairing)
        vq, vs = _kv_quantize_reference(v, None, self.group_size)
        store = Int4KVStore() if cache is None else cache
        store.append(kq, ks, vq, vs)
        qs = self._queries(q, cos, sin)
        if q.shape[2] == 1:
            out, _ = _decode_reference(qs[:, :, 0], *store.buffers, store.length, self.scale)
            return out[:, :, None].to(q.dtype)
        out, _ = _attention_reference(qs, *store.buffers, store.length, self.scale)
        return out.to(q.dtype)
