# SPDX-License-Identifier: Apache-2.0
"""PEER ops: ``peer_retrieve`` (product-key top-k and gates) and ``peer_experts`` (gather, gate,
reduce), each with its backward.

Semantics: :mod:`fastlayers.reference.peer`. The backward returns the table gradients either as
full ``[num_experts, dim]`` tables (``dense=True``: the kernel writes every row once, zeros
included, so no separate memset pass; the expert list it returns is empty, so that no output shape
depends on the data and ``torch.compile`` traces a training step whole) or as compact
``[unique, dim]`` rows of the selected experts (``expert_ids``, ascending, returned) that autograd
wraps in a sparse COO gradient (``sparse_grad=True``, for ``torch.optim.SparseAdam`` on
million-row tables).
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fastlayers import _dtypes, _ext
from fastlayers import reference as ref
from fastlayers.ops._common import (
    LIB,
    check_activation,
    check_index_range,
    check_tensor,
    check_tensors,
    device_code,
    device_guard,
    direct_call_ok,
    empty,
    has_kernel,
    on_cpu,
    on_cuda,
    own_outputs,
    ptr,
    register_no_backward,
    row_stride,
    rows_view,
    stream_of,
    tensor_version,
)
from fastlayers.reference.fff import ACTIVATIONS
from fastlayers.reference.peer import SCORES
from fastlayers.reference.peer import peer_experts_backward as _ref_backward

LIB.define("peer_retrieve(Tensor queries, Tensor keys, int topk, str score) -> (Tensor, Tensor)")

LIB.define(
    "peer_experts(Tensor x, Tensor indices, Tensor gates, Tensor expert_down, Tensor expert_up,"
    " str activation, bool sparse_grad) -> (Tensor, Tensor)"
)
LIB.define(
    "peer_experts_backward(Tensor grad_y, Tensor x, Tensor indices, Tensor gates,"
    " Tensor expert_down, Tensor expert_up, Tensor preact, str activation, bool dense)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
register_no_backward("peer_experts_backward")


def _check_retrieve(queries, keys, topk, score) -> None:
    check_activation(queries, "queries")
    check_tensor(keys, "keys")
    if keys.dim() != 4 or keys.shape[1] != 2 or 0 in keys.shape:
        raise ValueError(
            f"keys must have shape (heads, 2, num_keys, dim_key // 2), got {tuple(keys.shape)}"
        )
    heads, _, n_keys, half = keys.shape
    if queries.dim() < 2 or tuple(queries.shape[-2:]) != (heads, 2 * half):
        raise ValueError(
            f"queries must have shape (..., heads={heads}, dim_key={2 * half}) to match keys, "
            f"got {tuple(queries.shape)}"
        )
    if keys.dtype != queries.dtype:
        raise TypeError(f"keys must have queries' dtype {queries.dtype}, got {keys.dtype}")
    if keys.device != queries.device:
        raise ValueError(f"keys is on {keys.device} but queries is on {queries.device}")
    if not isinstance(topk, int) or isinstance(topk, bool) or not 0 < topk <= n_keys * n_keys:
        raise ValueError(
            f"topk must be an int in [1, num_keys^2 = {n_keys * n_keys}], got {topk!r}"
        )
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def _retrieve_on_kernel(queries, heads, dim_key, n_keys, padded, topk) -> bool:
    """CPU always (with _C); CUDA when this build has the kernel and one token's score tile fits
    its shared memory (else the reference, warned once)."""
    device = queries.device
    if device.type not in ("cpu", "cuda") or not has_kernel(device, "peer_retrieve"):
        return False
    if on_cuda(device):
        tokens = queries.numel() // (heads * dim_key)
        if not _ext.C.peer_retrieve_cuda_supported(tokens, heads, dim_key, n_keys, padded, topk):
            _ext.warn_once(
                "peer_retrieve-cuda-size",
                f"fastlayers.peer_retrieve: {n_keys} sub-keys, dim_key {dim_key}, topk {topk} "
                "exceed the CUDA kernel's shared memory; running the PyTorch reference",
            )
            return False
    return True


# The sub-keys' panel layout, per keys tensor (weakly held: it goes with the tensor).
_PANELS = WeakIdKeyDictionary()


def _key_panels(keys: torch.Tensor, tile: int, padded: int) -> torch.Tensor:
    """The sub-keys as fp32 panels ``[heads, 2, padded / tile, half, tile]``: the kernel's lanes run
    over keys and each panel is one contiguous read. Built once per keys tensor, address and
    version (a decode step would otherwise copy the whole key table: 2 MiB at 512 sub-keys, 8
    heads, 128-d keys, more than the step's own work); rebuilt after an optimizer step or any
    other in-place change (not one made through ``.data``, which bypasses the version counter as
    it bypasses autograd), never kept for an inference tensor (no version counter)."""
    heads, _, n_keys, half = keys.shape
    version = tensor_version(keys)
    key = (keys.data_ptr(), version, keys.dtype, keys.shape, keys.device, tile)
    hit = _PANELS.get(keys)
    if hit is not None and hit[0] == key and version is not None:
        return hit[1]
    panels = (
        torch.nn.functional.pad(keys.detach().float(), (0, 0, 0, padded - n_keys))
        .reshape(heads, 2, padded // tile, tile, half)
        .transpose(-1, -2)
        .contiguous()
    )
    if version is not None:  # (an inference tensor has no version: not cached)
        _PANELS[keys] = (key, panels)
    return panels


def _peer_retrieve_kernel(queries, keys, topk, score):
    _check_retrieve(queries, keys, topk, score)
    heads, _, n_keys, half = keys.shape
    tile = _ext.C.peer_retrieve_key_tile() if _ext.C is not None else 32
    padded = -(-n_keys // tile) * tile
    if not _retrieve_on_kernel(queries, heads, 2 * half, n_keys, padded, topk):
        return ref.peer_retrieve(queries, keys, topk, score)
    keys_t = _key_panels(keys, tile, padded)
    q = queries.contiguous()
    indices = empty((*queries.shape[:-1], topk), torch.int64, queries.device)
    gates = empty((*queries.shape[:-1], topk), queries.dtype, queries.device)
    tokens = q.numel() // (heads * 2 * half)
    if tokens > 0:
        with device_guard(q.device):
            _ext.C.peer_retrieve(
                device_code(q.device), ptr(q), ptr(keys_t), ptr(indices), ptr(gates), tokens,
                heads, 2 * half, n_keys, padded, topk, score == "relu", _dtypes.code(q.dtype),
                stream_of(q.device),
            )  # fmt: skip
    return indices, gates


def _peer_retrieve_reference(queries, keys, topk, score):
    _check_retrieve(queries, keys, topk, score)
    return ref.peer_retrieve(queries, keys, topk, score)


LIB.impl("peer_retrieve", _peer_retrieve_kernel, "CPU")
LIB.impl("peer_retrieve", _peer_retrieve_kernel, "CUDA")
LIB.impl("peer_retrieve", _peer_retrieve_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("fastlayers::peer_retrieve", lib=LIB)
def _peer_retrieve_fake(queries, keys, topk, score):
    _check_retrieve(queries, keys, topk, score)
    shape = (*queries.shape[:-1], topk)
    return queries.new_empty(shape, dtype=torch.int64), queries.new_empty(shape)


def _retrieve_setup(ctx, inputs, output):
    queries, keys, topk, score = inputs
    ctx.save_for_backward(queries, keys, *output)
    ctx.score = score


def _retrieve_backward(ctx, grad_indices, grad_gates):
    queries, keys, indices, gates = ctx.saved_tensors
    if grad_gates is None:
        return None, None, None, None
    dq, dkeys = ref.peer_retrieve_backward(grad_gates, queries, keys, indices, gates, ctx.score)
    need = ctx.needs_input_grad
    return dq if need[0] else None, dkeys if need[1] else None, None, None


torch.library.register_autograd(
    "fastlayers::peer_retrieve", _retrieve_backward, setup_context=_retrieve_setup, lib=LIB
)


def peer_retrieve(
    queries: torch.Tensor, keys: torch.Tensor, topk: int, score: str = "softmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Product-key retrieval: ``(indices [..., heads, topk] int64, gates [..., heads, topk])`` for
    ``queries [..., heads, dim_key]`` and sub-keys ``keys [heads, 2, K, dim_key // 2]`` (expert
    ``i * K + j``). Per (token, head), one fused pass on CPU: sub-key scores for a block of
    tokens, the top-k of each half, the merge of the k x k sums and the gates; nothing of size
    ``[tokens, heads, K]`` is stored. Differentiable w.r.t. queries and keys through the gates.
    Semantics: :func:`fastlayers.reference.peer_retrieve`."""
    check_tensors(queries=queries, keys=keys)
    if direct_call_ok(queries, keys):
        return _peer_retrieve_kernel(queries, keys, topk, score)
    _check_retrieve(queries, keys, topk, score)  # (before the op's schema: RuntimeError there)
    return torch.ops.fastlayers.peer_retrieve(queries, keys, topk, score)


def _check(x, indices, gates, expert_down, expert_up, activation, check_range=True) -> None:
    check_activation(x, "x")
    for t, name in ((indices, "indices"), (gates, "gates"), (expert_down, "expert_down")):
        check_tensor(t, name)
    check_tensor(expert_up, "expert_up")
    dim = x.shape[-1]
    for t, name in ((expert_down, "expert_down"), (expert_up, "expert_up")):
        if t.dim() != 2 or t.shape[1] != dim or t.shape[0] == 0:
            raise ValueError(f"{name} must have shape (num_experts, {dim}), got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if expert_up.shape != expert_down.shape:
        raise ValueError("expert_down and expert_up must have the same shape")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    if indices.dim() < 1 or tuple(indices.shape[:-1]) != tuple(x.shape[:-1]):
        raise ValueError(
            f"indices must have shape {(*x.shape[:-1], 'pairs')}, got {tuple(indices.shape)}"
        )
    if indices.shape[-1] == 0:
        raise ValueError("indices has 0 pairs per token")
    if gates.shape != indices.shape or gates.dtype != x.dtype or gates.device != x.device:
        raise ValueError(
            f"gates must be {x.dtype} of indices' shape {tuple(indices.shape)} on {x.device}, "
            f"got {gates.dtype} {tuple(gates.shape)} on {gates.device}"
        )
    if indices.device != x.device:
        raise ValueError(f"indices is on {indices.device} but x is on {x.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if check_range:
        n = expert_down.shape[0]
        check_index_range(indices, "indices", 0, n - 1, f"[0, {n}) (num_experts)")


def _use_kernel(x: torch.Tensor, pairs: int, op: str) -> bool:
    """CPU always (with _C); CUDA when this build has the kernels and the token's row and pairs fit
    the kernel's shared memory (else the reference, warned once)."""
    if x.device.type not in ("cpu", "cuda") or not has_kernel(x.device, op):
        return False
    if on_cuda(x.device):
        tokens = x.numel() // x.shape[-1]
        if not _ext.C.peer_experts_cuda_supported(tokens, x.shape[-1], pairs):
            _ext.warn_once(
                f"{op}-cuda-size",
                f"fastlayers.{op}: dim {x.shape[-1]} with {pairs} pairs per token exceeds the CUDA "
                "kernel's shared memory; running the PyTorch reference",
            )
            return False
    return True


def _peer_experts_kernel(x, indices, gates, expert_down, expert_up, activation, sparse_grad,
                         check_range=True):  # fmt: skip
    _check(x, indices, gates, expert_down, expert_up, activation, check_range)
    if not _use_kernel(x, indices.shape[-1], "peer_experts"):
        return ref.peer_experts(x, indices, gates, expert_down, expert_up, activation)
    dim = x.shape[-1]
    pairs = indices.shape[-1]
    y = empty(x.shape, x.dtype, x.device)
    preact = empty((*x.shape[:-1], pairs), torch.float32, x.device)
    x2 = rows_view(x)
    if x2.shape[0] > 0:
        idx = indices.reshape(-1, pairs).contiguous()
        g = gates.reshape(-1, pairs).contiguous()
        down, up = expert_down.contiguous(), expert_up.contiguous()
        with device_guard(x.device):
            _ext.C.peer_experts_fwd(
                device_code(x.device),
                ptr(x2), row_stride(x2), ptr(idx), ptr(g), ptr(down), ptr(up),
                ptr(y), ptr(preact),
                x2.shape[0], dim, pairs, expert_down.shape[0],
                _dtypes.code(x.dtype), ACTIVATIONS[activation], stream_of(x.device),
            )  # fmt: skip
    return y, preact


def _segments(indices: torch.Tensor):
    """Pairs sorted by expert (token order kept), the distinct experts and their segment offsets."""
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ids, counts = torch.unique_consecutive(flat[order], return_counts=True)
    offsets = torch.zeros(ids.numel() + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order.to(torch.int32), ids, offsets


def _peer_experts_backward_impl(
    grad_y, x, indices, gates, expert_down, expert_up, preact, act, dense
):
    _check(x, indices, gates, expert_down, expert_up, act, check_range=False)
    order, ids, offsets = _segments(indices)
    if not _use_kernel(x, indices.shape[-1], "peer_experts_backward"):
        dx, dg, dd, du = _ref_backward(
            grad_y, x, indices, gates, expert_down, expert_up, preact, act
        )
        if not dense:
            dd, du = dd.index_select(0, ids), du.index_select(0, ids)
        return dx, dg, ids if not dense else ids.new_empty(0), dd, du
    dim, pairs = x.shape[-1], indices.shape[-1]
    x2 = rows_view(x)
    tokens = x2.shape[0]
    dx = empty(x.shape, x.dtype, x.device)
    dgates = empty(gates.shape, gates.dtype, x.device)
    rows = expert_down.shape[0] if dense else ids.numel()
    if tokens == 0 and dense:
        ddown, dup = expert_down.new_zeros(expert_down.shape), expert_up.new_zeros(expert_up.shape)
    else:
        ddown = empty((rows, dim), expert_down.dtype, x.device)
        dup = empty((rows, dim), expert_up.dtype, x.device)
    coef = empty((tokens, pairs), torch.float32, x.device)
    if tokens > 0:
        dy2 = grad_y.reshape(-1, dim).contiguous()
        idx = indices.reshape(-1, pairs).contiguous()
        g = gates.reshape(-1, pairs).contiguous()
        pre = preact.reshape(-1, pairs).contiguous()
        down, up = expert_down.contiguous(), expert_up.contiguous()
        with device_guard(x.device):
            _ext.C.peer_experts_bwd(
                device_code(x.device),
                ptr(dy2), ptr(x2), row_stride(x2), ptr(idx), ptr(g), ptr(down), ptr(up), ptr(pre),
                ptr(order), ptr(offsets), ids.numel(), ptr(ids), bool(dense),
                ptr(dx), ptr(dgates), ptr(ddown), ptr(dup), ptr(coef),
                tokens, dim, pairs, expert_down.shape[0],
                _dtypes.code(x.dtype), ACTIVATIONS[act], stream_of(x.device),
            )  # fmt: skip
    # (dense: no row list, so that the output shapes do not depend on the data: torch.compile
    # traces the training step's backward without a graph break)
    return dx, dgates, ids if not dense else ids.new_empty(0), ddown, dup


def _peer_experts_reference(x, indices, gates, expert_down, expert_up, activation, sparse_grad):
    _check(x, indices, gates, expert_down, expert_up, activation)
    return ref.peer_experts(x, indices, gates, expert_down, expert_up, activation)


LIB.impl("peer_experts", own_outputs(_peer_experts_kernel), "CPU")
LIB.impl("peer_experts", own_outputs(_peer_experts_kernel), "CUDA")
LIB.impl("peer_experts", own_outputs(_peer_experts_reference), "CompositeExplicitAutograd")
LIB.impl("peer_experts_backward", _peer_experts_backward_impl, "CPU")
LIB.impl("peer_experts_backward", _peer_experts_backward_impl, "CUDA")
LIB.impl("peer_experts_backward", _peer_experts_backward_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("fastlayers::peer_experts", lib=LIB)
def _peer_experts_fake(x, indices, gates, expert_down, expert_up, activation, sparse_grad):
    _check(x, indices, gates, expert_down, expert_up, activation, check_range=False)
    return x.new_empty(x.shape), x.new_empty(indices.shape, dtype=torch.float32)


@torch.library.register_fake("fastlayers::peer_experts_backward", lib=LIB)
def _peer_experts_backward_fake(
    grad_y, x, indices, gates, expert_down, expert_up, preact, act, dense
):
    _check(x, indices, gates, expert_down, expert_up, act, check_range=False)
    unique = 0 if dense else torch.library.get_ctx().new_dynamic_size()
    rows = (expert_down.shape[0] if dense else unique, x.shape[-1])
    return (
        x.new_empty(x.shape),
        gates.new_empty(gates.shape),
        indices.new_empty((unique,)),
        expert_down.new_empty(rows),
        expert_up.new_empty(rows),
    )


def _setup(ctx, inputs, output):
    x, indices, gates, expert_down, expert_up, activation, sparse_grad = inputs
    ctx.save_for_backward(x, indices, gates, expert_down, expert_up, output[1])
    ctx.activation, ctx.sparse_grad = activation, sparse_grad


def _backward(ctx, grad_y, grad_preact):
    x, indices, gates, expert_down, expert_up, preact = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None, None, None, None
    dx, dgates, ids, ddown, dup = torch.ops.fastlayers.peer_experts_backward(
        grad_y.contiguous(),
        x,
        indices,
        gates,
        expert_down,
        expert_up,
        preact,
        ctx.activation,
        not ctx.sparse_grad,
    )
    shape = expert_down.shape

    def table_grad(rows):
        if not ctx.sparse_grad:
            return rows
        return torch.sparse_coo_tensor(
            ids.unsqueeze(0), rows, shape, is_coalesced=True, check_invariants=False
        )

    need = ctx.needs_input_grad
    return (
        dx if need[0] else None,
        None,
        dgates if need[2] else None,
        table_grad(ddown) if need[3] else None,
        table_grad(dup) if need[4] else None,
        None,
        None,
    )


torch.library.register_autograd(
    "fastlayers::peer_experts", _backward, setup_context=_setup, lib=LIB
)


def peer_experts(
    x: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    expert_down: torch.Tensor,
    expert_up: torch.Tensor,
    activation: str = "gelu",
    sparse_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEER experts: ``y = sum_p gates_p * act(expert_down[indices_p] . x) * expert_up[indices_p]``.

    ``x [..., dim]``; ``indices [..., pairs]`` int64 in ``[0, num_experts)``;
    ``gates [..., pairs]`` (x's dtype); tables ``[num_experts, dim]``.
    Returns ``(y [..., dim], preact [..., pairs] fp32)``.
    Differentiable w.r.t. x, gates and both tables; ``sparse_grad=True`` makes the table gradients
    sparse COO tensors over the selected rows.
    """
    check_tensors(x=x, indices=indices, gates=gates, expert_down=expert_down, expert_up=expert_up)
    if direct_call_ok(x, gates, expert_down, expert_up):
        return _peer_experts_kernel(x, indices, gates, expert_down, expert_up, activation, False)
    return torch.ops.fastlayers.peer_experts(
        x, indices, gates, expert_down, expert_up, activation, bool(sparse_grad)
    )


def peer_experts_retrieved(x, indices, gates, expert_down, expert_up, activation="gelu",
                           sparse_grad=False):  # fmt: skip
    """:func:`peer_experts` for ``indices`` that :func:`peer_retrieve` chose (plus the head
    offsets of separate tables): in eager CPU inference their range check, a reduction and a host
    sync per call, is skipped; the CPU retrieval's indices are valid whatever the scores (NaN
    included: the first top-k candidates are always taken), and so are the reference's."""
    if on_cpu(x.device) and direct_call_ok(x, gates, expert_down, expert_up):
        check_tensors(x=x, indices=indices, gates=gates, expert_down=expert_down,
                      expert_up=expert_up)  # fmt: skip
        return _peer_experts_kernel(x, indices, gates, expert_down, expert_up, activation, False,
                                    check_range=False)  # fmt: skip
    return peer_experts(x, indices, gates, expert_down, expert_up, activation, sparse_grad)
