# SPDX-License-Identifier: Apache-2.0
"""What every op shares: the library handle, argument checks with clear errors, output allocation
(poisoned on request, so tests catch unwritten elements), the CUDA stream, the [rows, cols] view."""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os

import torch

from fastlayers import _ext
from fastlayers._dtypes import FLOATING

LIB = torch.library.Library("fastlayers", "DEF")

_poison = os.environ.get("FASTLAYERS_POISON_OUTPUTS", "") == "1"


def set_poison_outputs(enabled: bool) -> None:
    """Fill every output an op allocates with NaN (floats) or -1 (integers) before the kernel
    writes it. For tests; ``FASTLAYERS_POISON_OUTPUTS=1`` sets it at import."""
    global _poison
    _poison = bool(enabled)


def poison_outputs_enabled() -> bool:
    return _poison


_HUGEPAGE_MIN_BYTES = 16 << 20


def advise_hugepages(t: torch.Tensor) -> torch.Tensor:
    """Advises transparent huge pages for a large, not yet touched CPU tensor (no-op otherwise):
    fewer first-touch page faults and TLB misses for tables read by random row (PEER experts)."""
    nbytes = t.numel() * t.element_size()
    if t.device.type == "cpu" and nbytes >= _HUGEPAGE_MIN_BYTES and _ext.C is not None:
        _ext.C.advise_hugepages(t.data_ptr(), nbytes)
    return t


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer for a kernel to write. Large CPU buffers are advised to use transparent huge
    pages before first touch (fresh multi-hundred-MiB gradient tables otherwise spend most of
    their time in 4 KiB page faults)."""
    t = advise_hugepages(torch.empty(shape, dtype=dtype, device=device))
    if _poison and t.numel() > 0:
        t.fill_(float("nan") if (t.is_floating_point()) else -1)
    return t


def own_outputs(fn):
    """``fn`` (an op's implementation with several outputs) returning each output as a tensor of
    its own: one that is a view (a reference reshapes its result last) is copied. Autograd refuses
    an in-place change of a view that a function with several outputs returned, and models make
    such changes: Falcon's ``mlp_output += attention_output`` raised RuntimeError in training with
    FFF or PEER feedforwards on the reference route (no compiled part, or a fallback). The kernels'
    outputs are fresh buffers: for them this is a check per output."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        return tuple(t.clone() if isinstance(t, torch.Tensor) and t._base is not None else t
                     for t in out)  # fmt: skip

    return wrapper


def capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on ``t``'s device: data-dependent checks that need the
    host (``bool(tensor)``) must be skipped then, or the capture fails."""
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_index_range(t: torch.Tensor, name: str, low: int, high: int, what: str) -> None:
    """Raises a ValueError naming ``name`` unless every value of the integer tensor ``t`` lies in
    ``[low, high]`` (``what`` names the bounds in the message). The check needs the host
    (``bool(tensor)``), so it is skipped for empty and meta tensors and while a CUDA graph is
    captured (the kernels guard their reads themselves)."""
    if t.numel() and t.device.type != "meta" and not capturing(t):
        if bool(((t < low) | (t > high)).any()):
            raise ValueError(f"{name} must lie in {what}")


def check_scale_softcap(scale: float, softcap: float) -> None:
    """The attention ops' softmax scale (finite) and logit soft-cap (finite, >= 0; 0: none)."""
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be finite and >= 0 (0: none), got {softcap}")


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_sinks(sinks, heads: int, device: torch.device) -> None:
    """``sinks`` (attention sinks: one logit per query head in the softmax's denominator, GPT-OSS)
    must be None or a floating tensor ``[heads]`` on ``device``."""
    if sinks is None:
        return
    check_tensor(sinks, "sinks")
    if not sinks.is_floating_point() or sinks.shape != (heads,):
        raise ValueError(f"sinks must be a floating tensor [{heads}] (one logit per query head), "
                         f"got {sinks.dtype} {tuple(sinks.shape)}")  # fmt: skip
    if sinks.device != device:
        raise ValueError(f"sinks must be on {device}, got {sinks.device}")


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor, dtype=None):
    """Attention sinks after the softmax: a sink logit ``s`` in the denominator scales each row's
    output by ``Z / (Z + e^s) = sigmoid(lse - s)`` and makes its lse ``logaddexp(lse, s)``
    (exactly the softmax over the scores and the sink, whose value is zero). ``lse [...]`` and
    ``sinks`` broadcast together, ``out [..., dv]``; in fp32, the output then rounded once to
    ``dtype`` (default: out's). A row that sees no key (lse -inf) stays zeros, with lse ``s``.
    Differentiable w.r.t. out, lse and the sinks (trained sinks get their gradient)."""
    s = sinks.float()
    factor = torch.sigmoid(lse - s)
    out = (out.float() * factor[..., None]).to(out.dtype if dtype is None else dtype)
    return out, torch.logaddexp(lse, s.expand_as(lse))


