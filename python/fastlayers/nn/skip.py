# SPDX-License-Identifier: Apache-2.0
"""``RoutedSelfAttention``: a Mixture-of-Depths attention block. A router picks the tokens (or,
MindSkip-style, the sequences) that go through attention; the others pass through unchanged."""

from __future__ import annotations

import math

import torch

from fastlayers.nn.rmsnorm import RMSNorm
from fastlayers.ops._common import check_module_input, check_positive_ints
from fastlayers.ops.skip import route_threshold, route_topk, scatter_add_gated, varlen_attention

GRANULARITIES = ("token", "sequence")


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (Llama's rotate-half form) at the tokens' original positions."""
    half = x.shape[-1] // 2
    inv = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = pos.float()[:, None] * inv[None, :]  # [n, half]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class RoutedKVStore:
    """The keys and values of one attention layer's *routed* tokens, per sequence, with their
    original positions (RoPE already applied at those positions): what a Mixture-of-Depths layer
    caches for decoding. Rows hold different numbers of tokens; positions increase within a row.

    ``merged(k, v, pos, counts)`` returns the packed ``(keys, values, positions, cu_seqlens)``
    of the cached tokens followed, row by row, by new ones (``k [n, H_kv, d]`` packed by row,
    ``counts`` per row), and the per-row tensors that ``store`` keeps. ``crop_to(length)`` drops
    the tokens at positions ``>= length`` (speculative rollback), ``drop_from(first)`` those at
    positions ``>= first[b]`` per row, ``reorder`` selects rows."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] | None = None  # per row [n_b, H_kv, d]
        self.values: list[torch.Tensor] | None = None
        self.positions: list[torch.Tensor] | None = None  # per row [n_b] int64

    def _rows(self, k, v, pos, counts: list[int]):
        return k.split(counts), v.split(counts), pos.split(counts)

    def merged(self, k, v, pos, counts: list[int]):
        nk, nv, npos = self._rows(k, v, pos, counts)
        if self.keys is not None and len(self.keys) != len(counts):
            raise ValueError(f"the cache holds {len(self.keys)} rows, the call has {len(counts)}")
        keys, values, positions, sizes = [], [], [], []
        for b in range(len(counts)):
            old = self.keys is not None
            keys.append(torch.cat([self.keys[b], nk[b]]) if old else nk[b])
            values.append(torch.cat([self.values[b], nv[b]]) if old else nv[b])
            positions.append(torch.cat([self.positions[b], npos[b]]) if old else npos[b])
            sizes.append(keys[-1].shape[0])
        cu = torch.zeros(len(counts) + 1, dtype=torch.int32, device=k.device)
        cu[1:] = torch.tensor(sizes, device=k.device).cumsum(0)
        return (
            torch.cat(keys),
            torch.cat(values),
            torch.cat(positions),
            cu,
            (keys, values, positions),
        )

    def store(self, rows) -> None:
        """Keeps the per-row tensors :meth:`merged` returned last (its fifth item)."""
        self.keys, self.values, self.positions = (list(r) for r in rows)

    def lengths(self) -> list[int]:
        return [] if self.keys is None else [int(k.shape[0]) for k in self.keys]

    def crop_to(self, length: int) -> None:
        if self.keys is None:
            return
        for b, pos in enumerate(self.positions):
            keep = int((pos < length).sum())  # positions increase within a row
            self.keys[b], self.values[b] = self.keys[b][:keep], self.values[b][:keep]
            self.positions[b] = pos[:keep]

    def drop_from(self, first: torch.Tensor) -> None:
        """Drops, per row ``b``, the tokens at positions ``>= first[b]``: a call whose tokens
        start there continues a sequence that was rolled back (a Hugging Face cache cropped by
        assisted or speculative generation, which does not know this store). One host
        synchronisation when nothing is stale."""
        if self.keys is None or not self.positions:
            return
        none = first.new_full((), -1)
        last = torch.stack([p[-1] if p.numel() else none for p in self.positions])
        stale = (last >= first.to(last.device)).tolist()
        for b, is_stale in enumerate(stale):
            if is_stale:
                keep = int((self.positions[b] < first[b]).sum())  # positions increase in a row
                self.keys[b], self.values[b] = self.keys[b][:keep], self.values[b][:keep]
                self.positions[b] = self.positions[b][:keep]

    def reorder(self, batch_index: torch.Tensor) -> None:
        if self.keys is not None:
            order = [int(i) for i in batch_index.tolist()]
            self.keys = [self.keys[i] for i in order]
            self.values = [self.values[i] for i in order]
            self.positions = [self.positions[i] for i in order]


def routed_attention_step(
    q, k, v, pos, idx, cu, store: RoutedKVStore | None, scale=None, sliding_window=None,
    softcap=None, sinks=None,
):  # fmt: skip
    """Attention of the routed tokens of one call, packed by row (``q [n, H, d]``, ``k``/``v``
    ``[n, H_kv, d]`` after RoPE, ``pos [n]``; ``idx``/``cu`` from the routing, ``-1`` padding
    allowed after ``cu[-1]``), against the ``store``'s earlier routed tokens of the same rows and
    each other, causally by position and, with a ``sliding_window`` (Hugging Face's rule), only
    keys less than that many positions back, with ``softcap`` the scores soft-capped (Gemma 2),
    with ``sinks [H]`` a logit per head in the softmax's denominator (GPT-OSS).
    Stores the new keys. Returns ``o [n, H, dv]`` (padding rows: zeros; ``dv``: the values'
    head size, multi-head latent attention's differs from the keys')."""
    counts = (cu[1:] - cu[:-1]).tolist()
    used = int(cu[-1])
    if store is None:
        store = RoutedKVStore()
    keys, values, k_pos, cu_k, rows = store.merged(k[:used], v[:used], pos[:used], counts)
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])  # (multi-head latent attention: dv != d)
    if used:
        out[:used] = varlen_attention(
            q[:used], keys, values, cu, cu_k, pos[:used], k_pos, causal=True, scale=scale,
            window=None if sliding_window is None else (sliding_window - 1, 0), softcap=softcap,
            sinks=sinks,
        )  # fmt: skip
    store.store(rows)
    return out


