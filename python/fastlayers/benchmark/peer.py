# SPDX-License-Identifier: Apache-2.0
"""PEER benchmark: ``fastlayers.PEER`` (converted from a ``PEER_pytorch.PEER`` with identical
weights, paper semantics: softmax over the top-k) against that package, the PyTorch reference
path, and dense feedforwards (the usual 4x-wide one and one with PEER's active parameter count),
in one run. Forward (no grad), forward+backward with dense table gradients, and with sparse ones.

GB/s counts the gathered expert bytes, the physical floor of the layer:
``tokens * heads * topk * 2 * dim * bytes`` read from tables that do not fit in cache; the fraction
is against ``dst.copy_(src)`` in the same run. Peak extra memory is measured over one call (CPU:
peak resident set, CUDA: the caching allocator's peak) for ours and for the baseline."""

from __future__ import annotations

import dataclasses

import torch

import fastlayers
from fastlayers import reference as ref
from fastlayers.benchmark.harness import (
    CopyCase,
    Row,
    backend_label,
    peak_extra_mib,
    time_interleaved,
)


@dataclasses.dataclass(frozen=True)
class Config:
    tokens: int
    dim: int
    num_experts: int
    heads: int
    topk: int
    dim_key_half: int  # PEER_pytorch's dim_key (per query half); ours is twice that

    def label(self) -> str:
        k = int(self.num_experts**0.5)
        return f"{self.tokens}x{self.dim} N={k}^2 h{self.heads} k{self.topk}"


# The configuration (and PEER_pytorch's measured one): 1024 tokens, dim 768, 512^2 experts.
FULL = {
    "cpu": Config(1024, 768, 512**2, 8, 16, 128),
    "cuda": Config(16384, 1024, 1024**2, 8, 16, 128),
}
QUICK = Config(256, 256, 64**2, 4, 8, 64)


def _reference_forward(m: fastlayers.PEER, x: torch.Tensor) -> torch.Tensor:
    q = m.query(x).reshape(*x.shape[:-1], m.heads, m.dim_key)
    idx, gates = ref.peer_retrieve(q, m.keys, m.topk, m.score)
    y, _ = ref.peer_experts(
        x, idx.flatten(-2), gates.flatten(-2), m.expert_down, m.expert_up, m.activation
    )
    return y


def _dense(width: int, dim: int, device) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(dim, width), torch.nn.GELU(), torch.nn.Linear(width, dim)
    ).to(device)


def _fwd_bwd(module: torch.nn.Module, sparse_grad: bool | None = None):
    """One training step's forward and backward; ``sparse_grad`` set on ``module`` for the step."""

    def step(x):
        for p in module.parameters():
            p.grad = None
        if sparse_grad is None:
            module(x).sum().backward()
            return
        saved, module.sparse_grad = module.sparse_grad, sparse_grad
        try:
            module(x).sum().backward()
        finally:
            module.sparse_grad = saved

    return step


def _max_err(m: fastlayers.PEER, x: torch.Tensor, y: torch.Tensor, rows: int = 64) -> float:
    """Ours against a float64 evaluation of the same experts (our selection) on the first rows."""
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    with torch.no_grad():
        idx, gates = m.retrieve(x[:rows])
        y64, _ = ref.peer_experts(
            x[:rows].double(), idx, gates.double(), m.expert_down, m.expert_up, m.activation
        )
    return (y[:rows].double() - y64).abs().max().item()


