# SPDX-License-Identifier: Apache-2.0
"""Sparse layer-skip attention ops: ``route_topk``, ``route_threshold``, ``varlen_attention``,
``gather_rows``, ``scatter_add_gated``.

Semantics are those of :mod:`fastlayers.reference.skip` (the specification). ``varlen_attention``
has CPU kernels (forward, and a backward recomputing the probabilities from the saved lse); the
routing and the gather/scatter are short PyTorch sequences on every device (no host
synchronisation).
"""

from __future__ import annotations

import torch

from fastlayers import _dtypes, _ext
from fastlayers.ops._common import (
    LIB,
    apply_sinks,
    check_scale_softcap,
    check_sinks,
    check_tensor,
    check_tensors,
    device_code,
    device_guard,
    empty,
    has_kernel,
    on_cpu,
    on_cuda,
    ptr,
    register_no_backward,
    stream_of,
)
from fastlayers.reference import skip as ref

LIB.define(
    "varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k,"
    " Tensor q_pos, Tensor k_pos, int window_left, int window_right, float scale,"
    " float softcap=0.0) -> (Tensor, Tensor)"
)
# The backward kernels (CPU; CUDA for head dims <= 256) as an op of their own, so that
# torch.compile traces a training step's backward through it instead of into the raw pointers.
LIB.define(
    "varlen_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v,"
    " Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor q_pos, Tensor k_pos, Tensor out,"
    " Tensor lse, int window_left, int window_right, float scale, float softcap=0.0)"
    " -> (Tensor, Tensor, Tensor)"
)
register_no_backward("varlen_attention_backward")


def _check_varlen(q, k, v, cu_q, cu_k, q_pos, k_pos, left, right, scale, softcap=0.0) -> None:
    for t, name in (
        (q, "q"), (k, "k"), (v, "v"), (cu_q, "cu_seqlens_q"), (cu_k, "cu_seqlens_k"),
        (q_pos, "q_pos"), (k_pos, "k_pos"),
    ):  # fmt: skip
        check_tensor(t, name)
    if q.dtype not in _dtypes.FLOATING and q.dtype != torch.float64:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    for t, name in ((k, "k"), (v, "v")):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            "q, k, v must be packed [tokens, heads, head_dim]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must match in tokens and heads"
        )
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k head dims differ: {q.shape[2]} vs {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}) (GQA)"
        )
    for t, name in ((cu_q, "cu_seqlens_q"), (cu_k, "cu_seqlens_k")):
        if t.dtype != torch.int32 or t.dim() != 1 or t.shape[0] < 1:
            raise ValueError(f"{name} must be int32 [batch + 1], got {t.dtype} {tuple(t.shape)}")
    if cu_q.shape != cu_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same batch, got {tuple(cu_q.shape)} "
            f"and {tuple(cu_k.shape)}"
        )
    for t, name, n in ((q_pos, "q_pos", q.shape[0]), (k_pos, "k_pos", k.shape[0])):
        if t.dtype not in (torch.int32, torch.int64) or tuple(t.shape) != (n,):
            raise ValueError(f"{name} must be int32/int64 [{n}], got {t.dtype} {tuple(t.shape)}")
    for t, name in ((k, "k"), (v, "v"), (cu_q, "cu_seqlens_q"), (cu_k, "cu_seqlens_k"),
                    (q_pos, "q_pos"), (k_pos, "k_pos")):  # fmt: skip
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if left < -1 or right < -1:
        raise ValueError(f"window sizes must be >= 0 or -1 (unbounded), got ({left}, {right})")
    check_scale_softcap(scale, softcap)


def _check_layout(cu_q, cu_k, q_pos, k_pos, nq, nk) -> None:
    """Host-side checks the CPU kernel relies on (cu_seqlens in range, positions increasing
    within each sequence)."""
    for cu, pos, n, name in ((cu_q, q_pos, nq, "q"), (cu_k, k_pos, nk, "k")):
        c = cu.long()
        if int(c[0]) != 0 or bool((c[1:] < c[:-1]).any()) or int(c[-1]) > n:
            raise ValueError(
                f"cu_seqlens_{name} must start at 0, not decrease and end at <= {n}, "
                f"got {cu.tolist()}"
            )
        m = int(c[-1])
        if m > 1:
            starts = torch.zeros(m, dtype=torch.bool, device=pos.device)
            inner = c[1:-1][c[1:-1] < m]
            starts[inner] = True
            bad = (pos[1:m] <= pos[: m - 1]) & ~starts[1:]
            if bool(bad.any()):
                raise ValueError(
                    f"{name}_pos must increase strictly within each sequence (original token "
                    "positions of the routed tokens, in order)"
                )


