# SPDX-License-Identifier: Apache-2.0
"""``RoutedSelfAttention``: a Mixture-of-Depths attention block. A router picks the tokens (or,
MindSkip-style, the sequences) that go through attention; the others pass through unchanged."""

from __future__ import annotations

import torch

from fastlayers.nn.rmsnorm import RMSNorm
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

    ``forward(x [B, T, hidden], positions=None)``: positions default to ``arange(T)``. Returns
    ``y [B, T, hidden]``; ``self.last_routing`` holds the flat indices and ``cu_seqlens`` of the
    last call (for auxiliary router losses).
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
        num_kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if rope_theta is not None and head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
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

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"x must be [batch, tokens, {self.hidden_size}], got shape {tuple(x.shape)}"
            )
        b, t, _ = x.shape
        if positions is None:
            positions = torch.arange(t, device=x.device).expand(b, t)
        logits = self.router(x).squeeze(-1)  # [B, T]
        idx, cu = self._route(logits.detach())
        self.last_routing = (idx, cu)
        rows = idx.clamp_min(0)  # threshold padding (-1): computed on row 0, never written back
        flat = x.reshape(b * t, -1)
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
        o = varlen_attention(q, k, v, cu, cu, pos, pos, causal=True)
        out = self.o_proj(o.reshape(n, self.num_heads * self.head_dim))
        gate = torch.sigmoid(logits.reshape(-1)[rows])
        return scatter_add_gated(flat, idx, out, gate).view(b, t, -1)

    def extra_repr(self) -> str:
        route = f"capacity={self.capacity}"
        if self.threshold is not None:
            route = f"threshold={self.threshold}"
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, {route}, "
            f"granularity={self.granularity!r}"
        )