def _component_rows(m, x0, inputs, reps, slow_reps, row, copy_bw, device) -> list[Row]:
    """The forward's two kernels timed apart, each against the reference of that op on the same
    input: ``peer_retrieve`` on the projected queries (no GB/s: it reads the sub-keys, not the
    tables) and ``peer_experts`` on the retrieved indices and gates, whose GB/s on the gathered
    bytes is the issue's bandwidth figure for the expert lookup itself. What the forward takes
    beyond the two is the query projection (a dense GEMM) and the glue between them."""
    nan = float("nan")
    queries = [(m.query(x).reshape(*x.shape[:-1], m.heads, m.dim_key),) for (x,) in inputs]
    picked = [m.retrieve(x) for (x,) in inputs]
    experts_in = [
        (x, idx, g, m.expert_down, m.expert_up, m.activation)
        for (x,), (idx, g) in zip(inputs, picked, strict=True)
    ]

    def retrieve(q):
        return fastlayers.peer_retrieve(q, m.keys, m.topk, m.score)

    def retrieve_ref(q):
        return ref.peer_retrieve(q, m.keys, m.topk, m.score)

    t_ret, t_exp, t_ret_ref, t_exp_ref = time_interleaved(
        [
            (retrieve, queries, max(3, reps // 2)),
            (fastlayers.peer_experts, experts_in, max(3, reps // 2)),
            (retrieve_ref, queries, slow_reps),
            (ref.peer_experts, experts_in, slow_reps),
        ],
        device,
    )
    ref_ret = "PyTorch reference peer_retrieve"
    ref_exp = "PyTorch reference peer_experts"
    y = fastlayers.peer_experts(*experts_in[0])[0]
    err = _max_err(m, x0, y)
    return [
        row(
            "peer_retrieve (queries given)", t_ret, ref_ret, t_ret_ref, nan, nan, nan, copy_bw, nan
        ),
        row("peer_experts (indices given)", t_exp, ref_exp, t_exp_ref, err, nan, nan, copy_bw),
    ]


def run(device: torch.device, quick: bool = False, reps: int = 20) -> list[Row]:
    try:
        import PEER_pytorch
    except ImportError:
        PEER_pytorch = None
    cfg = QUICK if quick else FULL[device.type]
    torch.manual_seed(0)
    if PEER_pytorch is not None:
        pkg = PEER_pytorch.PEER(
            cfg.dim,
            heads=cfg.heads,
            num_experts=cfg.num_experts,
            num_experts_per_head=cfg.topk,
            dim_key=cfg.dim_key_half,
            non_competing_scores=False,
        ).to(device)
        ours = fastlayers.PEER.from_peer_pytorch(pkg)
    else:
        pkg = None
        ours = fastlayers.PEER(
            cfg.dim,
            cfg.num_experts,
            heads=cfg.heads,
            topk=cfg.topk,
            dim_key=2 * cfg.dim_key_half,
            query_norm="none",
            device=device,
        )
    ours.eval()
    backend = backend_label(device, "peer_retrieve")
    shape = cfg.label()
    gathered = cfg.tokens * cfg.heads * cfg.topk * 2 * cfg.dim * 4
    copy_ = CopyCase(min(gathered, 1 << 28), device)
    # [1, tokens, dim]: PEER_pytorch wants (batch, seq, dim)
    inputs = [(torch.randn(1, cfg.tokens, cfg.dim, device=device),) for _ in range(2)]
    x0 = inputs[0][0]
    # The quick configuration's calls take milliseconds: enough samples for a steady median; the
    # full one's baselines take seconds.
    slow_reps = max(5, reps // 4) if quick else max(2, reps // 8)
    pkg_reps = slow_reps if quick else max(2, reps // 10)
    rows: list[Row] = []

    def row(op, t_ours, name, t_base, err, mem_ours, mem_base, copy_bw, bytes_moved=gathered):
        gbps = bytes_moved / t_ours.median_s / 1e9
        return Row(
            op, shape, "float32", backend, t_ours.median_s * 1e6, name,
            t_base.median_s * 1e6, gbps, gbps * 1e9 / copy_bw, err, mem_ours, mem_base,
        )  # fmt: skip

    # Forward, no grad.
    with torch.no_grad():
        mem_ours = peak_extra_mib(ours, (x0,), device)
        err = _max_err(ours, x0, ours(x0))
        baselines = {"PyTorch reference path": lambda x: _reference_forward(ours, x)}
        if pkg is not None:
            baselines = {"peer-pytorch 0.2.2 (same weights)": pkg.eval(), **baselines}
        baselines[f"dense FFN {cfg.dim}->{4 * cfg.dim}->{cfg.dim}"] = _dense(
            4 * cfg.dim, cfg.dim, device
        )
        active = cfg.heads * cfg.topk
        baselines[f"dense FFN width {active} (PEER's active params)"] = _dense(
            active, cfg.dim, device
        )
        t_ours, *t_bases, t_copy = time_interleaved(
            [(ours, inputs, max(3, reps // 2))]
            + [(fn, inputs, slow_reps) for fn in baselines.values()]
            + [copy_.case(max(3, reps // 2))],
            device,
        )
        copy_bw = copy_.bandwidth(t_copy)
        for (name, fn), t_base in zip(baselines.items(), t_bases, strict=True):
            mem_base = peak_extra_mib(fn, (x0,), device)
            rows.append(row("PEER forward", t_ours, name, t_base, err, mem_ours, mem_base, copy_bw))
        rows += _component_rows(ours, x0, inputs, reps, slow_reps, row, copy_bw, device)

    # Forward + backward (training mode: the table gradients are dense unless sparse_grad).
    ours.train()
    dense_step, sparse_step = _fwd_bwd(ours, sparse_grad=False), _fwd_bwd(ours, sparse_grad=True)
    mem_ours = peak_extra_mib(dense_step, (x0,), device)
    mem_sparse = peak_extra_mib(sparse_step, (x0,), device)
    if pkg is not None:
        pkg.train()
        # ours takes a fraction of peer-pytorch's seconds: more samples for a steady median (on a
        # VM the fresh 1.5 GiB of dense table gradients fault in 0.3-1.5 s from call to call)
        own_reps = max(slow_reps, 5)
        t_ours, t_sparse, t_pkg, t_copy = time_interleaved(
            [
                (dense_step, inputs, own_reps),
                (sparse_step, inputs, own_reps),
                (_fwd_bwd(pkg), inputs, pkg_reps),
                copy_.case(slow_reps),
            ],
            device,
        )
        copy_bw = copy_.bandwidth(t_copy)
        mem_pkg = peak_extra_mib(_fwd_bwd(pkg), (x0,), device)
        name = "peer-pytorch 0.2.2 fwd+bwd (dense grads)"
        nan = float("nan")
        rows.append(
            row("PEER fwd+bwd", t_ours, name, t_pkg, nan, mem_ours, mem_pkg, copy_bw,
                2 * gathered)
        )  # fmt: skip
        rows.append(
            row("PEER fwd+bwd sparse_grad", t_sparse, name, t_pkg, nan, mem_sparse, mem_pkg,
                copy_bw, 2 * gathered)
        )  # fmt: skip
    for p in ours.parameters():
        p.grad = None
    return rows