def _varlen_reference(q, k, v, cu_q, cu_k, q_pos, k_pos, left, right, scale, softcap=0.0):
    _check_varlen(q, k, v, cu_q, cu_k, q_pos, k_pos, left, right, scale, softcap)
    return ref.varlen_attention(
        q, k, v, cu_q, cu_k, q_pos, k_pos, causal=False, window=(left, right), scale=scale,
        return_lse=True, softcap=softcap,
    )  # fmt: skip


def _in_range(cu: torch.Tensor, n: int) -> torch.Tensor:
    """``cu_seqlens`` as the CUDA kernels may read it, on the device (no host check, which would
    synchronise): the first value 0, each other clamped to ``[0, n]``, then made non-decreasing
    (a running max). The kernels read rows ``cu[b] .. cu[b + 1] - 1``: a negative, decreasing or
    too large ``cu`` read rows outside the tensors (found by the differential fuzz under
    AddressSanitizer: cu_seqlens_k ``[-3, 22, 3]`` for 20 keys), and rows before a first value
    above 0 were taken for the first sequence's. Valid ``cu_seqlens`` come back unchanged."""
    cu = torch.cat([cu.new_zeros(1), cu[1:].clamp(0, n)])
    return torch.cummax(cu, 0).values.to(torch.int32).contiguous()


def _varlen_cuda(q, k, v, cu_q, cu_k, q_pos, k_pos, left, right, scale, softcap=0.0):
    """The CUDA forward: no host-side layout check (it would synchronise); the kernel masks every
    key by position, and reads cu_seqlens clamped into the tensors (``_in_range``)."""
    nq, hq, d = q.shape
    nk, hkv, dv = v.shape
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    cq, ck = _in_range(cu_q, nq), _in_range(cu_k, nk)
    qp, kp = q_pos.long().contiguous(), k_pos.long().contiguous()
    out = empty((nq, hq, dv), q.dtype, q.device)
    lse = empty((nq, hq), torch.float32, q.device)
    if nq > 0:
        with device_guard(q.device):
            _ext.C.varlen_attention(
                device_code(q.device), ptr(qc), ptr(kc), ptr(vc), ptr(cq), ptr(ck), ptr(qp),
                ptr(kp), ptr(out), ptr(lse), 0, nq, nk, cq.shape[0] - 1, hq, hkv, d, dv, left,
                right, scale, _dtypes.code(q.dtype), stream_of(q.device), softcap,
            )  # fmt: skip
    return out, lse


def _varlen_kernel(q, k, v, cu_q, cu_k, q_pos, k_pos, left, right, scale, softcap=0.0):
    _check_varlen(q, k, v, cu_q, cu_k, q_pos, k_pos, left, right, scale, softcap)
    if on_cuda(q.device) and q.dtype != torch.float64 and has_kernel(q.device, "varlen_attention"):
        if _ext.C.varlen_attention_cuda_supported(q.shape[2], v.shape[2], q.shape[0], q.shape[1]):
            return _varlen_cuda(q, k, v, cu_q, cu_k, q_pos, k_pos, left, right, scale, softcap)
        _ext.warn_once(
            "varlen_attention-cuda-dims",
            "fastlayers.varlen_attention: the CUDA kernel takes head dims up to 256; running the "
            "PyTorch reference",
        )
    if not on_cpu(q.device) or q.dtype == torch.float64 or not has_kernel(q.device, "varlen"):
        return _varlen_reference(q, k, v, cu_q, cu_k, q_pos, k_pos, left, right, scale, softcap)
    nq, hq, d = q.shape
    nk, hkv, dv = v.shape
    _check_layout(cu_q, cu_k, q_pos, k_pos, nq, nk)
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    cq, ck = cu_q.contiguous(), cu_k.contiguous()
    qp, kp = q_pos.long().contiguous(), k_pos.long().contiguous()
    out = empty((nq, hq, dv), q.dtype, q.device)
    lse = empty((nq, hq), torch.float32, q.device)
    # (workspace: the keys transposed and the values per kv head, fp32)
    k_t = empty((_ext.C.varlen_cpu_workspace_floats(nk, hkv, d, dv),), torch.float32, q.device)
    if nq > 0:
        _ext.C.varlen_attention(
            device_code(q.device), ptr(qc), ptr(kc), ptr(vc), ptr(cq), ptr(ck), ptr(qp), ptr(kp),
            ptr(out), ptr(lse), ptr(k_t), nq, nk, cq.shape[0] - 1, hq, hkv, d, dv, left, right,
            scale, _dtypes.code(q.dtype), 0, softcap,
        )  # fmt: skip
    return out, lse