def check_tensors(optional: tuple[str, ...] = (), **tensors) -> None:
    """:func:`check_tensor` for each keyword argument (in order), None allowed for the names in
    ``optional``: a TypeError naming the argument, before the dispatcher's RuntimeError."""
    for name, t in tensors.items():
        if t is None and name in optional:
            continue
        check_tensor(t, name)


def check_module_input(
    x, features: int, weight: torch.Tensor, layout: str = "[..., {}]", dims: int | None = None
) -> None:
    """A module's input ``x``: a tensor with ``features`` in its last dimension (exactly ``dims``
    dimensions when given; ``layout`` formats the expected shape), on the device of the module's
    ``weight``, of its dtype unless autocast is on there. ValueError / TypeError naming ``x``."""
    check_tensor(x, "x")
    if x.dim() < 1 or x.shape[-1] != features or (dims is not None and x.dim() != dims):
        raise ValueError(f"x must be {layout.format(features)}, got shape {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the module on {weight.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"x must have the module's dtype {weight.dtype}, got {x.dtype}")


def check_positive_ints(**sizes) -> None:
    """Sizes (features, heads, layers...): ValueError naming the first that is not an int > 0."""
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def check_int(value, name: str) -> int:
    """``value`` as an int: a TypeError for anything that is not an integer (floats, NaN and
    infinities included), instead of ``int()``'s truncation or OverflowError."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        return int(value)  # a 0-dim integer tensor (reads it on the host)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def check_activation(x: torch.Tensor, name: str) -> None:
    check_tensor(x, name)
    if x.dtype not in FLOATING:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(
            f"{name} must have at least one dimension (the hidden size); got a 0-dim tensor"
        )
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has hidden size 0 (shape {tuple(x.shape)})")


def check_like(t: torch.Tensor, name: str, x: torch.Tensor) -> None:
    """``t`` must match ``x`` (the first activation) in shape, dtype and device."""
    check_tensor(t, name)
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.shape != x.shape:
        raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")


def check_eps(eps) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (eps >= 0.0 and eps < float("inf")):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, cols]`` with unit column stride; a view when one exists, else a copy."""
    n = t.shape[-1]
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, n)
    except RuntimeError:  # batch dims that cannot be merged into one row stride
        return t.reshape(-1, n)


def row_stride(t2d: torch.Tensor) -> int:
    return t2d.stride(0) if t2d.shape[0] > 1 else t2d.shape[1]


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    if t.is_contiguous():  # (the common case, without the Python loop over dimensions)
        return start, start + t.numel() * t.element_size()
    span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    return start, start + (span + 1) * t.element_size()


def check_no_alias(written: dict, inputs: dict, exact_ok: set) -> None:
    """No written buffer may share memory with an input, except the (written, input) pairs in
    ``exact_ok`` when they are exactly the same memory (same start and strides): the kernels read
    each element before the same thread writes it, so that form of in place is safe."""
    spans = [(n, t, _byte_range(t)) for n, t in inputs.items() if t.numel() > 0]  # (once each)
    for wname, w in written.items():
        if w.numel() == 0:
            continue
        w0, w1 = _byte_range(w)
        for iname, t, (t0, t1) in spans:
            if not (w0 < t1 and t0 < w1) or w.device != t.device:
                continue
            if (wname, iname) in exact_ok and (w.data_ptr(), w.stride()) == (
                t.data_ptr(),
                t.stride(),
            ):
                continue
            how = " other than exactly (in place)" if (wname, iname) in exact_ok else ""
            raise ValueError(f"{wname} shares memory with {iname}{how}")


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def stream_of(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


# The current CUDA device and stream by the cheapest calls this torch has (a few us less than
# torch.cuda.current_device() / current_stream(), which matters at batch 1).
_cuda_get_device = getattr(torch._C, "_cuda_getDevice", None)
_cuda_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def lean_cuda_stream(index: int) -> int | None:
    """The current stream of CUDA device ``index`` for a lean kernel call, when that device is the
    current one; else None (the ops' route then switches devices)."""
    if _cuda_get_device is None or _cuda_raw_stream is None or _cuda_get_device() != index:
        return None
    return _cuda_raw_stream(index)


def device_code(device: torch.device) -> int:
    return 0 if device.type == "cpu" else 1


def on_cuda(device: torch.device) -> bool:
    """Whether tensors on ``device`` take the CUDA kernels' path: the one question the ops ask
    about the device before choosing a kernel's arguments (the tests' CUDA emulation answers it
    for CPU tensors, see tests/cuda_emu)."""
    return device.type == "cuda"


def on_cpu(device: torch.device) -> bool:
    """Whether tensors on ``device`` take the CPU kernels' path (False under the tests' CUDA
    emulation, which sends CPU tensors down the CUDA path)."""
    return device.type == "cpu"


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def cuda_sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device)."""
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def device_guard(device: torch.device):
    """Kernels launch on the current CUDA device: make it the tensors' device."""
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index != torch.cuda.current_device()
    ):
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def has_kernel(device: torch.device, op: str) -> bool:
    """Whether _C has a kernel for this device; warns once for CUDA tensors on a CPU-only build."""
    if device.type == "cpu":
        return _ext.has_cpu_kernels()
    if device.type == "cuda":
        if _ext.has_cuda_kernels():
            return True
        _ext.warn_once(
            f"{op}-cuda",
            f"fastlayers.{op}: this build has no CUDA kernels; running the PyTorch reference on "
            f"{device}",
        )
    return False


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_C_API = torch._C
_has_mode_apis = all(
    hasattr(_C_API, n)
    for n in (
        "_len_torch_dispatch_stack",
        "_is_torch_function_mode_enabled",
        "_are_functorch_transforms_active",
    )
)


