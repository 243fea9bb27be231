# SPDX-License-Identifier: Apache-2.0
"""Fast feedforward (FFF) ops: ``ultrafast_ff`` (+ backward) and ``fff_hard``.

Semantics, tie rule and layouts are those of :mod:`fastlayers.reference.fff` (the specification).
"""

from __future__ import annotations

import torch

from fastlayers import _dtypes, _ext
from fastlayers import reference as ref
from fastlayers.ops._common import (
    LIB,
    check_activation,
    check_tensor,
    check_tensors,
    device_code,
    device_guard,
    direct_call_ok,
    empty,
    has_kernel,
    lean_cuda_stream,
    on_cpu,
    on_cuda,
    own_outputs,
    poison_outputs_enabled,
    ptr,
    register_no_backward,
    row_stride,
    rows_view,
    stream_of,
)
from fastlayers.reference.fff import ACTIVATIONS, activation_fn, tree_depth

LIB.define(
    "ultrafast_ff(Tensor x, Tensor w_in, Tensor? b_in, Tensor w_out, str activation)"
    " -> (Tensor, Tensor, Tensor)"
)
LIB.define(
    "ultrafast_ff_backward(Tensor grad_y, Tensor x, Tensor w_in, Tensor w_out, Tensor path,"
    " Tensor preact, str activation) -> (Tensor, Tensor, Tensor, Tensor)"
)
register_no_backward("ultrafast_ff_backward")
LIB.define(
    "fff_hard(Tensor x, Tensor node_w, Tensor node_b, Tensor w1, Tensor b1, Tensor w2, Tensor b2,"
    " str activation) -> (Tensor, Tensor)"
)


# The CUDA kernel keeps a token's leaf hidden units in shared memory (csrc/fff/fff_cuda.cu).
_CUDA_MAX_LEAF_WIDTH = 3072


# ----------------------------------------------------------------------------------------------
# Checks (shared by the kernels and the fakes)
# ----------------------------------------------------------------------------------------------
def _check_activation_name(activation) -> None:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


def _check_param(t, name: str, shape: tuple, x: torch.Tensor) -> None:
    check_tensor(t, name)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_ultrafast(x, w_in, b_in, w_out, activation) -> int:
    """Returns the number of levels (depth + 1)."""
    check_activation(x, "x")
    check_tensor(w_in, "w_in")
    check_tensor(w_out, "w_out")
    if w_in.dim() != 2 or w_in.shape[1] != x.shape[-1]:
        raise ValueError(
            f"w_in must have shape (nodes, {x.shape[-1]}) to match x, got {tuple(w_in.shape)}"
        )
    depth = tree_depth(w_in.shape[0], "w_in")
    if depth + 1 > 31:
        raise ValueError(f"depth must be at most 30, got {depth}")
    _check_param(w_in, "w_in", w_in.shape, x)
    if w_out.dim() != 2:
        raise ValueError(f"w_out must have shape (nodes, out_features), got {tuple(w_out.shape)}")
    _check_param(w_out, "w_out", (w_in.shape[0], w_out.shape[1]), x)
    if w_out.shape[1] == 0:
        raise ValueError("w_out has out_features 0")
    if b_in is not None:
        _check_param(b_in, "b_in", (w_in.shape[0],), x)
    _check_activation_name(activation)
    return depth + 1