LIB.impl("varlen_attention", _varlen_kernel, "CPU")
LIB.impl("varlen_attention", _varlen_kernel, "CUDA")
LIB.impl("varlen_attention", _varlen_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("fastlayers::varlen_attention", lib=LIB)
def _varlen_fake(q, k, v, cu_q, cu_k, q_pos, k_pos, left, right, scale, softcap=0.0):
    _check_varlen(q, k, v, cu_q, cu_k, q_pos, k_pos, left, right, scale, softcap)
    return (
        q.new_empty((q.shape[0], q.shape[1], v.shape[2])),
        q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32),
    )


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, q_pos, k_pos, left, right, scale, softcap = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k, q_pos, k_pos, *output)
    ctx.window, ctx.scale, ctx.softcap = (left, right), scale, softcap


def _varlen_backward(ctx, grad_out, grad_lse):
    """CPU and CUDA (head dims <= 256): the backward kernels (probabilities recomputed from the
    saved lse). Elsewhere: recomputation through the reference under autograd."""
    q, k, v, cu_q, cu_k, q_pos, k_pos, out, lse = ctx.saved_tensors
    on_cuda_kernel = (
        on_cuda(q.device)
        and q.dtype != torch.float64
        and has_kernel(q.device, "varlen_attention")
        and _ext.C.varlen_attention_cuda_supported(q.shape[2], v.shape[2], q.shape[0], q.shape[1])
    )
    on_cpu_kernel = on_cpu(q.device) and q.dtype != torch.float64
    if on_cuda_kernel or (on_cpu_kernel and has_kernel(q.device, "varlen")):
        dq, dk, dv = torch.ops.fastlayers.varlen_attention_backward(
            grad_out, grad_lse, q, k, v, cu_q, cu_k, q_pos, k_pos, out, lse, *ctx.window,
            ctx.scale, ctx.softcap,
        )  # fmt: skip
    else:
        dq, dk, dv = _varlen_backward_reference(ctx, q, k, v, cu_q, cu_k, q_pos, k_pos,
                                                grad_out, grad_lse)  # fmt: skip
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            None, None, None, None, None, None, None, None)  # fmt: skip


def _varlen_backward_kernel(grad_out, grad_lse, q, k, v, cu_q, cu_k, q_pos, k_pos, out, lse,
                            left, right, scale, softcap=0.0):  # fmt: skip
    nq, hq, d = q.shape
    nk, hkv, dv = v.shape
    qc, kc, vc, oc = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous()
    go = grad_out.to(q.dtype).contiguous()
    lse_c = lse.contiguous()
    glse = grad_lse.float().contiguous() if grad_lse is not None else None
    qp, kp = q_pos.long().contiguous(), k_pos.long().contiguous()
    if on_cuda(q.device):
        cq, ck = _in_range(cu_q, nq), _in_range(cu_k, nk)
    else:  # (checked on the host by the forward)
        cq, ck = cu_q.contiguous(), cu_k.contiguous()
    # rows outside every sequence (routing padding) get zero gradients
    dq, dk, dvv = torch.zeros_like(qc), torch.zeros_like(kc), torch.zeros_like(vc)
    delta = None  # CUDA: dO . O per (row, head)
    if on_cuda(q.device):
        delta = empty((nq, hq), torch.float32, q.device)
    with device_guard(q.device):
        _ext.C.varlen_attention_bwd(
            device_code(q.device), ptr(qc), ptr(kc), ptr(vc), ptr(cq), ptr(ck), ptr(qp), ptr(kp),
            ptr(oc), ptr(go), ptr(lse_c), ptr(glse), ptr(dq), ptr(dk), ptr(dvv),
            nq, nk, cq.shape[0] - 1, hq, hkv, d, dv, left, right, scale,
            _dtypes.code(q.dtype), ptr(delta), stream_of(q.device), softcap,
        )  # fmt: skip
    return dq, dk, dvv


LIB.impl("varlen_attention_backward", _varlen_backward_kernel, "CPU")
LIB.impl("varlen_attention_backward", _varlen_backward_kernel, "CUDA")


