# SPDX-License-Identifier: Apache-2.0
"""Fast feedforward (FFF) reference: tree routing, fp32 arithmetic (float64 inputs stay float64).

Trees are stored in heap order: root 0, node ``n`` has children ``2n+1`` (left) and ``2n+2``
(right). **Tie rule, every backend:** a token goes right iff the node's logit is ``> 0``; a logit
of exactly 0 goes left. (This is ``round(sigmoid(0)) = 0`` of the ``fastfeedforward`` hard training
path and the ``> 0`` of UltraFastBERT's training code; GELU(a) > 0 iff a > 0.)

UltraFastBERT form (``ultrafast_ff``): ``n = 2^(depth+1) - 1`` neurons, each a row of
``w_in [n, in]`` (with an optional bias ``b_in [n]``) and a row of ``w_out [n, out]``. A token
visits ``depth + 1`` neurons::

    node = 0
    for level in 0..depth:
        a = w_in[node] . x (+ b_in[node])
        y += act(a) * w_out[node]
        node = 2 * node + 1 + (a > 0)

Training uses the same hard path; gradients reach only the visited rows.

Classic FFF form (``fff_hard`` / ``fff_soft``): ``2^depth - 1`` node neurons ``node_w [N, in]``,
``node_b [N]`` and ``2^depth`` leaves, leaf ``j`` a feedforward
``act(x @ w1[j] + b1[j]) @ w2[j] + b2[j]`` with ``w1 [L, in, width]``, ``w2 [L, width, out]``.
``fff_hard`` descends to one leaf (inference); ``fff_soft`` mixes every leaf, weighted by the
product of the node probabilities ``p = sigmoid(logit)`` (right) and ``1 - p`` (left) along its path
(training).
"""

from __future__ import annotations

import math

import torch

# Activation names and the codes the kernels take (csrc/fff/fff.h, enum class Activation).
ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}


def _acc(t: torch.Tensor) -> torch.Tensor:
    """fp32 arithmetic; float64 inputs stay float64 (the tests' exact oracle)."""
    return t if t.dtype == torch.float64 else t.float()


def _gelu(a: torch.Tensor) -> torch.Tensor:
    """torch's erf GELU, except at +inf: torch's vectorized CPU kernel gives NaN there while its
    scalar path (tensors shorter than a vector), the formula ``0.5 a (1 + erf(a / sqrt 2))`` and
    every fastlayers kernel give +inf; without this the reference's value would depend on the
    tensor's length."""
    return torch.where(a == math.inf, a, torch.nn.functional.gelu(a))


def activation_fn(name: str):
    if name == "gelu":
        return _gelu
    if name == "gelu_tanh":
        return lambda a: torch.nn.functional.gelu(a, approximate="tanh")
    if name == "relu":
        return torch.relu
    if name == "silu":
        return torch.nn.functional.silu
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")


def tree_depth(n_nodes: int, what: str = "w_in") -> int:
    """``depth`` with ``n_nodes = 2^(depth+1) - 1``; ValueError otherwise."""
    levels = (n_nodes + 1).bit_length() - 1
    if n_nodes < 1 or (1 << levels) != n_nodes + 1:
        raise ValueError(f"{what} must have 2^(depth+1) - 1 rows (1, 3, 7, 15, ...), got {n_nodes}")
    return levels - 1