def _check_hard(x, node_w, node_b, w1, b1, w2, b2, activation) -> int:
    """Returns the depth."""
    check_activation(x, "x")
    for t, name in ((node_w, "node_w"), (node_b, "node_b"), (w1, "w1"), (b1, "b1"), (w2, "w2")):
        check_tensor(t, name)
    check_tensor(b2, "b2")
    if w1.dim() != 3 or w1.shape[1] != x.shape[-1]:
        raise ValueError(
            f"w1 must have shape (leaves, {x.shape[-1]}, leaf_width), got {tuple(w1.shape)}"
        )
    leaves, d_in, width = w1.shape
    if leaves < 1 or leaves & (leaves - 1):
        raise ValueError(f"w1 must have 2^depth leaves (1, 2, 4, ...), got {leaves}")
    if width == 0:
        raise ValueError("w1 has leaf_width 0")
    depth = leaves.bit_length() - 1
    if w2.dim() != 3 or w2.shape[0] != leaves or w2.shape[1] != width or w2.shape[2] == 0:
        raise ValueError(
            f"w2 must have shape ({leaves}, {width}, out_features), got {tuple(w2.shape)}"
        )
    _check_param(w1, "w1", w1.shape, x)
    _check_param(w2, "w2", w2.shape, x)
    _check_param(b1, "b1", (leaves, width), x)
    _check_param(b2, "b2", (leaves, w2.shape[2]), x)
    _check_param(node_w, "node_w", (leaves - 1, d_in), x)
    _check_param(node_b, "node_b", (leaves - 1,), x)
    _check_activation_name(activation)
    return depth


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
def _ultrafast_ff_kernel(x, w_in, b_in, w_out, activation):
    levels = _check_ultrafast(x, w_in, b_in, w_out, activation)
    if not has_kernel(x.device, "ultrafast_ff"):
        return ref.ultrafast_ff(x, w_in, w_out, b_in, activation)
    lead, d_out = x.shape[:-1], w_out.shape[1]
    y = empty((*lead, d_out), x.dtype, x.device)
    path = empty((*lead, levels), torch.int32, x.device)
    preact = empty((*lead, levels), torch.float32, x.device)
    x2 = rows_view(x)
    if x2.shape[0] > 0:
        w_in_c, w_out_c = w_in.contiguous(), w_out.contiguous()
        b_c = b_in.contiguous() if b_in is not None else None
        with device_guard(x.device):
            _ext.C.fff_ultra_fwd(
                device_code(x.device),
                ptr(x2), row_stride(x2), ptr(w_in_c), ptr(b_c), ptr(w_out_c),
                ptr(y), ptr(path), ptr(preact),
                x2.shape[0], x.shape[-1], d_out, levels,
                _dtypes.code(x.dtype), ACTIVATIONS[activation],
                stream_of(x.device),
            )  # fmt: skip
    return y, path, preact


class UltraInferPlan:
    """Validated weights of an UltraFastFeedForward for :func:`ultrafast_ff_infer`: built once per
    weight layout (the module keys it on the weights' data pointers, dtypes and shapes), so a
    small inference call checks only ``x``. CPU weights take the CPU kernel, CUDA weights the CUDA
    kernel on their device (on the caller's current stream)."""

    __slots__ = ("key", "dtype", "d_in", "d_out", "levels", "args", "codes", "cuda_index")

    def __init__(self, key, w_in, b_in, w_out, activation: str) -> None:
        self.key = key
        self.dtype = None  # None: not eligible (the op's path handles it, with its errors)
        if w_in.dim() != 2 or w_out.dim() != 2:
            return
        weights = (w_in, w_out) if b_in is None else (w_in, w_out, b_in)
        device = _lean_device("ultrafast_ff", activation, weights)
        if device is None:
            return
        nodes, d_in = w_in.shape
        if nodes & (nodes + 1) or nodes >= 1 << 31 or w_out.shape[0] != nodes or w_out.shape[1] < 1:
            return
        if b_in is not None and tuple(b_in.shape) != (nodes,):
            return
        self.dtype, self.d_in, self.d_out, self.levels = (
            w_in.dtype,
            d_in,
            w_out.shape[1],
            nodes.bit_length(),
        )
        self.args = (w_in.data_ptr(), ptr(b_in), w_out.data_ptr())  # fff_ultra_fwd's, in order
        self.codes, self.cuda_index = _lean_codes(device, w_in.dtype, activation)


def _lean_device(op: str, activation: str, weights) -> torch.device | None:
    """The device of an inference plan's weights when the lean route of ``op`` can take them (a
    known activation; CPU, or CUDA with ``op``'s kernel; one float dtype and one device for all,
    each contiguous), else None."""
    device, dtype = weights[0].device, weights[0].dtype
    if activation not in ACTIVATIONS or not (on_cpu(device) or on_cuda(device)):
        return None
    if not has_kernel(device, op) or dtype not in _FLOAT_KERNEL_DTYPES:
        return None
    if any(t.dtype != dtype or t.device != device or not t.is_contiguous() for t in weights):
        return None
    return device