class RoutedSelfAttention(torch.nn.Module):
    """Mixture-of-Depths self-attention with its residual: ``y = x`` for tokens the router skips,
    ``y = x + g * o_proj(attn(norm(x)))`` for the tokens it keeps, where the kept tokens attend
    only among the kept tokens of their sequence, causally by **original** position (RoPE also at
    the original positions), and ``g = sigmoid(router(x))`` so the router trains through the
    output.

    Parameters
    ----------
    hidden_size, num_heads : int
    num_kv_heads : int, optional
        Grouped-query attention (default: num_heads).
    head_dim : int, optional
        Default ``hidden_size // num_heads`` (even, for RoPE).
    capacity : float or int
        Tokens kept per sequence: a ratio (``ceil(capacity * T)``) or a count. Ignored when
        ``threshold`` is set.
    threshold : float, optional
        Keep the tokens (or sequences) whose router logit exceeds it instead (variable counts,
        still no host synchronisation in the routing itself).
    granularity : "token" or "sequence"
        Route tokens (Mixture-of-Depths) or whole sequences by their mean router logit (MindSkip).
    rope_theta : float or None
        RoPE base; None disables RoPE.
    pre_norm : bool
        An RMSNorm on the routed rows before the projections (the decoder layer's input norm).

    ``forward(x [B, T, hidden], positions=None, cache=None)``: positions default to
    ``arange(T)``. Returns ``y [B, T, hidden]``; ``self.last_routing`` holds the flat indices and
    ``cu_seqlens`` of the last call (for auxiliary router losses). With a :class:`RoutedKVStore`
    as ``cache`` (threshold routing only: it is causal), the routed tokens also attend to the
    earlier calls' routed tokens and are stored for the next call: prefill, then decode token by
    token, gives the same outputs as one call over the whole sequence.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        capacity: float | int = 0.125,
        threshold: float | None = None,
        granularity: str = "token",
        rope_theta: float | None = 10000.0,
        pre_norm: bool = True,
        bias: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_ints(hidden_size=hidden_size, num_heads=num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        check_positive_ints(num_kv_heads=num_kv_heads, head_dim=head_dim)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if rope_theta is not None and head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if threshold is None:  # (route_topk: a float is a ratio of the tokens, an int a count)
            ratio = isinstance(capacity, float) and 0.0 <= capacity <= 1.0
            count = isinstance(capacity, int) and not isinstance(capacity, bool) and capacity >= 0
            if not (ratio or count):
                raise ValueError(
                    f"capacity must be a ratio in [0, 1] (float) or a token count >= 0 (int), "
                    f"got {capacity!r}"
                )
        elif not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.capacity, self.threshold = head_dim, capacity, threshold
        self.granularity, self.rope_theta = granularity, rope_theta
        kw = dict(device=device, dtype=dtype)
        self.router = torch.nn.Linear(hidden_size, 1, bias=True, **kw)
        self.norm = RMSNorm(hidden_size, **kw) if pre_norm else None
        self.q_proj = torch.nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **kw)
        self.k_proj = torch.nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **kw)
        self.v_proj = torch.nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **kw)
        self.o_proj = torch.nn.Linear(num_heads * head_dim, hidden_size, bias=bias, **kw)
        self.last_routing = None

    def _route(self, logits: torch.Tensor):
        """Flat indices (``-1`` padding with a threshold) and cu_seqlens of the routed tokens."""
        b, t = logits.shape
        if self.granularity == "token":
            if self.threshold is not None:
                return route_threshold(logits, self.threshold)
            return route_topk(logits, self.capacity)
        seq = logits.float().mean(1, keepdim=True).t()  # [1, B]: one score per sequence
        if self.threshold is not None:
            chosen, _ = route_threshold(seq, self.threshold)
        else:
            chosen, _ = route_topk(seq, self.capacity)
        keep = torch.zeros(b, dtype=torch.bool, device=logits.device)
        keep[chosen[chosen >= 0]] = True
        counts = keep.to(torch.int32) * t
        cu = torch.zeros(b + 1, dtype=torch.int32, device=logits.device)
        cu[1:] = counts.cumsum(0)
        flat = torch.arange(b * t, device=logits.device).reshape(b, t)
        order = torch.sort((~keep).to(torch.int8), stable=True).indices  # kept sequences first
        idx = flat[order].reshape(-1)
        idx = torch.where(torch.arange(b * t, device=logits.device) < cu[-1], idx, -1)
        return idx, cu

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: RoutedKVStore | None = None,
    ) -> torch.Tensor:
        check_module_input(x, self.hidden_size, self.router.weight, "[batch, tokens, {}]", dims=3)
        if cache is not None and (self.threshold is None or self.granularity != "token"):
            raise ValueError(
                "a cache needs causal routing: token granularity with a threshold (capacity "
                "routing picks the top tokens of the whole sequence, which decoding cannot know)"
            )
        if cache is not None and not isinstance(cache, RoutedKVStore):
            raise TypeError(f"cache must be a RoutedKVStore, got {type(cache).__name__}")
        b, t, _ = x.shape
        if positions is None:
            positions = torch.arange(t, device=x.device).expand(b, t)
        logits = self.router(x).squeeze(-1)  # [B, T]
        idx, cu = self._route(logits.detach())
        self.last_routing = (idx, cu)
        rows = idx.clamp_min(0)  # threshold padding (-1): computed on row 0, never written back
        flat = x.reshape(b * t, self.hidden_size)  # (explicit: b * t may be 0)
        h = flat[rows]
        if self.norm is not None:
            h = self.norm(h)
        pos = positions.reshape(-1)[rows]
        n = rows.shape[0]
        q = self.q_proj(h).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(h).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(h).view(n, self.num_kv_heads, self.head_dim)
        if self.rope_theta is not None:
            q, k = _rope(q, pos, self.rope_theta), _rope(k, pos, self.rope_theta)
        if cache is None:
            o = varlen_attention(q, k, v, cu, cu, pos, pos, causal=True)
        else:  # earlier routed tokens from the cache; this call's routed keys go into it
            o = routed_attention_step(q, k, v, pos, idx, cu, cache)
        out = self.o_proj(o.reshape(n, self.num_heads * self.head_dim))
        gate = torch.sigmoid(logits.reshape(-1)[rows])
        # (under autocast the projections return its dtype: added to the residual in x's)
        out, gate = out.to(flat.dtype), gate.to(flat.dtype)
        return scatter_add_gated(flat, idx, out, gate).view(b, t, self.hidden_size)

    def extra_repr(self) -> str:
        route = f"capacity={self.capacity}"
        if self.threshold is not None:
            route = f"threshold={self.threshold}"
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, {route}, "
            f"granularity={self.granularity!r}"
        )
