# SPDX-License-Identifier: Apache-2.0
"""Sparse layer-skip attention reference: token routing, position-causal variable-length
attention, and the gather / gated scatter around it (Mixture-of-Depths, MindSkip).

Routing returns packed flat token indices (``b * T + t``), ascending within each sequence, and
``cu_seqlens`` (int32 ``[B + 1]``) without a host synchronisation: ``route_topk`` keeps
``k = ceil(capacity * T)`` tokens per sequence (static shapes); ``route_threshold`` keeps the tokens
scoring above ``tau`` in a buffer of static size ``B * T`` whose tail (past ``cu_seqlens[-1]``) is
``-1``.

``varlen_attention``: sequences packed along the first dimension (``cu_seqlens_q``,
``cu_seqlens_k``); query i of sequence b may see key j of the same sequence iff
``k_pos[j] <= q_pos[i]`` (causal, by **original positions**, not by index: FlashAttention's
bottom-right-aligned ``causal=True`` is wrong for gathered tokens) and, with a window
``(left, right)``, ``q_pos[i] - left <= k_pos[j] <= q_pos[i] + right`` (-1: unbounded). Scores and
softmax in fp32 (fp64 stays fp64); a row with no visible key gives zeros and ``lse = -inf``. GQA:
query head h reads key/value head ``h // (Hq / Hkv)``.
"""

from __future__ import annotations

import math

import torch


def _static_capacity(capacity, tokens: int) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, (int, float)):
        raise TypeError(f"capacity must be an int (tokens) or a float ratio, got {capacity!r}")
    if isinstance(capacity, float):
        if not 0.0 <= capacity <= 1.0:
            raise ValueError(f"capacity ratio must be in [0, 1], got {capacity}")
        return min(tokens, math.ceil(capacity * tokens - 1e-9))
    if not 0 <= capacity <= tokens:
        raise ValueError(f"capacity must be in [0, {tokens}] tokens, got {capacity}")
    return capacity


def route_topk(scores: torch.Tensor, capacity) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices int64 [B * k], cu_seqlens int32 [B + 1])``: the k best-scoring tokens of each
    sequence of ``scores [B, T]`` (``capacity``: k, or a ratio with ``k = ceil(ratio * T)``), as
    flat indices ``b * T + t`` ascending within each sequence. Ties keep the earlier token; NaN
    scores rank below every number."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [batch, tokens], got shape {tuple(scores.shape)}")
    b, t = scores.shape
    k = _static_capacity(capacity, t)
    s = scores.float().nan_to_num(nan=-math.inf)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    picked = order.sort(dim=1).values
    flat = picked + torch.arange(b, device=scores.device)[:, None] * t
    cu = torch.arange(b + 1, device=scores.device, dtype=torch.int32) * k
    return flat.reshape(-1), cu


def route_threshold(scores: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices int64 [B * T], cu_seqlens int32 [B + 1])``: the tokens with ``score > tau``,
    packed in order (flat indices ``b * T + t``); entries past ``cu_seqlens[-1]`` are -1."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [batch, tokens], got shape {tuple(scores.shape)}")
    b, t = scores.shape
    keep = (scores.float() > tau).reshape(-1)
    counts = keep.reshape(b, t).sum(1)
    cu = torch.zeros(b + 1, dtype=torch.int32, device=scores.device)
    cu[1:] = counts.cumsum(0)
    # Stable compaction without a host sync: kept tokens first (in order), then the rest.
    order = torch.sort((~keep).to(torch.int8), stable=True).indices
    slot = torch.arange(b * t, device=scores.device)
    indices = torch.where(slot < cu[-1], order, torch.full_like(order, -1))
    return indices, cu


def _window(window, causal: bool) -> tuple[int, int]:
    if window is None:
        left, right = -1, -1
    elif isinstance(window, int) and not isinstance(window, bool):
        left, right = window, window
    elif isinstance(window, (tuple, list)) and len(window) == 2:
        left, right = (int(w) for w in window)
    else:
        raise ValueError(f"window must be None, an int or (left, right), got {window!r}")
    if left < -1 or right < -1:
        raise ValueError(f"window sizes must be >= 0 or -1 (unbounded), got {window!r}")
    return left, 0 if causal else right


def allowed_mask(q_pos, k_pos, causal: bool, window) -> torch.Tensor:
    """``[nq, nk]`` bool: which keys each query of one sequence may see."""
    left, right = _window(window, causal)
    diff = q_pos[:, None].long() - k_pos[None, :].long()  # q_pos - k_pos
    ok = torch.ones_like(diff, dtype=torch.bool)
    if right >= 0:
        ok &= diff >= -right
    if left >= 0:
        ok &= diff <= left
    return ok