@torch.library.register_fake("fastlayers::varlen_attention_backward", lib=LIB)
def _varlen_backward_fake(grad_out, grad_lse, q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # (contiguous)


def _varlen_backward_reference(ctx, q, k, v, cu_q, cu_k, q_pos, k_pos, grad_out, grad_lse):
    with torch.enable_grad():
        leaves = [
            t.detach().requires_grad_(need)
            for t, need in zip((q, k, v), ctx.needs_input_grad[:3], strict=True)
        ]
        out, lse = ref.varlen_attention(
            *leaves, cu_q, cu_k, q_pos, k_pos, causal=False, window=ctx.window,
            scale=ctx.scale, return_lse=True, softcap=ctx.softcap,
        )  # fmt: skip
        outputs, grads = [out], [grad_out]
        if grad_lse is not None:
            finite = torch.isfinite(lse)
            outputs.append(torch.where(finite, lse, 0.0))
            grads.append(torch.where(finite, grad_lse, 0.0))
        # (no query row in a sequence, e.g. no token routed: the outputs are constants, zeros)
        linked = [(o, g) for o, g in zip(outputs, grads, strict=True) if o.requires_grad]
        wanted = [t for t in leaves if t.requires_grad]
        if not linked:
            return tuple(torch.zeros_like(t) if t.requires_grad else None for t in leaves)
        got = iter(torch.autograd.grad([o for o, _ in linked], wanted, [g for _, g in linked],
                                       allow_unused=True))  # fmt: skip
    return tuple(next(got) if t.requires_grad else None for t in leaves)


torch.library.register_autograd(
    "fastlayers::varlen_attention", _varlen_backward, setup_context=_varlen_setup, lib=LIB
)


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
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
):
    """Packed variable-length attention masked by **original token positions**.

    ``q [Nq, Hq, d]``, ``k [Nk, Hkv, d]``, ``v [Nk, Hkv, dv]`` (GQA: ``Hq % Hkv == 0``), sequences
    delimited by ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32 ``[B + 1]``); ``q_pos`` / ``k_pos`` the
    tokens' positions in their original sequences, strictly increasing within each sequence.
    Query i sees key j of its sequence iff ``k_pos[j] <= q_pos[i]`` (``causal``) and, with
    ``window=(left, right)`` (or an int for both), ``q_pos - left <= k_pos <= q_pos + right``.
    A query with no visible key gets zeros (``lse = -inf``). ``scale`` defaults to ``d ** -0.5``.
    ``softcap`` (Gemma 2's logit soft-capping): each scaled score ``s`` becomes ``softcap *
    tanh(s / softcap)`` before the softmax; None or 0 for none. ``sinks`` (GPT-OSS's attention
    sinks): a floating ``[Hq]`` tensor, one logit per query head added to the softmax's
    denominator (a key of zero value every query sees); applied to the kernel's output through its
    lse (:func:`~fastlayers.ops._common.apply_sinks`: one more rounding of 16-bit outputs); a row
    with no visible key then gets zeros and ``lse = sink``.
    Returns ``out [Nq, Hq, dv]`` in q's dtype, and ``lse [Nq, Hq]`` fp32 with ``return_lse``.
    Differentiable w.r.t. q, k, v and the sinks. On the CPU a call holds, for its duration, the
    keys and values once more in fp32 (``Nk * Hkv * (d + dv)`` floats: transposed keys, values
    per kv head); the backward, per thread, one sequence's keys and values of one kv head at a
    time (``3 * nk_seq * (d + dv)`` floats: rows, transposed, gradients).
    """
    check_tensors(
        q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, q_pos=q_pos,
        k_pos=k_pos,
    )  # fmt: skip
    if q.dim() != 3 or q.shape[-1] == 0:
        raise ValueError(f"q must be [tokens, heads, head_dim > 0], got shape {tuple(q.shape)}")
    left, right = ref._window(window, bool(causal))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))):
        raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
    check_sinks(sinks, q.shape[1], q.device)
    out, lse = torch.ops.fastlayers.varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, left, right, scale,
        float(softcap or 0.0),
    )  # fmt: skip
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks)
    return (out, lse) if return_lse else out