def _lean_codes(device: torch.device, dtype: torch.dtype, activation: str):
    """An inference plan's (device code, dtype code, activation code) and its CUDA device index
    (None for CPU tensors)."""
    codes = (device_code(device), _dtypes.code(dtype), ACTIVATIONS[activation])
    return codes, device.index if device.type == "cuda" else None


def _lean_stream(plan) -> int | None:
    """The stream for a lean call of ``plan``'s kernel: 0 for CPU tensors, else
    :func:`~fastlayers.ops._common.lean_cuda_stream` of the plan's device."""
    return 0 if plan.cuda_index is None else lean_cuda_stream(plan.cuda_index)


def _lean_rows(x, plan):
    """``(x2, rows, row stride)`` of an ``x`` the inference plan takes (a plain tensor of its
    dtype, device and input size, at least one row), else None."""
    if plan.dtype is None or type(x) is not torch.Tensor or x.dtype != plan.dtype:
        return None
    if not (x.is_cpu if plan.cuda_index is None else x.get_device() == plan.cuda_index):
        return None
    if x.dim() == 0 or x.shape[-1] != plan.d_in:
        return None
    contiguous = x.is_contiguous()
    x2 = x if contiguous else rows_view(x)
    rows = x2.numel() // plan.d_in
    if rows == 0:
        return None
    return x2, rows, plan.d_in if contiguous else row_stride(x2)


def _lean_output(x, x2, rows: int, d_out: int, dtype) -> torch.Tensor:
    """The output ``[..., d_out]``: ``empty_like(x)`` for one contiguous row of x's width (the
    cheapest allocation, ~1 us; small, so no huge-page advice), else the ops' ``empty``."""
    if rows == 1 and x2 is x and d_out == x.shape[-1] and not poison_outputs_enabled():
        return torch.empty_like(x)
    return empty((*x.shape[:-1], d_out), dtype, x.device)


def ultrafast_ff_infer(x, plan: UltraInferPlan) -> torch.Tensor | None:
    """``y`` of :func:`ultrafast_ff` by the leanest route, for small inference calls (at batch 1
    the op's checks, dispatch and three allocations cost several times the kernel).

    The caller has checked that grad mode is off and that nothing intercepts calls
    (:func:`~fastlayers.ops._common.no_dispatch_modes`); this checks ``x`` against an eligible
    ``plan`` (a tensor of the plan's dtype, device and input size; for CUDA, the plan's device is
    the current one). Computes neither ``path`` nor ``preact``. Returns None when a precondition
    does not hold; the caller then runs the op, which gives the same ``y`` (or the clear error)."""
    lean = _lean_rows(x, plan)
    if lean is None:
        return None
    stream = _lean_stream(plan)
    if stream is None:
        return None
    x2, rows, stride = lean
    d_in, d_out = plan.d_in, plan.d_out
    y = _lean_output(x, x2, rows, d_out, plan.dtype)
    w_in, b_in, w_out = plan.args
    device, dtype_code, activation_code = plan.codes
    _ext.C.fff_ultra_fwd(
        device, x2.data_ptr(), stride, w_in, b_in, w_out, y.data_ptr(), 0, 0,
        rows, d_in, d_out, plan.levels, dtype_code, activation_code, stream,
    )  # fmt: skip
    return y


class HardInferPlan:
    """Validated weights of a FastFeedForward for :func:`fff_hard_infer` (the module keys it on
    the weights' data pointers, dtypes and shapes): a batch-1 call checks only ``x``. CPU weights
    take the CPU kernel, CUDA weights the CUDA kernel on their device (on the caller's current
    stream; leaf widths up to the CUDA kernel's)."""

    __slots__ = (
        "key", "dtype", "d_in", "d_out", "depth", "width", "leaves", "args", "codes", "cuda_index"
    )  # fmt: skip

    def __init__(self, key, params, activation: str) -> None:
        self.key = key
        self.dtype = None  # None: not eligible (the op's path handles it, with its errors)
        node_w, node_b, w1, b1, w2, b2 = params
        if w1.dim() != 3:
            return
        device = _lean_device("fff_hard", activation, (w1, *params))
        if device is None:
            return
        if on_cuda(device) and w1.shape[2] > _CUDA_MAX_LEAF_WIDTH:
            return
        try:
            depth = _check_hard(w1.new_empty((1, w1.shape[1])), *params, activation)
        except (TypeError, ValueError):
            return
        self.dtype, self.d_in, self.d_out, self.depth = w1.dtype, w1.shape[1], w2.shape[2], depth
        self.width, self.leaves = w1.shape[2], w1.shape[0]
        self.args = tuple(t.data_ptr() for t in params)  # fff_hard_fwd's, in order
        self.codes, self.cuda_index = _lean_codes(device, w1.dtype, activation)