def no_dispatch_modes() -> bool:
    """Eager and nothing intercepting calls (no compile or trace, dispatch or function modes,
    functorch transforms): the part of :func:`direct_call_ok` that does not look at tensors."""
    return (
        _has_mode_apis
        and not torch.compiler.is_compiling()
        and not (
            _C_API._len_torch_dispatch_stack()
            or _C_API._is_torch_function_mode_enabled()
            or _C_API._are_functorch_transforms_active()
        )
    )


LIB.define("no_backward_error(Tensor grad, str op, str hint) -> Tensor")


def _no_backward_message(op: str, hint: str) -> str:
    return (
        f"fastlayers.{op} has no backward: an input requires grad and a gradient was asked "
        f"through its output; call it under torch.no_grad() or on detached inputs{hint}"
    )


@torch.library.impl(LIB, "no_backward_error", "CompositeExplicitAutograd")
def _no_backward_error(grad: torch.Tensor, op: str, hint: str) -> torch.Tensor:
    raise RuntimeError(_no_backward_message(op, hint))


@torch.library.register_fake("fastlayers::no_backward_error", lib=LIB)
def _no_backward_error_fake(grad: torch.Tensor, op: str, hint: str) -> torch.Tensor:
    return grad.new_empty(())


def register_no_backward(*names: str, hint: str = "") -> None:
    """Registers, for each op of ``names``, an autograd formula that refuses to differentiate: the
    forward runs with inputs that require grad (its outputs are marked as depending on them), and
    a backward through it raises a RuntimeError naming the op. Without it autograd would warn and
    hand back no gradient, so that a model's earlier layers would train silently wrong.

    The refusal is an op of its own (``fastlayers::no_backward_error``, whose fake returns a
    scalar): ``torch.compile`` traces the backward of a graph whose inputs require grad even when
    no backward is ever run, and the trace must not fail for it; the compiled backward raises when
    it runs, as eager does."""
    for name in names:

        def backward(ctx, *grads, _name=name):
            grad = next((g for g in grads if isinstance(g, torch.Tensor)), None)
            if grad is None:
                raise RuntimeError(_no_backward_message(_name, hint))
            error = torch.ops.fastlayers.no_backward_error(grad, _name, hint)
            return tuple(None if m is None else error.to(m[1]).expand(m[0]) for m in ctx.input_meta)

        torch.library.register_autograd(
            f"fastlayers::{name}", backward, setup_context=_input_meta, lib=LIB
        )


def _input_meta(ctx, inputs, output) -> None:
    """(shape, dtype) of each input that requires grad, None for the others."""
    ctx.input_meta = [
        (t.shape, t.dtype) if isinstance(t, torch.Tensor) and t.requires_grad else None
        for t in inputs
    ]


def tensor_version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (it counts in-place changes), for caches of values derived from
    ``t``; None for an inference tensor (made under ``torch.inference_mode``), which has none: a
    cache must then not keep anything derived from it."""
    return None if t.is_inference() else t._version


def plain_tensors(*tensors) -> bool:
    """Each of ``tensors`` None, a plain tensor or a Parameter (no subclass that intercepts
    calls)."""
    return all(t is None or type(t) in _PLAIN for t in tensors)


def direct_call_ok(*tensors) -> bool:
    """True when the dispatcher would do nothing but call our CPU/CUDA implementation: eager (not
    compiling or tracing), no autograd needed, plain tensors, no dispatch/function modes, no
    functorch transforms. The public functions then call the implementation directly and skip the
    dispatcher's Python overhead (tens of microseconds per call); the result is the same either way.
    """
    if not _has_mode_apis or torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or (grad and t.requires_grad):
            return False
    return not (
        _C_API._len_torch_dispatch_stack()
        or _C_API._is_torch_function_mode_enabled()
        or _C_API._are_functorch_transforms_active()
    )