def route_topk(scores: torch.Tensor, capacity) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence top-k routing of ``scores [B, T]``: ``(indices int64 [B * k], cu_seqlens int32
    [B + 1])`` with ``k = capacity`` (tokens) or ``ceil(capacity * T)`` (a float ratio); flat token
    indices ``b * T + t``, ascending within each sequence; ties keep the earlier token. Static
    shapes, no host synchronisation (CUDA-graph capturable)."""
    check_tensor(scores, "scores")
    return ref.route_topk(scores, capacity)


def route_threshold(scores: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold routing: the tokens with ``score > tau``, packed in order into a static
    ``[B * T]`` buffer (the tail past ``cu_seqlens[-1]`` is -1), with ``cu_seqlens`` int32
    ``[B + 1]``. No host synchronisation."""
    check_tensor(scores, "scores")
    return ref.route_threshold(scores, float(tau))


def _check_rows(x, indices, name_x="x") -> None:
    check_tensor(x, name_x)
    check_tensor(indices, "indices")
    if x.dim() != 2 or x.dtype not in _dtypes.FLOATING:
        raise ValueError(
            f"{name_x} must be float32/float16/bfloat16 [rows, dim], got {x.dtype} {tuple(x.shape)}"
        )
    if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"indices must be int32/int64 [m], got {indices.dtype} {tuple(indices.shape)}"
        )
    if indices.device != x.device:
        raise ValueError(f"indices is on {indices.device} but {name_x} is on {x.device}")


def _check_scatter(residual, indices, out, gate) -> None:
    _check_rows(residual, indices, "residual")
    check_tensor(out, "out")
    m, dim = indices.shape[0], residual.shape[1]
    if out.dtype != residual.dtype or tuple(out.shape) != (m, dim) or out.device != residual.device:
        raise ValueError(
            f"out must be {residual.dtype} [{m}, {dim}] on {residual.device}, got {out.dtype} "
            f"{tuple(out.shape)} on {out.device}"
        )
    if gate is not None:
        check_tensor(gate, "gate")
        if not gate.is_floating_point() or tuple(gate.shape) != (m,) or gate.device != out.device:
            raise ValueError(
                f"gate must be a float [{m}] on {out.device}, got {gate.dtype} {tuple(gate.shape)}"
            )


def _rows_kernel_ok(t: torch.Tensor) -> bool:
    return t.device.type in ("cpu", "cuda") and has_kernel(t.device, "scatter_add_gated")


def _rows_call(op, x, idx, rows, gate, y, d_gate, n, m, dim, dtype, device) -> None:
    with device_guard(device):
        _ext.C.rows_op(op, device_code(device), ptr(x), ptr(idx), ptr(rows), ptr(gate), ptr(y),
                       ptr(d_gate), n, m, dim, _dtypes.code(dtype), stream_of(device))  # fmt: skip


def _gather_kernel(x, indices):
    _check_rows(x, indices)
    if not _rows_kernel_ok(x):
        return ref.gather_rows(x, indices)
    xc, idx = x.contiguous(), indices.long().contiguous()
    y = empty((idx.shape[0], x.shape[1]), x.dtype, x.device)
    _rows_call(0, xc, idx, None, None, y, None, x.shape[0], idx.shape[0], x.shape[1], x.dtype,
               x.device)  # fmt: skip
    return y


def _scatter_kernel(residual, indices, out, gate):
    _check_scatter(residual, indices, out, gate)
    if not _rows_kernel_ok(residual):
        return ref.scatter_add_gated(residual, indices, out, gate)
    rc, idx, oc = residual.contiguous(), indices.long().contiguous(), out.contiguous()
    g = gate.float().contiguous() if gate is not None else None
    y = empty(residual.shape, residual.dtype, residual.device)
    n, dim = residual.shape
    _rows_call(1, rc, idx, oc, g, y, None, n, idx.shape[0], dim, residual.dtype, residual.device)
    return y


def _scatter_backward_kernel(grad_y, indices, out, gate):
    """``(d_out [m, dim], d_gate [m] fp32)``; d_residual is grad_y itself."""
    idx = indices.long().contiguous()
    m, dim = out.shape
    if not _rows_kernel_ok(out):
        valid = (idx >= 0)[:, None]
        rows = grad_y[idx.clamp_min(0)].double() * valid
        g = gate.float().double()[:, None] if gate is not None else 1.0
        d_out = (rows * g).float().to(out.dtype)
        return d_out, (rows * out.double()).sum(-1).float()
    dy, oc = grad_y.contiguous(), out.contiguous()
    g = gate.float().contiguous() if gate is not None else None
    d_out = empty((m, dim), out.dtype, out.device)
    d_gate = empty((m,), torch.float32, out.device)
    _rows_call(2, dy, idx, oc, g, d_out, d_gate, dy.shape[0], m, dim, out.dtype, out.device)
    return d_out, d_gate


