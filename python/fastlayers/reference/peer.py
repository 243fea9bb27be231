# SPDX-License-Identifier: Apache-2.0
"""PEER reference ("Mixture of A Million Experts"): product-key retrieval and single-neuron experts.

Retrieval, per token and head: the query ``q [dim_key]`` is split into halves ``q1, q2``; each half
is scored against its sub-key set ``keys[h, 0] / keys[h, 1]`` (``[K, dim_key/2]``, ``K = sqrt(N)``);
the top-k of each half give k x k candidates with score ``s1_i + s2_j`` and expert index
``i * K + j``; the top-k of those are the selected experts. (Top-k per half suffices: the best k
sums use only the best k of each half.) Scores are computed in fp32 (fp64 stays fp64) whatever
the input dtype; ties go to the lower candidate. Gates: ``softmax`` over the k selected scores, or
``relu`` of each, rounded to the queries' dtype.

Experts: expert ``e`` is a single neuron with an input row ``u_e = expert_down[e]`` and an output
row ``v_e = expert_up[e]``; a token's output is ``y = sum_h sum_i g_hi * act(u_e . x) * v_e``.
"""

from __future__ import annotations

import torch

from fastlayers.reference.fff import _acc, activation_fn, activation_grad

SCORES = ("softmax", "relu")


def peer_retrieve(
    queries: torch.Tensor, keys: torch.Tensor, topk: int, score: str = "softmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices [..., heads, topk] int64, gates [..., heads, topk])`` from ``queries [..., heads,
    dim_key]`` and ``keys [heads, 2, K, dim_key / 2]``. Differentiable w.r.t. queries and keys
    through the gates (indices are discrete). Ties keep the lower index (``torch.topk`` order)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    heads, _, n_keys, half = keys.shape
    q = queries.reshape(*queries.shape[:-1], 2, half)
    # [..., h, 2, K]: each half against its own sub-keys
    sim = torch.einsum("...hpd,hpkd->...hpk", _acc(q), _acc(keys))
    k_half = min(topk, n_keys)
    s, idx = sim.topk(k_half, dim=-1)  # [..., h, 2, k]
    cand = (s[..., 0, :, None] + s[..., 1, None, :]).flatten(-2)  # [..., h, k*k]
    cand_idx = (idx[..., 0, :, None] * n_keys + idx[..., 1, None, :]).flatten(-2)
    top_s, pos = cand.topk(topk, dim=-1)
    indices = cand_idx.gather(-1, pos)
    gates = torch.softmax(top_s, dim=-1) if score == "softmax" else torch.relu(top_s)
    return indices, gates.to(queries.dtype)


def peer_retrieve_backward(
    grad_gates: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    score: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_queries, d_keys)`` of :func:`peer_retrieve`. With ``ds`` the gradient of the selected
    scores (softmax: ``g (dg - sum g dg)``; relu: ``dg [g > 0]``) and expert ``e = i * K + j``, each
    selected pair adds ``ds`` to the half scores ``s1[i]`` and ``s2[j]``; the ``[..., heads, 2, K]``
    score gradient then flows through the two dot products (two batched GEMMs)."""
    heads, _, n_keys, half = keys.shape
    g, dg = _acc(gates), _acc(grad_gates)
    if score == "softmax":
        ds = g * (dg - (g * dg).sum(-1, keepdim=True))
    else:
        ds = dg * (g > 0)
    zeros = ds.new_zeros(*indices.shape[:-1], n_keys)
    dsim = torch.stack(
        [
            zeros.scatter_add(-1, torch.div(indices, n_keys, rounding_mode="floor"), ds),
            zeros.scatter_add(-1, torch.remainder(indices, n_keys), ds),
        ],
        dim=-2,
    )  # [..., heads, 2, K]
    q = _acc(queries).reshape(*queries.shape[:-1], 2, half)
    dq = torch.einsum("...hpk,hpkd->...hpd", dsim, _acc(keys)).reshape(queries.shape)
    dkeys = torch.einsum("...hpk,...hpd->hpkd", dsim, q)
    return dq.to(queries.dtype), dkeys.to(keys.dtype)


def peer_experts(
    x: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    expert_down: torch.Tensor,
    expert_up: torch.Tensor,
    activation: str = "gelu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [..., dim], preact [..., P] fp32)`` with ``P = heads * topk`` pairs per token:
    ``y = sum_p gates_p * act(expert_down[indices_p] . x) * expert_up[indices_p]``.

    ``indices``/``gates`` are ``[..., P]`` (heads and top-k flattened). Differentiable w.r.t. x,
    gates and both tables. Materialises ``[tokens, P, dim]``: the specification, not a fast path.
    """
    act = activation_fn(activation)
    lead, dim = x.shape[:-1], x.shape[-1]
    xf = _acc(x.reshape(-1, dim))
    idx = indices.reshape(xf.shape[0], indices.shape[-1])
    g = _acc(gates.reshape(idx.shape))
    u, v = _acc(expert_down)[idx], _acc(expert_up)[idx]  # [T, P, dim]
    s = (u * xf.unsqueeze(1)).sum(-1)
    y = ((act(s) * g).unsqueeze(-1) * v).sum(1)
    return y.to(x.dtype).reshape(*lead, dim), s.reshape(*lead, idx.shape[1])


def peer_experts_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    expert_down: torch.Tensor,
    expert_up: torch.Tensor,
    preact: torch.Tensor,
    activation: str = "gelu",
):
    """``(dx, dgates, d_expert_down, d_expert_up)``; with ``c_p = dy . v_p``:
    ``dgates_p = act(s_p) c_p``, ``dx = sum_p act'(s_p) g_p c_p u_p``, and each selected row gets
    ``du += act'(s) g c x``, ``dv += act(s) g dy`` (rows never selected get 0)."""
    dim, n = x.shape[-1], expert_down.shape[0]
    xf = _acc(x.reshape(-1, dim))
    dyf = _acc(grad_y.reshape(-1, dim))
    idx = indices.reshape(xf.shape[0], indices.shape[-1]).long()
    g = _acc(gates.reshape(idx.shape))
    s = preact.reshape(idx.shape).to(xf.dtype)
    u, v = _acc(expert_down)[idx], _acc(expert_up)[idx]
    c = (dyf.unsqueeze(1) * v).sum(-1)
    a = activation_fn(activation)(s)
    dg = a * c
    coef = activation_grad(activation, s) * g * c
    dx = (coef.unsqueeze(-1) * u).sum(1)
    flat = idx.reshape(-1)
    du = xf.new_zeros(n, dim).index_add_(
        0, flat, (coef.unsqueeze(-1) * xf.unsqueeze(1)).reshape(-1, dim)
    )
    dv = xf.new_zeros(n, dim).index_add_(
        0, flat, ((a * g).unsqueeze(-1) * dyf.unsqueeze(1)).reshape(-1, dim)
    )
    return (
        dx.to(x.dtype).reshape(x.shape),
        dg.to(gates.dtype).reshape(gates.shape),
        du.to(expert_down.dtype),
        dv.to(expert_up.dtype),
    )