def fff_hard_infer(x, plan: HardInferPlan) -> torch.Tensor | None:
    """``y`` of :func:`fff_hard` by the leanest route (small batches; the caller has checked grad
    mode and :func:`~fastlayers.ops._common.no_dispatch_modes`): ``y`` only, no leaf indices. None
    when a precondition does not hold (for CUDA: the plan's device is not the current one) or the
    batch is large enough for the leaf-grouped GEMMs: the caller then runs the op, which gives the
    same ``y`` (or the clear error)."""
    lean = _lean_rows(x, plan)
    if lean is None or _use_grouped(lean[1], plan.leaves, plan.width):
        return None
    stream = _lean_stream(plan)
    if stream is None:
        return None
    x2, rows, stride = lean
    d_in, d_out = plan.d_in, plan.d_out
    y = _lean_output(x, x2, rows, d_out, plan.dtype)
    device, dtype_code, activation_code = plan.codes
    _ext.C.fff_hard_fwd(
        device, x2.data_ptr(), stride, *plan.args, y.data_ptr(), 0, False,
        rows, d_in, d_out, plan.width, plan.depth, dtype_code, activation_code, stream,
    )  # fmt: skip
    return y


_FLOAT_KERNEL_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))


def _node_order(path: torch.Tensor, nodes: int):
    """(pair ids sorted by node, token order kept) and CSR offsets: the fixed summation order."""
    flat = path.reshape(-1).long()
    order = torch.argsort(flat, stable=True).to(torch.int32)
    offsets = torch.zeros(nodes + 1, dtype=torch.int64, device=path.device)
    offsets[1:] = torch.cumsum(torch.bincount(flat, minlength=nodes), 0)
    return order, offsets