LIB.define("gather_rows(Tensor x, Tensor indices) -> Tensor")
LIB.define("scatter_add_gated(Tensor residual, Tensor indices, Tensor out, Tensor? gate) -> Tensor")
LIB.define(
    "scatter_add_gated_backward(Tensor grad_y, Tensor indices, Tensor out, Tensor? gate)"
    " -> (Tensor, Tensor)"
)
register_no_backward("scatter_add_gated_backward")
for _name, _fn in (
    ("gather_rows", _gather_kernel),
    ("scatter_add_gated", _scatter_kernel),
    ("scatter_add_gated_backward", _scatter_backward_kernel),
):
    LIB.impl(_name, _fn, "CPU")
    LIB.impl(_name, _fn, "CUDA")
LIB.impl("gather_rows", lambda x, i: ref.gather_rows(x, i), "CompositeExplicitAutograd")
LIB.impl(
    "scatter_add_gated",
    lambda r, i, o, g: ref.scatter_add_gated(r, i, o, g),
    "CompositeExplicitAutograd",
)
LIB.impl("scatter_add_gated_backward", _scatter_backward_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake("fastlayers::gather_rows", lib=LIB)
def _gather_fake(x, indices):
    _check_rows(x, indices)
    return x.new_empty((indices.shape[0], x.shape[1]))


@torch.library.register_fake("fastlayers::scatter_add_gated", lib=LIB)
def _scatter_fake(residual, indices, out, gate):
    _check_scatter(residual, indices, out, gate)
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastlayers::scatter_add_gated_backward", lib=LIB)
def _scatter_backward_fake(grad_y, indices, out, gate):
    return out.new_empty(out.shape), out.new_empty((out.shape[0],), dtype=torch.float32)


def _gather_setup(ctx, inputs, output):
    x, indices = inputs
    ctx.save_for_backward(indices)
    ctx.rows = x.shape[0]


def _gather_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    idx = indices.long()
    # the rows the forward gave zeros: negative indices, and on CUDA (no host check there) indices
    # past the end; they get no gradient (where, not a product: a NaN in their dy stays out)
    valid = (idx >= 0) & (idx < ctx.rows)
    dx = grad.new_zeros((ctx.rows, grad.shape[1]))
    dx.index_add_(0, torch.where(valid, idx, 0), torch.where(valid[:, None], grad, 0))
    return dx, None  # (no host synchronisation)


def _scatter_setup(ctx, inputs, output):
    residual, indices, out, gate = inputs
    ctx.save_for_backward(indices, out, gate)
    ctx.gate_dtype = gate.dtype if gate is not None else None


def _scatter_backward(ctx, grad):
    indices, out, gate = ctx.saved_tensors
    d_out, d_gate = torch.ops.fastlayers.scatter_add_gated_backward(grad, indices, out, gate)
    d_gate = d_gate.to(ctx.gate_dtype) if gate is not None else None
    return grad, None, d_out, d_gate


torch.library.register_autograd(
    "fastlayers::gather_rows", _gather_backward, setup_context=_gather_setup, lib=LIB
)
torch.library.register_autograd(
    "fastlayers::scatter_add_gated", _scatter_backward, setup_context=_scatter_setup, lib=LIB
)


def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows of ``x [N, D]`` at ``indices [M]`` (a negative index gives a zero row). Kernels on CPU
    and CUDA, no host synchronisation; differentiable w.r.t. ``x``."""
    check_tensor(x, "x")
    check_tensor(indices, "indices")
    return torch.ops.fastlayers.gather_rows(x, indices)


def scatter_add_gated(
    residual: torch.Tensor,
    indices: torch.Tensor,
    out: torch.Tensor,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual`` with ``residual[indices] += gate[:, None] * out`` (returns a new tensor;
    indices unique (a repeated row raises ValueError on CPU; CUDA does not check, which would need
    the host), negative ones skipped; each updated element ``T(float(double(residual) +
    double(out) * double(gate)))``, as the reference). Differentiable; the backward is one fused
    kernel: ``d_out = gate * dy[indices]`` and ``d_gate = <dy[indices], out>``."""
    check_tensors(("gate",), residual=residual, indices=indices, out=out, gate=gate)
    return torch.ops.fastlayers.scatter_add_gated(residual, indices, out, gate)