def ultrafast_ff(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None = None,
    activation: str = "gelu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UltraFastBERT tree feedforward. Returns ``(y, path, preact)``.

    ``y [..., out]`` in x's dtype; ``path [..., depth + 1]`` int32, the node visited at each level;
    ``preact [..., depth + 1]`` float32 (float64 for float64 input), ``a`` at each level.
    Differentiable (autograd of this function is the training reference).
    """
    act = activation_fn(activation)
    depth = tree_depth(w_in.shape[0])
    lead = x.shape[:-1]
    xf = _acc(x.reshape(-1, x.shape[-1]))
    wi, wo = _acc(w_in), _acc(w_out)
    bi = _acc(b_in) if b_in is not None else None
    node = torch.zeros(xf.shape[0], dtype=torch.long, device=x.device)
    y = xf.new_zeros(xf.shape[0], w_out.shape[1])
    path, pre = [], []
    for _ in range(depth + 1):
        a = (xf * wi[node]).sum(-1)
        if bi is not None:
            a = a + bi[node]
        y = y + act(a).unsqueeze(-1) * wo[node]
        path.append(node)
        pre.append(a)
        node = 2 * node + 1 + (a > 0).long()
    y = y.to(x.dtype).reshape(*lead, w_out.shape[1])
    path_t = torch.stack(path, -1).to(torch.int32).reshape(*lead, depth + 1)
    pre_t = torch.stack(pre, -1).reshape(*lead, depth + 1)
    return y, path_t, pre_t


def activation_grad(name: str, a: torch.Tensor) -> torch.Tensor:
    """d act / d a, the formulas of csrc/fff/activation.h (torch's for each activation)."""
    if name == "gelu":
        return 0.5 * (1 + torch.erf(a * 0.5**0.5)) + a * torch.exp(-0.5 * a * a) / math.sqrt(
            2 * math.pi
        )
    if name == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (a + 0.044715 * a**3))
        return 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * c * (1 + 3 * 0.044715 * a * a)
    if name == "relu":
        return (a > 0).to(a.dtype)
    if name == "silu":
        s = torch.sigmoid(a)
        return s * (1 + a * (1 - s))
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")


def ultrafast_ff_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    path: torch.Tensor,
    preact: torch.Tensor,
    activation: str = "gelu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dw_in, db_in, dw_out)`` of :func:`ultrafast_ff` along the saved hard path.

    ``c_l = act'(a_l) (dy . w_out[n_l])``; ``dx = sum_l c_l w_in[n_l]``; each visited row ``n`` gets
    ``dw_in[n] += c x``, ``db_in[n] += c``, ``dw_out[n] += act(a) dy``; rows never visited get 0.
    """
    d_in, d_out, nodes = x.shape[-1], w_out.shape[1], w_in.shape[0]
    xf = _acc(x.reshape(-1, d_in))
    dyf = _acc(grad_y.reshape(-1, d_out))
    n = path.reshape(xf.shape[0], path.shape[-1]).long()
    a = preact.reshape(n.shape).to(xf.dtype)
    wi, wo = _acc(w_in), _acc(w_out)
    c = activation_grad(activation, a) * (dyf.unsqueeze(1) * wo[n]).sum(-1)
    dx = (c.unsqueeze(-1) * wi[n]).sum(1)
    flat = n.reshape(-1)
    dw_in = xf.new_zeros(nodes, d_in).index_add_(
        0, flat, (c.unsqueeze(-1) * xf.unsqueeze(1)).reshape(-1, d_in)
    )
    db_in = xf.new_zeros(nodes).index_add_(0, flat, c.reshape(-1))
    act_a = activation_fn(activation)(a)
    dw_out = xf.new_zeros(nodes, d_out).index_add_(
        0, flat, (act_a.unsqueeze(-1) * dyf.unsqueeze(1)).reshape(-1, d_out)
    )
    return (
        dx.to(x.dtype).reshape(x.shape),
        dw_in.to(w_in.dtype),
        db_in.to(w_in.dtype),
        dw_out.to(w_out.dtype),
    )


def _leaf_ff(xf, w1, b1, w2, b2, leaf, act):
    """Per token: act(x @ w1[leaf] + b1[leaf]) @ w2[leaf] + b2[leaf]."""
    h = act(torch.einsum("ti,tik->tk", xf, w1[leaf]) + b1[leaf])
    return torch.einsum("tk,tko->to", h, w2[leaf]) + b2[leaf]


def fff_hard(
    x: torch.Tensor,
    node_w: torch.Tensor,
    node_b: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    activation: str = "gelu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classic FFF, hard descent (inference). Returns ``(y [..., out], leaf [...] int32)``."""
    act = activation_fn(activation)
    n_leaves = w1.shape[0]
    depth = n_leaves.bit_length() - 1
    lead = x.shape[:-1]
    xf = _acc(x.reshape(-1, x.shape[-1]))
    nw, nb = _acc(node_w), _acc(node_b)
    node = torch.zeros(xf.shape[0], dtype=torch.long, device=x.device)
    for _ in range(depth):
        logit = (xf * nw[node]).sum(-1) + nb[node]
        node = 2 * node + 1 + (logit > 0).long()
    leaf = node - (n_leaves - 1)
    y = _leaf_ff(xf, _acc(w1), _acc(b1), _acc(w2), _acc(b2), leaf, act)
    return y.to(x.dtype).reshape(*lead, w2.shape[2]), leaf.to(torch.int32).reshape(lead)


def leaf_mixture(node_p: torch.Tensor) -> torch.Tensor:
    """``[T, 2^depth]`` leaf weights from the ``[T, 2^depth - 1]`` right-probabilities (heap order):
    the product along each leaf's path of ``p`` (right) or ``1 - p`` (left)."""
    t = node_p.shape[0]
    mix = node_p.new_ones(t, 1)
    level_start = 0
    while mix.shape[1] <= node_p.shape[1]:
        width = mix.shape[1]
        p = node_p[:, level_start : level_start + width]
        mix = torch.stack((mix * (1 - p), mix * p), dim=-1).reshape(t, 2 * width)
        level_start += width
    return mix


def fff_soft(
    x: torch.Tensor,
    node_w: torch.Tensor,
    node_b: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    activation: str = "gelu",
    *,
    region_leak: float = 0.0,
    dropout: float = 0.0,
    hard: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classic FFF training form: every leaf, mixture-weighted. Returns ``(y, node_p, mixture)``.

    ``node_p [T, N]`` are the right-probabilities after region leak (each decision flipped,
    ``p -> 1 - p``, with probability ``region_leak``); ``mixture [T, L]`` the leaf weights. With
    ``hard=True`` each p is the decision ``logit > 0`` itself (the tie rule), which gives exactly
    ``fff_hard`` (rounding ``sigmoid`` instead would send logits below ~6e-8 left in fp32).
    ``dropout`` applies to the leaf hidden activations. Three GEMMs; never
    materialises ``[T, L, out]``.
    """
    act = activation_fn(activation)
    n_leaves, d_in, width = w1.shape
    lead = x.shape[:-1]
    xf = _acc(x.reshape(-1, d_in))
    wdt = xf.dtype
    t = xf.shape[0]
    if node_w.shape[0] > 0:
        logit = xf @ node_w.to(wdt).t() + node_b.to(wdt)
        p = (logit > 0).to(wdt) if hard else torch.sigmoid(logit)
        if region_leak > 0.0:
            u = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            p = torch.abs((u < region_leak).to(p.dtype) - p)
    else:
        p = xf.new_zeros(t, 0)
    mix = leaf_mixture(p)
    w1_all = w1.to(wdt).permute(1, 0, 2).reshape(d_in, n_leaves * width)
    h = act(xf @ w1_all + b1.to(wdt).reshape(-1))
    if dropout > 0.0:
        keep = torch.rand(h.shape, generator=generator, device=h.device, dtype=h.dtype) >= dropout
        h = h * keep / (1.0 - dropout)
    hm = (h.view(t, n_leaves, width) * mix.unsqueeze(-1)).reshape(t, n_leaves * width)
    y = hm @ w2.to(wdt).reshape(n_leaves * width, -1) + mix @ b2.to(wdt)
    return y.to(x.dtype).reshape(*lead, w2.shape[2]), p, mix


def hardening_loss(node_p: torch.Tensor) -> torch.Tensor:
    """Mean over nodes and tokens of the Bernoulli entropy of each decision (FFF paper; the
    ``fastfeedforward`` package clamps p to [1e-6, 1 - 1e-6] the same way)."""
    if node_p.numel() == 0:
        return node_p.new_zeros(())
    p = node_p.clamp(1e-6, 1 - 1e-6)
    q = (1 - node_p).clamp(1e-6, 1 - 1e-6)
    return (-p * torch.log(p) - q * torch.log(q)).mean()


def load_balancing_loss(mixture: torch.Tensor) -> torch.Tensor:
    """Switch-style balance over leaves: ``L * sum_j f_j * P_j`` with ``f_j`` the fraction of tokens
    whose heaviest leaf is ``j`` and ``P_j`` the mean mixture weight of leaf ``j``. It is 1 for a
    uniform routing and grows as routing concentrates; differentiable through ``P``."""
    n_leaves = mixture.shape[1]
    if mixture.shape[0] == 0:
        return mixture.new_zeros(())
    f = torch.bincount(mixture.argmax(-1), minlength=n_leaves).to(mixture.dtype)
    f = f / mixture.shape[0]
    return n_leaves * (f * mixture.mean(0)).sum()


def init_bound(fan_in: int) -> float:
    return 1.0 / math.sqrt(fan_in)
