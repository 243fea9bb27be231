# SPDX-License-Identifier: Apache-2.0
"""PEER ("Mixture of A Million Experts", He 2024): product-key retrieval over up to millions of
single-neuron experts, as a drop-in feedforward block ``[..., dim] -> [..., dim]``."""

from __future__ import annotations

import math

import torch

from fastlayers import ops
from fastlayers.ops._common import advise_hugepages, check_module_input
from fastlayers.ops.peer import peer_experts_retrieved
from fastlayers.reference.fff import ACTIVATIONS
from fastlayers.reference.peer import SCORES


class PEER(torch.nn.Module):
    """Parameter-efficient expert retrieval.

    * Query network ``query [heads * dim_key, dim]`` (no bias), then with ``query_norm="batchnorm"``
      a ``BatchNorm1d`` over the query features (the paper), or nothing (``"none"``).
    * Product keys ``keys [heads, 2, sqrt(num_experts), dim_key / 2]``. Per head, each query half is
      scored against its sub-keys, the top-k of each half combine into k x k candidates
      (``i * sqrt(N) + j``) and their top-k are the head's experts. ``score="softmax"`` (the paper)
      gates them with a softmax over the k scores, ``"relu"`` with ReLU per score.
    * Experts ``expert_down [N, dim]`` (u) and ``expert_up [N, dim]`` (v), one row per expert
      (``heads * N`` rows with ``separate_experts_per_head``).
      ``y = sum_h sum_i g_hi * act(u_e . x) * v_e``, computed by the fused ``peer_experts`` kernel,
      which never materialises ``[tokens, heads, topk, dim]``.
    * Gradients reach the query network, the keys (through the gates) and both tables. With
      ``sparse_grad=True`` the table gradients are sparse COO tensors over the selected rows, for
      ``torch.optim.SparseAdam`` on million-row tables.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        heads: int = 8,
        topk: int = 16,
        dim_key: int | None = None,
        activation: str = "gelu",
        query_norm: str = "batchnorm",
        score: str = "softmax",
        separate_experts_per_head: bool = False,
        sparse_grad: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, v in (
            ("dim", dim),
            ("num_experts", num_experts),
            ("heads", heads),
            ("topk", topk),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        n_keys = math.isqrt(num_experts)
        if n_keys * n_keys != num_experts:
            raise ValueError(f"num_experts must be a perfect square, got {num_experts}")
        if topk > num_experts:
            raise ValueError(f"topk ({topk}) must be <= num_experts ({num_experts})")
        dim_key = dim if dim_key is None else dim_key
        if not isinstance(dim_key, int) or dim_key <= 0 or dim_key % 2:
            raise ValueError(f"dim_key must be a positive even int, got {dim_key!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if query_norm not in ("batchnorm", "none"):
            raise ValueError(f"query_norm must be 'batchnorm' or 'none', got {query_norm!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.dim, self.num_experts, self.heads, self.topk = dim, num_experts, heads, topk
        self.dim_key, self.activation, self.score = dim_key, activation, score
        self.separate_experts_per_head, self.sparse_grad = separate_experts_per_head, sparse_grad
        kw = {"device": device, "dtype": dtype}
        self.query = torch.nn.Linear(dim, heads * dim_key, bias=False, **kw)
        self.query_norm = (
            torch.nn.BatchNorm1d(heads * dim_key, **kw) if query_norm == "batchnorm" else None
        )
        self.keys = torch.nn.Parameter(torch.empty(heads, 2, n_keys, dim_key // 2, **kw))
        rows = num_experts * (heads if separate_experts_per_head else 1)
        # Huge pages before the first touch: the tables are read by random row.
        self.expert_down = torch.nn.Parameter(advise_hugepages(torch.empty(rows, dim, **kw)))
        self.expert_up = torch.nn.Parameter(advise_hugepages(torch.empty(rows, dim, **kw)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keys N(0, 1/sqrt(dim_key/2)); ``expert_down`` N(0, 1/sqrt(dim)); ``expert_up``
        N(0, 1/sqrt(heads * topk)) so the sum over a token's experts starts at unit scale."""
        torch.nn.init.normal_(self.keys, std=(self.dim_key / 2) ** -0.5)
        torch.nn.init.normal_(self.expert_down, std=self.dim**-0.5)
        torch.nn.init.normal_(self.expert_up, std=(self.heads * self.topk) ** -0.5)
        self.query.reset_parameters()

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices [..., heads * topk] int64, gates [..., heads * topk])`` for ``x [..., dim]``:
        rows of the expert tables (head offsets included) and their gates."""
        check_module_input(x, self.dim, self.query.weight, "[..., {}] (dim)")
        lead = x.shape[:-1]
        q = self.query(x)
        if self.query_norm is not None:
            q = self.query_norm(q.reshape(-1, q.shape[-1])).reshape(q.shape)
        # (under autocast the projection returns its dtype: the retrieval runs in the keys')
        q = q.reshape(*lead, self.heads, self.dim_key).to(self.keys.dtype)
        indices, gates = ops.peer_retrieve(q, self.keys, self.topk, self.score)
        if self.separate_experts_per_head:
            offsets = torch.arange(self.heads, device=x.device) * self.num_experts
            indices = indices + offsets.unsqueeze(-1)
        k = self.heads * self.topk  # (explicit: lead may hold a 0)
        return indices.reshape(*lead, k), gates.reshape(*lead, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices, gates = self.retrieve(x)
        if x.dtype != self.expert_down.dtype and torch.is_autocast_enabled(x.device.type):
            x = x.to(self.expert_down.dtype)  # the experts run in the tables' dtype
        return peer_experts_retrieved(
            x, indices, gates, self.expert_down, self.expert_up, self.activation, self.sparse_grad
        )[0]

    @torch.no_grad()
    def expert_usage(self, x: torch.Tensor) -> int:
        """How many distinct experts (table rows) the tokens of ``x`` select."""
        return int(torch.unique(self.retrieve(x)[0]).numel())

    @classmethod
    def from_peer_pytorch(cls, m) -> PEER:
        """Exact conversion of a ``PEER_pytorch.PEER`` (0.2.x), in both score modes: the default
        ``non_competing_scores=True`` (top-1 per head, ReLU gate) becomes ``topk=1, score="relu"``;
        ``False`` (the paper) becomes ``score="softmax"`` over its top-k."""
        if not isinstance(m.norm, torch.nn.Identity):
            raise ValueError("PEER_pytorch.PEER(pre_rmsnorm=True) is not supported")
        if m.dropout.p > 0:
            raise ValueError("PEER_pytorch.PEER with dropout > 0 is not supported")
        act = m.activation
        if isinstance(act, torch.nn.GELU):
            activation = "gelu_tanh" if act.approximate == "tanh" else "gelu"
        elif isinstance(act, torch.nn.ReLU):
            activation = "relu"
        elif isinstance(act, torch.nn.SiLU):
            activation = "silu"
        else:
            raise ValueError(f"activation {type(act).__name__} is not supported")
        score = "relu" if isinstance(m.score_activation, torch.nn.ReLU) else "softmax"
        heads, n_keys, _, half = m.keys.shape
        w = m.weight_down_embed.weight
        out = cls(
            w.shape[1],
            m.num_experts,
            heads=heads,
            topk=m.num_experts_per_head_topk,
            dim_key=2 * half,
            activation=activation,
            query_norm="none",
            score=score,
            separate_experts_per_head=m.separate_embed_per_head,
            device=w.device,
            dtype=w.dtype,
        )
        q = m.to_queries[0].weight  # [(p h d), dim] -> ours [(h p d), dim]
        with torch.no_grad():
            out.query.weight.copy_(
                q.reshape(2, heads, half, -1).permute(1, 0, 2, 3).reshape(heads * 2 * half, -1)
            )
            out.keys.copy_(m.keys.permute(0, 2, 1, 3))
            out.expert_down.copy_(m.weight_down_embed.weight)
            out.expert_up.copy_(m.weight_up_embed.weight)
        return out.train(m.training)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, heads={self.heads}, "
            f"topk={self.topk}, dim_key={self.dim_key}, activation={self.activation!r}, "
            f"score={self.score!r}, separate_experts_per_head={self.separate_experts_per_head}"
        )