def attention_weights(s: torch.Tensor, visible: torch.Tensor, sinks=None) -> torch.Tensor:
    """The softmax weights of the scores ``s [..., T]`` over the ``visible`` keys (bool,
    broadcastable to ``s``), with ``sinks`` (None, or a logit per row broadcastable to
    ``s[..., :1]``) in the denominator: ``exp(s - m) / (sum + exp(sink - m))``, ``m`` the row's
    largest visible score. Normalized by the sum of the weights as computed, not through the lse:
    ``exp(s - lse)`` is off by the lse's rounding, ``ulp(|s|)`` relative (2e-3 at scores of 4e4 in
    fp32; two tied keys beyond 1e7 each got weight 1). A row with no visible key: zeros; a NaN or
    +inf score, or visible scores all -inf (from the data): NaN; an infinite sink: zeros."""
    s = s.masked_fill(~visible, -math.inf)
    if s.shape[-1] == 0:
        return s
    m = s.detach().amax(-1, keepdim=True)
    m = m.masked_fill(~visible.any(-1, keepdim=True), 0.0)  # (no visible key: weights exp(-inf))
    e = torch.exp(s - m)
    z = e.sum(-1, keepdim=True)
    if sinks is not None:
        z = z + torch.exp(sinks - m)
    return e / z.masked_fill(z == 0, 1.0)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool = True,
    window=None,
    scale: float | None = None,
    return_lse: bool = False,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
):
    """``out [Nq, Hq, dv]`` (and ``lse [Nq, Hq]`` fp32) of packed position-masked attention; see
    the module docstring; ``softcap`` > 0: Gemma 2's logit soft-capping of the scaled scores;
    ``sinks [Hq]``: a logit per query head in the softmax's denominator (GPT-OSS's attention
    sinks: a key of zero value every query sees; a row with no visible key gives zeros and
    ``lse = sink``). Differentiable w.r.t. q, k, v and the sinks."""
    nq, hq, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if cq[0] != 0 or ck[0] != 0:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must start at 0")
    for c, n, name in ((cq, nq, "q"), (ck, k.shape[0], "k")):  # (as the CPU kernel's check)
        if any(b < a for a, b in zip(c, c[1:], strict=False)) or c[-1] > n:
            raise ValueError(f"cu_seqlens_{name} must start at 0, not decrease and end at <= {n}, "
                             f"got {c}")  # fmt: skip
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0:
            continue
        qb = q[q0:q1].to(acc).transpose(0, 1)  # [hq, nq_b, d]
        kb = k[k0:k1].to(acc).repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
        vb = v[k0:k1].to(acc).repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
        s = (qb @ kb.transpose(-1, -2)) * scale  # [hq, nq_b, nk_b]
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        ok = allowed_mask(q_pos[q0:q1], k_pos[k0:k1], causal, window)
        s = s.masked_fill(~ok, -math.inf)
        lse_b = torch.logsumexp(s, dim=-1)  # -inf where nothing is visible
        sink = None if sinks is None else sinks.to(acc)[:, None, None]
        if sink is not None:  # the sink's logit joins the denominator (its value is zero)
            lse_b = torch.logaddexp(lse_b, sink[..., 0].expand_as(lse_b))
        # a row that sees no key gives zeros; non-finite scores propagate as NaN, as in SDPA (a
        # nan_to_num of lse turned NaN and +inf rows into zeros)
        p = attention_weights(s, ok, sink)
        outs.append((p @ vb).transpose(0, 1))
        lses.append(lse_b.transpose(0, 1))
    tail = nq - cq[-1]  # rows past the last sequence (routing padding): zeros, lse -inf
    outs.append(q.new_zeros((tail, hq, v.shape[-1]), dtype=acc))
    tail_lse = torch.full((tail, hq), -math.inf, dtype=acc, device=q.device)
    if sinks is not None:  # (no key: all weight on the sink)
        tail_lse = sinks.to(acc).expand(tail, hq)
    lses.append(tail_lse)
    out, lse = torch.cat(outs), torch.cat(lses)
    out = out.to(q.dtype)
    return (out, lse.float()) if return_lse else out


def _rows_in_range(indices: torch.Tensor, n: int) -> torch.Tensor:
    """Which ``indices`` pick a row of ``n`` (negative ones: routing padding). An index >= ``n``
    raises ValueError for CPU tensors (as the CPU kernels); on CUDA it is skipped, as the CUDA
    kernels do (a check would need the host)."""
    if indices.device.type == "cpu" and indices.numel() and bool((indices >= n).any()):
        raise ValueError("gather_rows / scatter_add_gated: an index is >= the number of rows")
    return (indices >= 0) & (indices < n)


def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x [N, D]`` rows at ``indices [M]``; a negative index (routing padding) gives a zero row
    (and on CUDA an index >= N; ValueError on CPU)."""
    valid = _rows_in_range(indices, x.shape[0])
    if x.shape[0] == 0:  # (nothing to read: every row is padding)
        return x.new_zeros((indices.shape[0], x.shape[1]))
    rows = x[torch.where(valid, indices, 0)]
    return torch.where(valid[:, None], rows, 0)  # (not a product: an inf in row 0 stays out)


def scatter_add_gated(
    residual: torch.Tensor, indices: torch.Tensor, out: torch.Tensor, gate: torch.Tensor | None
) -> torch.Tensor:
    """``residual`` with ``residual[indices] += gate[:, None] * out`` (a new tensor): each updated
    element is ``T(float(double(residual) + double(out) * double(gate)))`` (the product exact, so
    every backend gives the same bits); indices are unique, negative ones are skipped (a repeated
    row or one >= N raises ValueError for CPU tensors; CUDA does not check, which would need the
    host, and skips an index >= N)."""
    valid = _rows_in_range(indices, residual.shape[0])
    idx = indices[valid]
    if idx.device.type == "cpu" and idx.numel() > 1 and torch.unique(idx).numel() != idx.numel():
        raise ValueError("scatter_add_gated: indices must be unique (a row appears twice)")
    add = out[valid].double()  # exact products in float64, one rounding of the sum, then to fp32
    if gate is not None:
        add = add * gate[valid].float().double()[:, None]
    rows = (residual[idx].double() + add).float().to(residual.dtype)
    return residual.index_put((idx,), rows)