def _check_backward(grad_y, x, w_in, w_out, path, preact, activation) -> int:
    levels = _check_ultrafast(x, w_in, None, w_out, activation)
    lead = x.shape[:-1]
    check_tensor(grad_y, "grad_y")
    if tuple(grad_y.shape) != (*lead, w_out.shape[1]) or grad_y.dtype != x.dtype:
        raise ValueError(
            f"grad_y must be {x.dtype} of shape {(*lead, w_out.shape[1])}, got "
            f"{grad_y.dtype} {tuple(grad_y.shape)}"
        )
    for t, name, dtype in ((path, "path", torch.int32), (preact, "preact", torch.float32)):
        check_tensor(t, name)
        if tuple(t.shape) != (*lead, levels) or t.dtype != dtype or t.device != x.device:
            raise ValueError(
                f"{name} must be {dtype} of shape {(*lead, levels)} on {x.device} (the forward's),"
                f" got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    return levels


def _ultrafast_ff_backward_kernel(grad_y, x, w_in, w_out, path, preact, activation):
    levels = _check_backward(grad_y, x, w_in, w_out, path, preact, activation)
    if not has_kernel(x.device, "ultrafast_ff_backward"):
        return ref.ultrafast_ff_backward(grad_y, x, w_in, w_out, path, preact, activation)
    nodes, d_in, d_out = w_in.shape[0], x.shape[-1], w_out.shape[1]
    x2 = rows_view(x)
    tokens = x2.shape[0]
    dx = empty(x.shape, x.dtype, x.device)
    dw_in = empty(w_in.shape, w_in.dtype, x.device)
    db_in = empty((nodes,), w_in.dtype, x.device)
    dw_out = empty(w_out.shape, w_out.dtype, x.device)
    coef = empty((tokens, levels), torch.float32, x.device)
    order, offsets = _node_order(path, nodes)
    dy2 = grad_y.contiguous().view(-1, d_out) if grad_y.numel() else grad_y.reshape(-1, d_out)
    path_c, pre_c = path.contiguous(), preact.contiguous()
    w_in_c, w_out_c = w_in.contiguous(), w_out.contiguous()
    with device_guard(x.device):
        _ext.C.fff_ultra_bwd(
            device_code(x.device),
            ptr(dy2), ptr(x2), row_stride(x2), ptr(w_in_c), ptr(w_out_c),
            ptr(path_c), ptr(pre_c), ptr(order), ptr(offsets),
            ptr(dx), ptr(dw_in), ptr(db_in), ptr(dw_out), ptr(coef),
            tokens, d_in, d_out, levels,
            _dtypes.code(x.dtype), ACTIVATIONS[activation],
            stream_of(x.device),
        )  # fmt: skip
    return dx, dw_in, db_in, dw_out


# Large batches with wide leaves: route with the kernel, then one GEMM pair per leaf over the tokens
# it received (each leaf's weights read once instead of once per token). Measured on the 2-core CPU
# at 1024 tokens, width 768, depth 3, leaf width 384: 26.6 ms per-token, about 8 ms grouped.
_GROUPED_MIN_WIDTH = 16
_GROUPED_MIN_TOKENS_PER_LEAF = 16
_GROUPED_MAX_LEAVES = 256


def _use_grouped(tokens: int, leaves: int, width: int) -> bool:
    return (
        width >= _GROUPED_MIN_WIDTH
        and leaves <= _GROUPED_MAX_LEAVES
        and tokens >= _GROUPED_MIN_TOKENS_PER_LEAF * leaves
    )


def _launch_hard(x2, params, y, leaf, depth, activation, descent_only):
    node_w, node_b, w1, b1, w2, b2 = (t.contiguous() for t in params)
    with device_guard(x2.device):
        _ext.C.fff_hard_fwd(
            device_code(x2.device),
            ptr(x2), row_stride(x2), ptr(node_w), ptr(node_b), ptr(w1), ptr(b1), ptr(w2), ptr(b2),
            ptr(y), ptr(leaf), descent_only,
            x2.shape[0], x2.shape[1], w2.shape[2], w1.shape[2], depth,
            _dtypes.code(x2.dtype), ACTIVATIONS[activation],
            stream_of(x2.device),
        )  # fmt: skip


def _grouped_leaves(x2, leaf, w1, b1, w2, b2, activation, y2) -> None:
    """y2[t] = leaf FF of token t's leaf, one fp32 GEMM pair per non-empty leaf."""
    act = activation_fn(activation)
    flat = leaf.long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()
    start = 0
    for j, c in enumerate(counts):
        if c == 0:
            continue
        idx = order[start : start + c]
        start += c
        xs = x2.index_select(0, idx).float()
        h = act(torch.addmm(b1[j].float(), xs, w1[j].float()))
        y2.index_copy_(0, idx, torch.addmm(b2[j].float(), h, w2[j].float()).to(y2.dtype))


def _fff_hard_kernel(x, node_w, node_b, w1, b1, w2, b2, activation):
    depth = _check_hard(x, node_w, node_b, w1, b1, w2, b2, activation)
    if not has_kernel(x.device, "fff_hard"):
        return ref.fff_hard(x, node_w, node_b, w1, b1, w2, b2, activation)
    lead, d_out = x.shape[:-1], w2.shape[2]
    x2 = rows_view(x)
    tokens, leaves, width = x2.shape[0], w1.shape[0], w1.shape[2]
    grouped = _use_grouped(tokens, leaves, width)
    if not grouped and on_cuda(x.device) and width > _CUDA_MAX_LEAF_WIDTH:
        _ext.warn_once(
            "fff_hard-width",
            f"fastlayers.fff_hard: the CUDA kernel takes leaf_width <= {_CUDA_MAX_LEAF_WIDTH}; "
            f"running the PyTorch reference for leaf_width {width}",
        )
        return ref.fff_hard(x, node_w, node_b, w1, b1, w2, b2, activation)
    y = empty((*lead, d_out), x.dtype, x.device)
    leaf = empty(lead, torch.int32, x.device)
    if tokens > 0:
        params = (node_w, node_b, w1, b1, w2, b2)
        _launch_hard(x2, params, y, leaf, depth, activation, descent_only=grouped)
        if grouped:
            _grouped_leaves(x2, leaf.reshape(-1), w1, b1, w2, b2, activation, y.view(-1, d_out))
    return y, leaf


def _ultrafast_ff_reference(x, w_in, b_in, w_out, activation):
    _check_ultrafast(x, w_in, b_in, w_out, activation)
    return ref.ultrafast_ff(x, w_in, w_out, b_in, activation)


def _ultrafast_ff_backward_reference(grad_y, x, w_in, w_out, path, preact, activation):
    _check_backward(grad_y, x, w_in, w_out, path, preact, activation)
    return ref.ultrafast_ff_backward(grad_y, x, w_in, w_out, path, preact, activation)


def _fff_hard_reference(x, node_w, node_b, w1, b1, w2, b2, activation):
    _check_hard(x, node_w, node_b, w1, b1, w2, b2, activation)
    return ref.fff_hard(x, node_w, node_b, w1, b1, w2, b2, activation)


for _name, _kernel, _reference in (
    ("ultrafast_ff", _ultrafast_ff_kernel, _ultrafast_ff_reference),
    ("ultrafast_ff_backward", _ultrafast_ff_backward_kernel, _ultrafast_ff_backward_reference),
    ("fff_hard", _fff_hard_kernel, _fff_hard_reference),
):
    LIB.impl(_name, own_outputs(_kernel), "CPU")
    LIB.impl(_name, own_outputs(_kernel), "CUDA")
    LIB.impl(_name, own_outputs(_reference), "CompositeExplicitAutograd")


# ----------------------------------------------------------------------------------------------
# Fakes
# ----------------------------------------------------------------------------------------------
@torch.library.register_fake("fastlayers::ultrafast_ff", lib=LIB)
def _ultrafast_ff_fake(x, w_in, b_in, w_out, activation):
    levels = _check_ultrafast(x, w_in, b_in, w_out, activation)
    lead = x.shape[:-1]
    return (
        x.new_empty((*lead, w_out.shape[1])),
        x.new_empty((*lead, levels), dtype=torch.int32),
        x.new_empty((*lead, levels), dtype=torch.float32),
    )


@torch.library.register_fake("fastlayers::ultrafast_ff_backward", lib=LIB)
def _ultrafast_ff_backward_fake(grad_y, x, w_in, w_out, path, preact, activation):
    _check_backward(grad_y, x, w_in, w_out, path, preact, activation)
    return (
        x.new_empty(x.shape),
        w_in.new_empty(w_in.shape),
        w_in.new_empty((w_in.shape[0],)),
        w_out.new_empty(w_out.shape),
    )


@torch.library.register_fake("fastlayers::fff_hard", lib=LIB)
def _fff_hard_fake(x, node_w, node_b, w1, b1, w2, b2, activation):
    _check_hard(x, node_w, node_b, w1, b1, w2, b2, activation)
    lead = x.shape[:-1]
    return x.new_empty((*lead, w2.shape[2])), x.new_empty(lead, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------
# Autograd: the hard path is not differentiable; gradients flow to x and the visited rows.
# ----------------------------------------------------------------------------------------------
def _setup_ultrafast(ctx, inputs, output):
    x, w_in, b_in, w_out, activation = inputs
    _, path, preact = output
    ctx.save_for_backward(x, w_in, w_out, path, preact)
    ctx.activation = activation
    ctx.has_bias = b_in is not None


def _backward_ultrafast(ctx, grad_y, grad_path, grad_preact):
    x, w_in, w_out, path, preact = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None, None
    dx, dw_in, db_in, dw_out = torch.ops.fastlayers.ultrafast_ff_backward(
        grad_y.contiguous(), x, w_in, w_out, path, preact, ctx.activation
    )
    need = ctx.needs_input_grad
    return (
        dx if need[0] else None,
        dw_in if need[1] else None,
        db_in if ctx.has_bias and need[2] else None,
        dw_out if need[3] else None,
        None,
    )


torch.library.register_autograd(
    "fastlayers::ultrafast_ff", _backward_ultrafast, setup_context=_setup_ultrafast, lib=LIB
)


# fff_hard: the routing is a hard decision (no gradient to the nodes); x and the leaf weights get
# the gradient of the reference's per-token leaf computation (``reference.fff._leaf_ff``) for the
# leaves the forward chose, recomputed in chunks of tokens that bound the gathered leaf weights.
_HARD_BACKWARD_CHUNK_ELEMENTS = 1 << 22


def _setup_hard(ctx, inputs, output):
    x, node_w, node_b, w1, b1, w2, b2, activation = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2, output[1])
    ctx.activation = activation


def _backward_hard(ctx, grad_y, grad_leaf):
    x, w1, b1, w2, b2, leaf = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_y is None:
        return (None,) * 8
    act = activation_fn(ctx.activation)
    x2, dy = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, w2.shape[2])
    flat = leaf.reshape(-1).long()
    wanted = [bool(need[i]) for i in (3, 4, 5, 6)]  # w1, b1, w2, b2
    # fp32 (float64 stays) leaves: the weight gradients accumulate over the chunks in that precision
    weights = [
        ref.fff._acc(t.detach()).requires_grad_(w)
        for t, w in zip((w1, b1, w2, b2), wanted, strict=True)
    ]
    per_token = w1.shape[1] * w1.shape[2] + w2.shape[1] * w2.shape[2]
    step = max(1, _HARD_BACKWARD_CHUNK_ELEMENTS // max(per_token, 1))
    dx_parts = []
    with torch.enable_grad():
        for s in range(0, x2.shape[0], step):
            xc = x2[s : s + step].detach().requires_grad_(bool(need[0]))
            y = ref.fff._leaf_ff(ref.fff._acc(xc), *weights, flat[s : s + step], act)
            if y.requires_grad:
                y.backward(dy[s : s + step].to(y.dtype))
            dx_parts.append(xc.grad)
    dx = None
    if need[0]:
        dx = torch.cat(dx_parts) if dx_parts else torch.zeros_like(x2)
        dx = dx.reshape(x.shape)
    dw = [
        None if not w else (a.grad.to(t.dtype) if a.grad is not None else torch.zeros_like(t))
        for a, t, w in zip(weights, (w1, b1, w2, b2), wanted, strict=True)
    ]
    return dx, None, None, *dw, None


torch.library.register_autograd(
    "fastlayers::fff_hard", _backward_hard, setup_context=_setup_hard, lib=LIB
)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def ultrafast_ff(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None = None,
    activation: str = "gelu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UltraFastBERT tree feedforward (see :mod:`fastlayers.reference.fff`).

    Parameters
    ----------
    x : ``[..., in]`` float32 / float16 / bfloat16, any strides.
    w_in : ``[2^(depth+1) - 1, in]``, x's dtype.
    w_out : ``[nodes, out]``. b_in : ``[nodes]`` or None.
    activation : ``"gelu"`` (erf), ``"gelu_tanh"``, ``"relu"`` or ``"silu"``.

    Returns
    -------
    ``(y [..., out], path [..., depth+1] int32, preact [..., depth+1] float32)``. ``y`` is
    differentiable w.r.t. ``x``, ``w_in``, ``b_in`` and ``w_out`` along the hard path; ``path`` and
    ``preact`` are not differentiable.
    """
    check_tensors(("b_in",), x=x, w_in=w_in, w_out=w_out, b_in=b_in)
    if direct_call_ok(x, w_in, b_in, w_out):
        return _ultrafast_ff_kernel(x, w_in, b_in, w_out, activation)
    _check_activation_name(activation)  # (before the op's schema, which would raise RuntimeError)
    return torch.ops.fastlayers.ultrafast_ff(x, w_in, b_in, w_out, activation)


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
    """Classic FFF inference: hard descent to one leaf per token. Returns ``(y, leaf int32)``.

    ``node_w [2^depth - 1, in]``, ``node_b [2^depth - 1]``, ``w1 [2^depth, in, width]``,
    ``b1 [2^depth, width]``, ``w2 [2^depth, width, out]``, ``b2 [2^depth, out]``, all x's dtype.
    Differentiable in x and the leaf weights (the chosen leaf's computation; the routing is a hard
    decision: no gradient to the nodes). Training uses the soft form
    (:func:`fastlayers.reference.fff_soft`).
    """
    check_tensors(x=x, node_w=node_w, node_b=node_b, w1=w1, b1=b1, w2=w2, b2=b2)
    if direct_call_ok(x, node_w, node_b, w1, b1, w2, b2):
        return _fff_hard_kernel(x, node_w, node_b, w1, b1, w2, b2, activation)
    return torch.ops.fastlayers.fff_hard(x, node_w, node_b, w1, b1, w2, b2, activation)
